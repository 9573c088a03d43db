"""Accuracy of a crop map against held-out labels: confusion matrix, agreement metrics, CSV/PNG/JSON reports.

Rows of every confusion matrix are the reference (truth), columns the map (prediction).

Area-adjusted accuracy and class areas follow Olofsson et al. (2014), "Good practices for estimating area and
assessing accuracy of land change", Remote Sensing of Environment 148: 42-57: the map classes are the strata of a
stratified random sample, and each sample count is weighted by its stratum's share of the mapped area.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact
from pyproj import CRS

from infra.errors import CropflowError
from infra.runs import in_prefect_run
from infra.storage import location, open_raster, open_zarr, output_file
from tasks.figures import png_figure
from tasks.labels import CLASS_NODATA, SPLITS, cube_grid, rasterize_labels, read_classes, read_labels

NODATA = CLASS_NODATA
Z95 = 1.959964  # standard normal quantile of a two-sided 95 % confidence interval


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


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def area_adjusted_accuracy(
    cm: np.ndarray, mapped_pixels: np.ndarray, class_names: list[str], pixel_area_ha: float
) -> dict:
    """Stratified estimators of Olofsson et al. (2014), the map classes being the strata.

    `cm` holds the sample counts, rows = reference, columns = map (Olofsson's `n_ij`, map `i` and reference `j`,
    is its transpose); `mapped_pixels` the map's pixel count per class, giving the strata weights `W_i`.
    With `p_ij = W_i n_ij / n_i.` (their eq. 4): overall accuracy `sum p_ii` (eq. 1, variance eq. 5), user's
    accuracy `n_ii / n_i.` (eq. 2, eq. 6), producer's accuracy `p_jj / p_.j` (eq. 3, eq. 7), and each class's area
    `p_.j` x the mapped area (eq. 9-11) with its standard error and the half-width of its 95 % confidence interval.

    A mapped class without any sample leaves every estimate but the other user's accuracies undefined (`None`;
    listed in `unsampled_strata`); a stratum of one sample has no variance, so the standard errors are `None`.
    """
    n = np.asarray(cm, dtype=np.float64).T  # rows = map strata i, columns = reference j, as in the paper
    mapped = np.asarray(mapped_pixels, dtype=np.float64)
    k = len(class_names)
    if n.shape != (k, k) or mapped.shape != (k,):
        raise ValueError(f"sample counts {n.shape} and mapped pixels {mapped.shape} do not match {k} class names")
    if mapped.sum() <= 0 or (mapped < 0).any() or (n < 0).any():
        raise ValueError("mapped pixel counts and sample counts must be >= 0, with some mapped pixels")
    w = mapped / mapped.sum()
    n_i = n.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        empty = np.where(w[:, None] > 0, np.nan, np.zeros_like(n))  # an unsampled stratum is unknown if mapped
        row = np.divide(n, n_i[:, None], out=empty, where=n_i[:, None] > 0)
        var_row = row * (1 - row) / (n_i[:, None] - 1)  # variance of each n_ij / n_i. within its stratum
        p = w[:, None] * row
        area_p = p.sum(axis=0)
        ua, pa = np.diag(row), np.diag(p) / area_p
        wv = w[:, None] ** 2 * var_row
        others = wv.sum(axis=0) - np.diag(wv)
        pa_var = (np.diag(wv) * (1 - pa) ** 2 + pa**2 * others) / area_p**2
    total_ha = float(mapped.sum() * pixel_area_ha)
    area_se = np.sqrt(wv.sum(axis=0)) * total_ha
    return {
        "method": "Olofsson et al. (2014), stratified estimators, map classes as strata",
        "n_samples": int(n.sum()),
        "total_area_ha": total_ha,
        "overall_accuracy": _finite(np.trace(p)),
        "overall_accuracy_se": _finite(np.sqrt(np.trace(wv))),
        "per_class": {
            name: {
                "mapped_area_ha": float(mapped[j] * pixel_area_ha),
                "n_samples": int(n_i[j]),
                "area_ha": _finite(area_p[j] * total_ha),
                "area_se_ha": _finite(area_se[j]),
                "area_ci95_ha": _finite(Z95 * area_se[j]),
                "users_accuracy": _finite(ua[j]),
                "users_accuracy_se": _finite(np.sqrt(var_row[j, j])),
                "producers_accuracy": _finite(pa[j]),
                "producers_accuracy_se": _finite(np.sqrt(pa_var[j])),
            }
            for j, name in enumerate(class_names)
        },
        "area_proportions": [[_finite(v) for v in r] for r in p.T],  # rows = reference, columns = map
        "unsampled_strata": [name for j, name in enumerate(class_names) if w[j] > 0 and n_i[j] == 0],
    }


HEADLINE = ("overall_accuracy", "kappa", "macro_f1", "miou")  # the figures a map is summarised by


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def headline(metrics: dict) -> str:
    """`overall accuracy 0.974, kappa 0.969, macro-F1 0.951, mIoU 0.922` (kappa is "-" when undefined)."""
    names = ("overall accuracy", "kappa", "macro-F1", "mIoU")
    return ", ".join(f"{name} {_fmt(metrics.get(key))}" for name, key in zip(names, HEADLINE, strict=True))


def metrics_markdown(metrics: dict) -> str:
    """The metrics of `evaluate_map` as markdown: summary, per-class table and, if present, the area-adjusted table."""
    m = metrics
    lines = [
        f"## Accuracy on the {m['split']} split ({m['n_pixels']:,} pixels)",
        "",
        "| overall accuracy | kappa | macro-F1 | mIoU |",
        "| --- | --- | --- | --- |",
        f"| {_fmt(m['overall_accuracy'])} | {_fmt(m['kappa'])} | {_fmt(m['macro_f1'])} | {_fmt(m['miou'])} |",
        "",
        "| class | support | precision | recall | F1 | IoU |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {c['support']:,} | {_fmt(c['precision'])} | {_fmt(c['recall'])} | {_fmt(c['f1'])} "
        f"| {_fmt(c['iou'])} |"
        for name, c in m["per_class"].items()
    ]
    area = m.get("area_adjusted")
    if area:
        lines += [
            "",
            f"## Area-adjusted accuracy and class areas ({area['method']})",
            "",
            f"Sample: {area['sample']}. Overall accuracy {_fmt(area['overall_accuracy'])} "
            f"± {_fmt(area['overall_accuracy_se'])} (SE).",
            "",
            "| class | mapped area (ha) | estimated area (ha) | ± 95 % CI (ha) | user's accuracy ± SE "
            "| producer's accuracy ± SE |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {name} | {_fmt(c['mapped_area_ha'], 1)} | {_fmt(c['area_ha'], 1)} | {_fmt(c['area_ci95_ha'], 1)} "
            f"| {_fmt(c['users_accuracy'])} ± {_fmt(c['users_accuracy_se'])} "
            f"| {_fmt(c['producers_accuracy'])} ± {_fmt(c['producers_accuracy_se'])} |"
            for name, c in area["per_class"].items()
        ]
    return "\n".join(lines) + "\n"


def publish_metrics_markdown(metrics: dict, key: str = "crop-map-accuracy") -> bool:
    """`metrics_markdown` as a Prefect markdown artifact when inside a flow or task run; False (nothing) outside."""
    if not in_prefect_run():
        return False
    create_markdown_artifact(markdown=metrics_markdown(metrics), key=key, description="crop map accuracy")
    return True


def write_confusion_csv(cm: np.ndarray, class_names: list[str], out_csv: Path) -> Path:
    """Counts as CSV: header `truth \\ prediction, <names>`, one row per truth class (atomic write)."""
    with output_file(out_csv) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["truth \\ prediction", *class_names])
        for name, row in zip(class_names, np.asarray(cm), strict=True):
            writer.writerow([name, *(int(v) for v in row)])
    return location(out_csv)


def write_confusion_png(cm: np.ndarray, class_names: list[str], out_png: Path, title: str = "") -> Path:
    """Heatmap coloured by row-normalised share (recall per truth class), annotated with counts (atomic write)."""
    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    k = len(class_names)
    size = max(4.0, 0.6 * k + 2.5)
    with png_figure(out_png, figsize=(size + 1.2, size), dpi=100) as (fig, ax):
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
    return location(out_png)


def evaluate_map(
    class_map: np.ndarray,
    target: np.ndarray,
    split: np.ndarray,
    classes: list[dict],
    out_dir: Path,
    split_value: int = SPLITS["test"],
    pixel_area_ha: float = 0.01,
    sample: np.ndarray | None = None,
) -> dict:
    """Metrics of `class_map` on the pixels of `split == split_value` with a label (`target >= 0`).

    Labelled pixels the map left as no-data (255) are not scored; their number is reported as `unmapped_pixels`.
    `area_adjusted` holds the class areas and accuracies of `area_adjusted_accuracy` (Olofsson et al. 2014), the
    strata weights being the map's pixel counts per class (`pixel_area_ha` each, 0.01 ha for 10 m pixels). The
    sample is `sample` (counts, rows = reference, columns = map) when given: it must be a probability sample,
    e.g. stratified random by map class. Otherwise it is the scored pixels; test parcels are not a probability
    sample unless they were drawn as one, and their pixels are clustered, so those figures are indicative only
    (standard errors too small). Writes `metrics.json`, `confusion_matrix.csv` and `confusion_matrix.png` into
    `out_dir`, publishes the metrics as a Prefect markdown artifact inside a run, and returns the metrics.
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
    mapped_pixels = np.bincount(class_map[class_map != NODATA].ravel(), minlength=len(names))
    if mapped_pixels.size != len(names):
        raise ValueError(f"the map holds class ids beyond {len(names) - 1} other than no-data ({NODATA})")
    area = area_adjusted_accuracy(cm if sample is None else sample, mapped_pixels, names, pixel_area_ha)
    area["sample"] = (
        f"test parcels' pixels of the {split_name} split, not a probability sample: indicative only"
        if sample is None
        else "probability sample given by the caller"
    )
    metrics = {
        "split": split_name,
        "unmapped_pixels": int(unmapped.sum()),
        **accuracy_metrics(cm, names),
        "class_names": names,
        "confusion_matrix": cm.tolist(),
        "area_adjusted": area,
    }
    out_dir = location(out_dir)
    with output_file(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    write_confusion_csv(cm, names, out_dir / "confusion_matrix.csv")
    write_confusion_png(cm, names, out_dir / "confusion_matrix.png", title=f"confusion matrix, {split_name} split")
    publish_metrics_markdown(metrics)
    return metrics


@task(name="evaluate-map")
def evaluate_map_task(class_tif: Path, cube_path: Path, labels_path: Path, classes_path: Path, out_dir: Path) -> dict:
    """Score the class COG on the test parcels burnt onto the cube grid; writes the reports into `out_dir`.

    Class areas use the cube's pixel area (square metres of its projected CRS, in hectares).
    """
    classes = read_classes(classes_path)
    labels = read_labels(labels_path, classes)
    transform, shape, crs = cube_grid(open_zarr(cube_path))
    with open_raster(class_tif) as src:
        if src.shape != shape or not src.transform.almost_equals(transform) or CRS(src.crs) != CRS(crs):
            raise CropflowError(
                f"the map {class_tif} ({src.shape}, {src.crs}) is not on the grid of the cube {cube_path} "
                f"({shape}, {crs}); predict the map from this cube again."
            )
        class_map = src.read(1)
    target, split = rasterize_labels(labels, transform, shape, crs)
    pixel_area_ha = abs(transform.a * transform.e - transform.b * transform.d) / 10_000
    return evaluate_map(class_map, target, split, classes, out_dir, pixel_area_ha=pixel_area_ha)
