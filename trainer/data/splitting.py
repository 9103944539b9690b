"""Splitting a listing: unassigned images per class by fractions, a held-out test share.

Splits depend on the seed and on the images alone: each class's images are
ordered by path before a generator seeded with the seed and the class name
shuffles them, so adding a class leaves the others' splits alone, and a
folder and an import file listing the same images split identically. A
multi-label image is split by its first label (its ``class_name``).
"""

import collections
import dataclasses
import random
from typing import Dict, List, Sequence, Tuple

SPLITS = ("train", "validation", "test")


def held_out(labels: Sequence[int], fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """(kept, held-out) indices: ``fraction`` of each label's indices, rounded, by ``seed``."""
    rng = random.Random(seed)
    keep, hold = [], []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        n_hold = int(round(len(members) * fraction))
        hold += members[:n_hold]
        keep += members[n_hold:]
    return sorted(keep), sorted(hold)


def split_unassigned(images: Sequence, fractions: Sequence[float],
                      seed: int) -> List:
    """Each class's unassigned images into train/validation/test by ``fractions``.

    Per class, by a generator seeded with the seed and the class name, so that
    adding a class leaves the others' splits alone.
    """
    by_class: Dict[str, list] = collections.defaultdict(list)
    for image in images:
        by_class[image.class_name].append(image)
    result = []
    for class_name, members in sorted(by_class.items()):
        members = sorted(members, key=lambda i: i.path)
        random.Random(f"{seed}/{class_name}").shuffle(members)
        n_test = int(round(len(members) * fractions[2]))
        n_validation = int(round(len(members) * fractions[1]))
        for index, image in enumerate(members):
            split = ("test" if index < n_test else
                     "validation" if index < n_test + n_validation else "train")
            result.append(dataclasses.replace(image, split=split))
    return result


def assign(images: Sequence, class_names: Sequence[str], options) -> List:
    """Every image with a split, ordered by (split, class, path); ``options``: a
    ``sources.Options`` (fractions, test_fraction, seed)."""
    assigned = [i for i in images if i.split] + split_unassigned(
        [i for i in images if not i.split], options.split_fractions, options.seed)
    index = {name: k for k, name in enumerate(class_names)}
    assigned.sort(key=lambda i: (SPLITS.index(i.split), index[i.class_name], i.path))
    if options.test_fraction > 0 and not any(i.split == "test" for i in assigned):
        validation = [i for i in assigned if i.split == "validation"]
        _, hold = held_out([index[i.class_name] for i in validation], options.test_fraction,
                           options.seed)
        test = {validation[k].path for k in hold}
        assigned = [dataclasses.replace(i, split="test")
                    if i.split == "validation" and i.path in test else i for i in assigned]
        assigned.sort(key=lambda i: (SPLITS.index(i.split), index[i.class_name], i.path))
    return assigned

