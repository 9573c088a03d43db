"""Accuracy of a crop map against held-out labels: confusion matrix, agreement metrics, CSV/PNG/JSON reports.

Rows of every confusion matrix are the reference (truth), columns the map (prediction).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import rasterio
import xarray as xr
from prefect import task
from pyproj import CRS

from infra.atomic import atomic_path
from infra.errors import CropflowError
from tasks.labels import SPLITS, cube_grid, rasterize_labels, read_classes, read_labels

NODATA = 255


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int = -1) -> np.ndarray:
    """`(num_classes, num_classes)` int64 counts, rows = truth, columns = prediction.

    Pixels where `truth` or `pred` equals `ignore` are skipped; any other value outside `0..num_classes-1`
    raises `ValueError`.
    """
    truth, pred = np.asarray(truth).ravel(), np.asarray(pred).ravel()
    if truth.shape != pred.shape:
        raise ValueError(f"truth and prediction differ in size: {truth.size} vs {pred.size}")
    keep = (truth != ignore) & (pred != ignore)
    t, p = truth[keep].astype(np.int64), pred[keep].astype(np.int64)
    for name, v in (("truth", t), ("prediction", p)):
        bad = (v < 0) | (v >= num_classes)
        if bad.any():
            raise ValueError(f"{name} holds values outside 0..{num_classes - 1}: {np.unique(v[bad])[:10].tolist()}")
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def accuracy_metrics(cm: np.ndarray, class_names: list[str]) -> dict:
    """Overall accuracy, Cohen's kappa, per-class precision/recall/F1/IoU, macro-F1 and mIoU of a confusion matrix.

    A ratio with a zero denominator is `None` (e.g. the precision of a class never predicted). Classes absent
    from both truth and prediction have no F1/IoU and are left out of the macro averages; they are listed in
    `excluded_from_macro`.
    """
    cm = np.asarray(cm, dtype=np.float64)
    k = cm.shape[0]
    if cm.shape != (k, k) or len(class_names) != k:
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(class_names)} class names")
    n = cm.sum()
    if n == 0:
        raise ValueError("the confusion matrix is empty: no pixel to evaluate")
    tp, rows, cols = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    oa = tp.sum() / n
    expected = (rows * cols).sum() / n**2
    kappa = (oa - expected) / (1 - expected) if expected < 1 else None
    per_class, present = {}, []
    for i, name in enumerate(class_names):
        per_class[name] = {
            "support": int(rows[i]),
            "predicted": int(cols[i]),
            "precision": _ratio(tp[i], cols[i]),
            "recall": _ratio(tp[i], rows[i]),
            "f1": _ratio(2 * tp[i], rows[i] + cols[i]),
            "iou": _ratio(tp[i], rows[i] + cols[i] - tp[i]),
        }
        if rows[i] + cols[i] > 0:
            present.append(name)
    return {
        "n_pixels": int(n),
        "overall_accuracy": float(oa),
        "kappa": None if kappa is None else float(kappa),
        "macro_f1": float(np.mean([per_class[c]["f1"] for c in present])),
        "miou": float(np.mean([per_class[c]["iou"] for c in present])),
        "per_class": per_class,
        "excluded_from_macro": [c for c in class_names if c not in present],
    }


def write_confusion_csv(cm: np.ndarray, class_names: list[str], out_csv: Path) -> Path:
    """Counts as CSV: header `truth \\ prediction, <names>`, one row per truth class (atomic write)."""
    with atomic_path(Path(out_csv)) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["truth \\ prediction", *class_names])
        for name, row in zip(class_names, np.asarray(cm), strict=True):
            writer.writerow([name, *(int(v) for v in row)])
    return Path(out_csv)


def write_confusion_png(cm: np.ndarray, class_names: list[str], out_png: Path, title: str = "") -> Path:
    """Heatmap coloured by row-normalised share (recall per truth class), annotated with counts (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    k = len(class_names)
    size = max(4.0, 0.6 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size), dpi=100)
    try:
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the truth class (row)")
        for i in range(k):
            for j in range(k):
                colour = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color=colour, fontsize=8)
        ax.set_xticks(range(k), class_names, rotation=45, ha="right")
        ax.set_yticks(range(k), class_names)
        ax.set_xlabel("prediction")
        ax.set_ylabel("truth")
        ax.set_title(title or "confusion matrix (pixels)")
        fig.tight_layout()
        with atomic_path(Path(out_png)) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(out_png)


def evaluate_map(
    class_map: np.ndarray,
    target: np.ndarray,
    split: np.ndarray,
    classes: list[dict],
    out_dir: Path,
    split_value: int = SPLITS["test"],
) -> dict:
    """Metrics of `class_map` on the pixels of `split == split_value` with a label (`target >= 0`).

    Labelled pixels the map left as no-data (255) are not scored; their number is reported as `unmapped_pixels`.
    Writes `metrics.json`, `confusion_matrix.csv` and `confusion_matrix.png` into `out_dir` and returns the metrics.
    """
    if not (class_map.shape == target.shape == split.shape):
        raise ValueError(f"map {class_map.shape}, target {target.shape} and split {split.shape} differ in shape")
    names = [c["name"] for c in sorted(classes, key=lambda c: c["id"])]
    if [c["id"] for c in sorted(classes, key=lambda c: c["id"])] != list(range(len(names))):
        raise CropflowError("class ids must be 0..K-1 in classes.json; renumber the classes.")
    scored = (split == split_value) & (target >= 0)
    unmapped = scored & (class_map == NODATA)
    scored &= ~unmapped
    if not scored.any():
        raise CropflowError(
            f"no labelled pixel of split {split_value} is mapped; check that the labels overlap the region "
            "and that the split holds test parcels."
        )
    cm = confusion_matrix(target[scored], class_map[scored], len(names))
    split_name = {v: k for k, v in SPLITS.items()}.get(split_value, str(split_value))
    metrics = {
        "split": split_name,
        "unmapped_pixels": int(unmapped.sum()),
        **accuracy_metrics(cm, names),
        "class_names": names,
        "confusion_matrix": cm.tolist(),
    }
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    write_confusion_csv(cm, names, out_dir / "confusion_matrix.csv")
    write_confusion_png(cm, names, out_dir / "confusion_matrix.png", title=f"confusion matrix, {split_name} split")
    return metrics


@task(name="evaluate-map")
def evaluate_map_task(class_tif: Path, cube_path: Path, labels_path: Path, classes_path: Path, out_dir: Path) -> dict:
    """Score the class COG on the test parcels burnt onto the cube grid; writes the reports into `out_dir`."""
    classes = read_classes(classes_path)
    labels = read_labels(labels_path, classes)
    transform, shape, crs = cube_grid(xr.open_zarr(cube_path))
    with rasterio.open(class_tif) as src:
        if src.shape != shape or not src.transform.almost_equals(transform) or CRS(src.crs) != CRS(crs):
            raise CropflowError(
                f"the map {class_tif} ({src.shape}, {src.crs}) is not on the grid of the cube {cube_path} "
                f"({shape}, {crs}); predict the map from this cube again."
            )
        class_map = src.read(1)
    target, split = rasterize_labels(labels, transform, shape, crs)
    return evaluate_map(class_map, target, split, classes, out_dir)
