"""Protocol 5 of `cropflow bench accuracy`: real multi-sensor patches through the full path, leave-one-patch-out.

Every WorldCereal patch folder is imported (`tasks.worldcereal.import_patches`: COGs + STAC items), loaded into a
private local STAC API (`infra.stac_api`, PostgreSQL + pgstac on free ports, stopped afterwards), its items found
again by lon/lat box and season (`tasks.catalog.search_items`) and built into a cube (`tasks.cube.build_cube`:
S2 with SCL masking, S1, Landsat where the patch has it). Labels are the patch's `OUTPUT_POLY` raster: `CT` crop
types (0 = no label) where any patch has them, else `LC` land cover (0 and 99 = no label); classes are the codes.

For each patch in turn, the models are trained on the other patches (placed side by side on one grid, separated by
unlabelled columns so that no convolution sees two patches at once; the last quarter of each patch's columns is
the validation split for early stopping) and score every labelled pixel of the held-out patch: pixel OA, macro-F1
and per-class IoU, pooled over the held-out patches. The models use the S2 bands common to every patch (the 20 m
bands alone when a patch has no 10 m file).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from flows.bench_common import markdown_table
from infra import stac_api
from infra.errors import CropflowError
from infra.settings import Settings
from infra.storage import open_zarr
from models.losses import IoULoss
from models.registry import build_model
from tasks.catalog import get_catalog, search_items
from tasks.cube import build_cube
from tasks.dataset import CubeArrays, PatchDataset, load_cube_arrays, make_loader, split_statistics
from tasks.evaluate import accuracy_metrics
from tasks.labels import SPLITS
from tasks.sample_stac import lonlat_footprint
from tasks.train import (
    TrainData,
    TrainOptions,
    checkpoint_meta,
    confusion,
    datasets,
    fit_loop,
    load_best,
    model_config_for,
    model_inputs,
    val_scores,
)
from tasks.worldcereal import Patch, import_patches, open_product

S2_20M = ["B05", "B06", "B07", "B8A", "B11", "B12"]
SENSORS = {"s2": "sentinel-2-l2a", "s1": "sentinel-1-rtc", "landsat": "landsat-c2-l2"}
NO_LABEL = {"CT": (0,), "LC": (0, 99)}
SEAM = 8  # unlabelled columns between training patches
# Training of each model (CPU default configs). The 3-D FCN needs spatial context: 32 x 32 patches. The pixel-wise
# L-TAE sees each pixel alone, so 8 x 8 patches give it pixels from many more places for a sixteenth of the compute
# per patch (on 32 x 32 patches it took 300-500 s per held-out patch on this 2-core CPU).
MODELS = {
    "fcn3d": {"patch_size": 32, "patches_per_epoch": 32, "epochs": 15},
    "ltae": {"patch_size": 8, "patches_per_epoch": 64, "epochs": 30},
}
QUICK = {"patches_per_epoch": 16, "epochs": 3}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def label_layer(folders: list[Path]) -> str:
    """`CT` when any patch has a crop-type label, else `LC`."""
    for folder in folders:
        labels = open_product(folder, "OUTPUT_POLY-110_10m")
        if labels is not None and "CT" in labels and (labels["CT"].values > 0).any():
            return "CT"
    return "LC"


def patch_cubes(src: Path, work: Path) -> list[tuple[Patch, Path]]:
    """Every patch of `src` imported, served by a private local STAC API, searched and built into a cube."""
    patches = import_patches(src, work / "imported")
    home = work / "stac-home"
    home.mkdir(mode=0o711, parents=True, exist_ok=True)
    for folder in (work, home):
        folder.chmod(0o711)  # PostgreSQL, run as its own user under root, must traverse them
    ports = {_free_port(), _free_port()}
    while len(ports) < 2:
        ports.add(_free_port())
    settings = Settings(home=home, stac_port=ports.pop(), pg_port=ports.pop())
    only_20m = any(not any(Path(src, p.location_id).glob("S2_L2A_10m_*.nc")) for p in patches)
    cubes = []
    stac_api.up(settings)
    try:
        catalog = get_catalog("local", settings.stac_url)
        for patch in patches:
            stac_api.load(settings, patch.folder)
            start, end = (date.fromisoformat(d) for d in patch.season)
            bbox = tuple(lonlat_footprint(patch.bounds, patch.epsg)[0])
            items = {s: search_items(catalog, s, start, end, bbox=bbox) for s in SENSORS}
            items = {s: found for s, found in items.items() if found}
            bands = {"s2": S2_20M} if only_20m else {}
            out = work / "cubes" / f"{patch.location_id}.zarr"
            cubes.append((patch, build_cube(items, patch.epsg, patch.bounds, start, end, out, bands=bands)))
    finally:
        stac_api.down(settings)
    return cubes


def patch_arrays(src: Path, patch: Patch, cube: Path, layer: str) -> tuple[CubeArrays, np.ndarray]:
    """The cube's S2 arrays and the label codes (H, W) of the patch on the cube grid (0 = no label)."""
    ds = open_zarr(cube, chunks=None)
    labels = open_product(Path(src, patch.location_id), "OUTPUT_POLY-110_10m")
    if labels is None or layer not in labels:
        raise CropflowError(f"patch {patch.location_id} has no OUTPUT_POLY-110_10m file with a {layer} layer.")
    codes = labels[layer].sel(x=ds["x"], y=ds["y"], method="nearest").values.astype(np.int64)
    codes[np.isin(codes, NO_LABEL[layer])] = 0
    return load_cube_arrays(ds), codes


def stitch(parts: list[tuple[CubeArrays, np.ndarray]], classes: list[int]) -> CubeArrays:
    """Training patches side by side (`SEAM` unlabelled NaN columns between them), train / val splits per patch."""
    t = min(a.values.shape[0] for a, _ in parts)
    values, target, split = [], [], []
    for arrays, codes in parts:
        h, w = codes.shape
        tgt = np.where(codes > 0, np.searchsorted(classes, codes), -1).astype(np.int16)
        spl = np.full((h, w), SPLITS["train"], np.uint8)
        spl[:, w - w // 4 :] = SPLITS["val"]
        values += [arrays.values[:t], np.full((t, arrays.values.shape[1], h, SEAM), np.nan, np.float32)]
        target += [tgt, np.full((h, SEAM), -1, np.int16)]
        split += [spl, np.zeros((h, SEAM), np.uint8)]
    first = parts[0][0]
    return CubeArrays(
        np.concatenate(values[:-1], axis=3), first.doy[:t], first.bands, np.hstack(target[:-1]), np.hstack(split[:-1])
    )


def run_patches(src: Path, quick: bool, seed: int, patience: int, progress: Progress) -> dict:
    """Leave-one-patch-out pixel accuracy of `MODELS` on the patches of `src` (module docstring)."""
    folders = sorted(p.parent for p in Path(src).glob("*/S2_L2A_20m_*.nc"))
    if len(folders) < 2:
        raise CropflowError(
            f"--patches {src}: leave-one-patch-out needs at least 2 patch folders, found {len(folders)}."
        )
    layer = label_layer(folders)
    options = TrainOptions(batch_size=8, seed=seed, device="cpu", progress=False, patience=patience)
    with tempfile.TemporaryDirectory(prefix="cropflow-bench-patches-") as tmp:
        t0 = time.monotonic()
        cubes = patch_cubes(Path(src), Path(tmp))
        progress.console.log(
            f"{len(cubes)} patches imported, served and built into cubes ({time.monotonic() - t0:.0f} s)"
        )
        arrays = [patch_arrays(Path(src), patch, cube, layer) for patch, cube in cubes]
        classes = sorted({int(c) for _, codes in arrays for c in np.unique(codes) if c > 0})
        names = [f"{layer} {c}" for c in classes]
        cms = {name: np.zeros((len(classes), len(classes)), np.int64) for name in MODELS}
        job = progress.add_task("patches (leave one out)", total=len(arrays) * len(MODELS))
        for held in range(len(arrays)):
            train = stitch([a for i, a in enumerate(arrays) if i != held], classes)
            test_arrays, test_codes = arrays[held]
            test = CubeArrays(
                test_arrays.values,
                test_arrays.doy,
                test_arrays.bands,
                np.where(test_codes > 0, np.searchsorted(classes, test_codes), -1).astype(np.int16),
                np.full(test_codes.shape, SPLITS["test"], np.uint8),
            )
            data = TrainData(train, [{"id": i, "name": n} for i, n in enumerate(names)], split_statistics(train))
            for name, settings in MODELS.items():
                t0 = time.monotonic()
                model_options = dataclasses.replace(options, **settings, **(QUICK if quick else {}))
                cm = _train_and_score(name, data, test, model_options, os.path.join(tmp, f"{name}-{held}"))
                cms[name] += cm
                progress.advance(job)
                oa = np.trace(cm) / max(cm.sum(), 1)
                progress.console.log(f"{name} without patch {held + 1}: OA {oa:.3f} ({time.monotonic() - t0:.0f} s)")
    metrics = {name: accuracy_metrics(cm, names) for name, cm in cms.items()}
    summary = {
        name: {
            "overall_accuracy": m["overall_accuracy"],
            "macro_f1": m["macro_f1"],
            "miou": m["miou"],
            "iou": {c: m["per_class"][c]["iou"] for c in names},
            "support": {c: m["per_class"][c]["support"] for c in names},
        }
        for name, m in metrics.items()
    }
    return {
        "patches": [p.location_id for p, _ in cubes],
        "label_layer": layer,
        "classes": names,
        "models": summary,
        "markdown": _markdown(summary, names, len(cubes), layer),
    }


def _train_and_score(name: str, data: TrainData, test: CubeArrays, options: TrainOptions, out: str) -> np.ndarray:
    """Train `name` (its CPU default config) on `data` (soft IoU + cross-entropy, early stopping on the val split)
    and return the confusion matrix of the labelled pixels of `test` (whole-patch windows)."""
    dev = torch.device("cpu")
    config = model_config_for(name, None, data, dev)
    torch.manual_seed(options.seed)
    model = build_model(name, **config)
    train_ds, val_ds = datasets(data, options)
    val_loader = make_loader(val_ds, options.batch_size)
    loss_fn = IoULoss(ce_weight=0.5)
    result = fit_loop(
        model,
        lambda batch, step: loss_fn(model(*model_inputs(batch)), batch[3]),
        train_ds,
        lambda: val_scores(model, val_loader, dev, data.classes),
        checkpoint_meta(name, config, data),
        Path(out),
        options,
        dev,
        description=f"{name} on patches",
    )
    load_best(model, result)
    test_ds = PatchDataset(test, *data.norm, "test", "grid", max(test.target.shape))
    return confusion(model, make_loader(test_ds, 1), dev, len(data.classes))


def _markdown(summary: dict, names: list[str], n: int, layer: str) -> str:
    rows = [
        [
            model,
            *(f"{100 * m[key]:.1f}" for key in ("overall_accuracy", "macro_f1", "miou")),
            *("-" if m["iou"][c] is None else f"{100 * m['iou'][c]:.1f}" for c in names),
        ]
        for model, m in summary.items()
    ]
    header = ["model", "pixel OA %", "macro-F1 %", "mIoU %", *(f"IoU {c} %" for c in names)]
    support = ", ".join(f"{c}: {next(iter(summary.values()))['support'][c]}" for c in names)
    return "\n".join(
        [
            f"## 5. Real multi-sensor patches ({n} patches, leave-one-patch-out, {layer} labels, pixels pooled)\n",
            *markdown_table(header, rows),
            f"Labelled pixels per class: {support}.\n",
        ]
    )
