"""Robustness of a trained model to missing dates: test-parcel metrics as a growing fraction of the dates is lost.

Each grid patch of the test split (`tasks.dataset.PatchDataset`, scored by `tasks.train.evaluate_patches`) loses a
fraction of its optical dates, set to NaN before gap filling as if clouded over: dates drawn at random, or one
contiguous run (a long cloudy spell), from `models.masking.cloud_gap_mask` (Wang, Belgiu et al. 2025). A model that
also takes the S1 series (`modality_distillation`) keeps every S1 date: radar sees through clouds. Repeat `r` draws
its masks from seed `seed + r` whatever the fraction, so with random gaps the dates hidden at 40 % include those
hidden at 20 %. The metrics of each (gap mode, fraction) pool the pixels of every repeat.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from prefect import task
from prefect.artifacts import create_table_artifact
from torch.utils.data import ConcatDataset, DataLoader

from infra.runs import in_prefect_run
from infra.storage import location, open_zarr, output_file
from models.masking import cloud_gap_mask
from tasks.dataset import CubeArrays, PatchDataset, load_cube_arrays
from tasks.figures import png_figure
from tasks.labels import cube_grid, rasterize_labels, read_classes, read_labels
from tasks.train import SAR_SENSOR, SENSOR, evaluate_patches, load_for_cube, resolve_device

FRACTIONS = (0.0, 0.2, 0.4, 0.6, 0.8)
GAP_MODES = ("random", "contiguous")
COLUMNS = ("gap_mode", "missing_fraction", "dates_hidden", "overall_accuracy", "kappa", "macro_f1", "miou", "n_pixels")


def write_robustness_png(rows: list[dict], out_png: Path) -> Path:
    """Overall accuracy and mIoU against the fraction of missing dates, one line per gap mode (atomic write)."""
    with png_figure(out_png, nrows=1, ncols=2, figsize=(9, 3.6), dpi=100, sharex=True) as (fig, axes):
        for ax, key, label in zip(axes, ("overall_accuracy", "miou"), ("overall accuracy", "mIoU"), strict=True):
            for mode in dict.fromkeys(r["gap_mode"] for r in rows):
                pts = [(100 * r["missing_fraction"], r[key]) for r in rows if r["gap_mode"] == mode]
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{mode} gaps")
            ax.set_xlabel("missing dates (%)")
            ax.set_ylabel(label)
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle("test parcels: accuracy against missing dates")
        fig.tight_layout()
    return location(out_png)


def _model_input(
    ds: xr.Dataset, spec: dict, target: np.ndarray, split: np.ndarray
) -> tuple[CubeArrays, tuple[np.ndarray, np.ndarray]]:
    """A sensor's arrays in the band order of `spec` (a checkpoint or its `"sar"` entry) and its normalisation."""
    var = ds[spec["sensor"]]
    ordered = ds.assign({spec["sensor"]: var.sel({var.dims[1]: list(spec["bands"])})})
    norm = tuple(np.asarray(spec["norm"][k], dtype=np.float32) for k in ("mean", "std"))
    return load_cube_arrays(ordered, target, split, spec["sensor"]), norm


def robustness_report(
    cube_path: Path,
    checkpoint: Path,
    labels_path: Path,
    classes_path: Path,
    out_dir: Path,
    fractions: tuple[float, ...] = FRACTIONS,
    gap_modes: tuple[str, ...] = GAP_MODES,
    patch_size: int = 64,
    repeats: int = 3,
    batch_size: int = 8,
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """Test-split metrics of the model at `checkpoint` for each gap mode and fraction of missing dates.

    Writes `robustness.json` (settings and one row per mode and fraction, with per-class F1), `robustness.csv`
    (the rows' `COLUMNS`) and `robustness.png` into `out_dir`, atomically, and returns the JSON's content. At
    least one date of each patch stays (`cloud_gap_mask` caps the hidden dates at T - 1).
    """
    if repeats < 1 or not gap_modes or not fractions or not all(0 <= f <= 1 for f in fractions):
        raise ValueError(
            f"need repeats >= 1, gap modes and fractions in [0, 1]; got {repeats}, {gap_modes}, {fractions}"
        )
    classes = read_classes(classes_path)
    ds = open_zarr(cube_path, chunks=None)
    model, ckpt = load_for_cube(checkpoint, ds, classes, cube_path)
    target, split = rasterize_labels(read_labels(labels_path, classes), *cube_grid(ds))
    cube, (mean, std) = _model_input(ds, ckpt, target, split)
    sar = {}
    if "sar" in ckpt:  # a multi-modal model also gets the S1 series of each patch, never hidden
        sar_cube, sar_norm = _model_input(ds, ckpt["sar"], target, split)
        sar = {"sar": sar_cube, "sar_norm": sar_norm}
    names = [c["name"] for c in sorted(classes, key=lambda c: c["id"])]
    dev = resolve_device(device)
    model = model.to(dev)
    num_dates = len(cube.doy)

    rows = []
    for mode in gap_modes:
        for fraction in fractions:
            sets = []
            for r in range(repeats):
                patches = PatchDataset(cube, mean, std, "test", "grid", patch_size, **sar)
                gen = torch.Generator().manual_seed(seed + r)
                hidden = cloud_gap_mask(len(patches), num_dates, gen, fraction, mode).numpy()
                patches.hide_dates(hidden)
                sets.append(patches)
            m = evaluate_patches(model, DataLoader(ConcatDataset(sets), batch_size=batch_size), dev, len(names), names)
            rows.append(
                {
                    "gap_mode": mode,
                    "missing_fraction": float(fraction),
                    "dates_hidden": int(hidden.sum(axis=1).max()),
                    **{k: m[k] for k in COLUMNS[3:]},
                    "per_class_f1": {name: c["f1"] for name, c in m["per_class"].items()},
                }
            )
    report = {
        "checkpoint": str(checkpoint),
        "cube": str(cube_path),
        "split": "test",
        "sensors": [SENSOR, SAR_SENSOR] if sar else [SENSOR],
        "num_dates": num_dates,
        "patch_size": patches.patch,
        "repeats": repeats,
        "seed": seed,
        "rows": rows,
    }
    out_dir = location(out_dir)
    with output_file(out_dir / "robustness.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with output_file(out_dir / "robustness.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_robustness_png(rows, out_dir / "robustness.png")
    if in_prefect_run():
        table = [{k: r[k] for k in COLUMNS} for r in rows]
        create_table_artifact(table=table, key="robustness", description="test metrics against missing dates")
    return report


@task(name="robustness-report", tags=["gpu"])
def robustness_report_task(
    cube_path: Path,
    checkpoint: Path,
    labels_path: Path,
    classes_path: Path,
    out_dir: Path,
    patch_size: int = 64,
    repeats: int = 3,
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """`robustness_report` at the default fractions (0-80 %) and gap modes (random, contiguous)."""
    return robustness_report(
        cube_path,
        checkpoint,
        labels_path,
        classes_path,
        out_dir,
        patch_size=patch_size,
        repeats=repeats,
        seed=seed,
        device=device,
    )
