"""Train sets of a chosen size made from real images, for the cache benchmarks.

Deterministic crops and flips of cats_and_dogs_filtered's train images,
written as new JPEG files (so decode costs stay real), and a copy of the
first validation images.
"""

import os
import shutil


def make_train_set(source_dir: str, out_dir: str, count: int, size: int = 0) -> str:
    """``count`` train images (half per class) made by crops and flips of the sources.

    Variant ``v`` of a source image keeps a centred-then-shifted crop of
    (0.8 + 0.04 * (v % 5)) of each side, mirrored when ``v`` is odd; written
    as a new JPEG (quality 90). ``size`` > 0 also resizes (the smoke run).
    """
    from PIL import Image, ImageOps

    classes = sorted(os.listdir(os.path.join(source_dir, "train")))
    for label, name in enumerate(classes):
        files = sorted(os.listdir(os.path.join(source_dir, "train", name)))
        target = os.path.join(out_dir, "train", name)
        os.makedirs(target, exist_ok=True)
        for i in range(count // len(classes)):
            variant = i // len(files)
            with Image.open(os.path.join(source_dir, "train", name, files[i % len(files)])) as im:
                im = im.convert("RGB")
                w, h = im.size
                f = 0.8 + 0.04 * (variant % 5)
                cw, ch = int(w * f), int(h * f)
                dx, dy = (w - cw) * ((i * 7) % 11) // 10, (h - ch) * ((i * 3) % 11) // 10
                im = im.crop((dx, dy, dx + cw, dy + ch))
                if variant % 2:
                    im = ImageOps.mirror(im)
                if size:
                    im = im.resize((size, size))
                im.save(os.path.join(target, f"{i:06d}.jpg"), quality=90)
    return out_dir


def copy_validation(source_dir: str, out_dir: str, count: int) -> None:
    classes = sorted(os.listdir(os.path.join(source_dir, "validation")))
    for name in classes:
        files = sorted(os.listdir(os.path.join(source_dir, "validation", name)))
        target = os.path.join(out_dir, "validation", name)
        os.makedirs(target, exist_ok=True)
        for f in files[:count // len(classes)]:
            shutil.copy(os.path.join(source_dir, "validation", name, f), target)
