"""The multi-label benchmark's figures: what is read from each job, the baselines, the report.

Everything here is computed from a job's metrics.json and the mosaics' own
labels (benchmarks/mosaics.py); benchmarks/multilabel.py runs the jobs.
"""

import os
from typing import Dict, List, Optional

from benchmarks import mosaics
from benchmarks import report

MULTI_LABEL_KEYS = ("micro_f1", "macro_f1", "mean_average_precision", "exact_match",
                    "hamming_loss")


def _micro_f1(true_positives: float, false_positives: float, false_negatives: float) -> float:
    denominator = 2 * true_positives + false_positives + false_negatives
    return 2 * true_positives / denominator if denominator else 0.0


def frequency_baselines(mosaic_set: mosaics.MosaicSet) -> Dict:
    """Micro F1 on the test mosaics of predictions that know only the train label frequencies.

    * ``constant``: every test mosaic gets each label whose train frequency is
      at least 0.5 (the best a single fixed label set does here: both labels);
    * ``random``: each label drawn independently with its train frequency
      (expected counts).

    ``micro_f1`` is the larger: the figure a trained model must clearly beat.
    """
    train, test = mosaic_set.split("train"), mosaic_set.split("test")
    labels = sorted({label for m in train for label in m.labels})
    frequency = {c: sum(c in m.labels for m in train) / len(train) for c in labels}
    positives = {c: sum(c in m.labels for m in test) for c in labels}
    n = len(test)
    constant = [c for c in labels if frequency[c] >= 0.5]
    constant_f1 = _micro_f1(sum(positives[c] for c in constant),
                            sum(n - positives[c] for c in constant),
                            sum(positives[c] for c in labels if c not in constant))
    random_f1 = _micro_f1(sum(frequency[c] * positives[c] for c in labels),
                          sum(frequency[c] * (n - positives[c]) for c in labels),
                          sum((1 - frequency[c]) * positives[c] for c in labels))
    return {"train_frequency": frequency, "test_positives": positives, "test_mosaics": n,
            "constant_labels": constant, "constant_micro_f1": constant_f1,
            "random_micro_f1": random_f1, "micro_f1": max(constant_f1, random_f1)}


def _per_class(split: Dict, classes: List[str]) -> Dict[str, Dict]:
    """Class -> precision, recall, F1, AP of one split (AP from per_class or average_precision)."""
    per_class = split.get("per_class", {})
    ap = split.get("average_precision", {})
    ap = ap.get("per_class", ap) if isinstance(ap, dict) else {}
    result = {}
    for name in classes:
        row = per_class.get(name, {})
        result[name] = {key: row.get(key) for key in ("precision", "recall", "f1")}
        result[name]["average_precision"] = row.get("average_precision", ap.get(name))
    return result


def multi_label_result(run: Dict) -> Dict:
    """What the multi-label job reports on test (and validation's micro F1)."""
    metrics = run["metrics"]
    test = metrics["test"]
    thresholds = metrics.get("thresholds", {})
    return {
        "flags": run["flags"], "seconds": run["seconds"], "task": metrics.get("task"),
        "test": {key: test.get(key) for key in (*MULTI_LABEL_KEYS, "count")},
        "validation_micro_f1": metrics.get("validation", {}).get("micro_f1"),
        "per_class": _per_class(test, sorted(thresholds) or ["cat", "dog"]),
        "thresholds": thresholds,
        "image_size": run["config"].get("image_size"),
    }


def single_label_result(run: Dict, mosaic_set: mosaics.MosaicSet) -> Dict:
    """The reference: single-label accuracy on the photos inside the test mosaics."""
    metrics = run["metrics"]
    photos = mosaic_set.photos("test")
    return {
        "flags": run["flags"], "seconds": run["seconds"],
        "test_accuracy": metrics["test"]["accuracy"],
        "test_balanced_accuracy": metrics["test"].get("balanced_accuracy"),
        "test_count": metrics["test"].get("count"),
        "test_photos": {c: len(p) for c, p in photos.items()},
        "validation_accuracy": metrics.get("validation", {}).get("accuracy"),
        "image_size": run["config"].get("image_size"),
    }


def summarize(data: Dict, results: Dict[str, Dict]) -> Dict:
    summary = {"baseline_micro_f1": data["frequency_baselines"]["micro_f1"]}
    if "multi_label" in results:
        ml = results["multi_label"]
        summary.update({f"test_{key}": ml["test"][key] for key in MULTI_LABEL_KEYS})
        summary["task"] = ml["task"]
        summary["thresholds"] = ml["thresholds"]
        if ml["test"]["micro_f1"] is not None:
            summary["micro_f1_minus_baseline"] = ml["test"]["micro_f1"] - summary[
                "baseline_micro_f1"]
    if "single_label" in results:
        summary["single_label_test_accuracy"] = results["single_label"]["test_accuracy"]
    return summary


def _figure(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(command: str, data: Dict, results: Dict[str, Dict], summary: Dict) -> List[str]:
    import tensorflow as tf

    splits = data["splits"]
    base = data["frequency_baselines"]
    lines = ["# Multi-label on real photos: 2x2 mosaics of cats and dogs", "", "```", command,
             "```", "", f"{os.cpu_count()} cores, TensorFlow {tf.__version__}. "
             f"Mosaics of {data['mosaic_size']} px (tiles of {data['mosaic_size'] // 2} px, "
             "empty tiles mid-grey), seed "
             f"{data['seed']}, built in {data['build_seconds']:.0f} s "
             "(benchmarks/mosaics.py). Train mosaics from the train photos; validation and "
             "test mosaics from two disjoint halves of the validation photos.", "",
             "| split | mosaics | cat / dog labels | cat / dog / cat+dog | photos per mosaic "
             "1/2/3/4 | distinct photos cats / dogs |", "|---|---|---|---|---|---|"]
    for split, s in splits.items():
        sets = s["label_sets"]
        per = " / ".join(str(s["photos_per_mosaic"].get(k, 0)) for k in range(1, 5))
        lines.append(
            f"| {split} | {s['mosaics']} | {s['label_counts'].get('cat', 0)} / "
            f"{s['label_counts'].get('dog', 0)} | {sets.get('cat', 0)} / {sets.get('dog', 0)} / "
            f"{sets.get('cat+dog', 0)} | {per} | "
            f"{s['distinct_photos'].get('cats', 0)} / {s['distinct_photos'].get('dogs', 0)} |")
    lines += ["", f"Label-frequency baselines on the test mosaics (train frequencies "
              f"{', '.join(f'{c} {p:.3f}' for c, p in base['train_frequency'].items())}): "
              f"micro F1 {base['constant_micro_f1']:.3f} predicting "
              f"{' + '.join(base['constant_labels']) or 'nothing'} for every mosaic, "
              f"{base['random_micro_f1']:.3f} (expected) drawing each label at its "
              "frequency.", ""]
    if "multi_label" in results:
        lines += _multi_label_lines(results["multi_label"], summary)
    else:
        lines += ["## multi_label", "", "Not run (`--sides`).", ""]
    if "single_label" in results:
        lines += _single_label_lines(results["single_label"])
    return lines


def _multi_label_lines(ml: Dict, summary: Dict) -> List[str]:
    t = ml["test"]
    shown = " ".join(f for f in ml["flags"] if not f.startswith(("--data_dir", "--job_dir")))
    lines = ["## multi_label (default recipe, `--task=multi_label`)", "",
             f"Trainer flags besides --data_dir=<import.jsonl> and --job_dir: `{shown}`; "
             f"task in metrics.json: `{ml['task']}`; {ml['seconds']:.0f} s.", "",
             "| test (mosaics) | micro F1 | macro F1 | mAP | exact match | Hamming loss |",
             "|---|---|---|---|---|---|",
             f"| {t.get('count') or ''} | {_figure(t['micro_f1'])} | {_figure(t['macro_f1'])} | "
             f"{_figure(t['mean_average_precision'])} | {_figure(t['exact_match'])} | "
             f"{_figure(t['hamming_loss'])} |", "",
             "| class | threshold (chosen on validation) | test precision | test recall | "
             "test F1 | test AP |", "|---|---|---|---|---|---|"]
    for name, row in ml["per_class"].items():
        lines.append(f"| {name} | {_figure(ml['thresholds'].get(name))} | "
                     f"{_figure(row['precision'])} | {_figure(row['recall'])} | "
                     f"{_figure(row['f1'])} | {_figure(row['average_precision'])} |")
    if "micro_f1_minus_baseline" in summary:
        lines += ["", f"Micro F1 - label-frequency baseline: "
                  f"{summary['micro_f1_minus_baseline']:+.3f}."]
    return lines + [""]


def _single_label_lines(sl: Dict) -> List[str]:
    photos = sl["test_photos"]
    return ["## single_label reference (default recipe)", "",
            "Trained on the train photos; validation: the photos inside the validation "
            "mosaics; test: exactly the photos inside the test mosaics "
            f"({photos.get('cats', 0)} cats + {photos.get('dogs', 0)} dogs). "
            f"{sl['seconds']:.0f} s.", "",
            "| test photos | test accuracy | test balanced accuracy | validation accuracy |",
            "|---|---|---|---|",
            f"| {sl['test_count']} | {_figure(sl['test_accuracy'])} | "
            f"{_figure(sl['test_balanced_accuracy'])} | {_figure(sl['validation_accuracy'])} |",
            ""]


def write(out_dir: str, name: str, command: str, data: Dict, results: Dict[str, Dict],
          summary: Dict) -> None:
    report.write(out_dir, name, command, [{"data": data, **results}], summary,
                 markdown(command, data, results, summary))
