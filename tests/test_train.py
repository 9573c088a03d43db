"""Patch dataset, training loop, checkpoints and resume on a small synthetic cube."""

from __future__ import annotations

import csv
import gc
import itertools
import json
import pickle
import shutil
import time
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from shapely.geometry import box

from infra.errors import CropflowError
from infra.storage import open_zarr
from tasks.dataset import CubeArrays, PatchDataset, grid_starts, load_cube_arrays, make_loader, split_statistics
from tasks.labels import cube_grid, rasterize_labels, read_classes, read_labels
from tasks.train import (
    EVAL_PATCH_FACTOR,
    METRIC_COLUMNS,
    autocast,
    load_checkpoint,
    lr_factor,
    publish_metrics_artifact,
    train_model,
)

BANDS = ["B02", "B04", "B08", "B11"]
SAR_BANDS = ["VV", "VH"]
CLASS_NAMES = ["wheat", "maize", "grass"]
DATES = 10
SIZE = 48  # pixels per side
PARCEL = 8  # pixels per parcel side: a 6 x 6 grid of parcels
X0, Y0 = 600_000.0, 5_650_000.0
# a small model and short epochs keep a training run at a few seconds on 2 CPU cores
FAST = {
    "model_config": {"widths": [8, 16]},
    "patches_per_epoch": 32,
    "patch_size": 16,
    "batch_size": 8,
    "lr": 3e-3,
    "progress": False,
    "device": "cpu",
}


def class_of_parcel(row: int, col: int) -> int:
    return (row + col) % 3


def split_of_parcel(row: int) -> str:
    """Parcel rows 0-3 train, row 4 val, row 5 test: spatially blocked, every split holds every class."""
    return "train" if row < 4 else ("val" if row == 4 else "test")


def profiles() -> np.ndarray:
    """`(K, T, C)` reflectance: each class greens up (B08 rises, B04 falls) at a different date."""
    t = np.arange(DATES)
    green = np.exp(-(((t[None, :] - np.array([2, 5, 8])[:, None]) / 1.5) ** 2))  # (K, T)
    base = np.array([0.05, 0.08, 0.2, 0.2])
    amp = np.array([-0.02, -0.05, 0.3, -0.06])
    return (base + green[..., None] * amp).astype(np.float32)


def write_synthetic_region(folder: Path, seed: int = 0) -> dict[str, Path]:
    """A `(time, band, y, x)` cube in Zarr v3 per the contract, parcels in GeoParquet and classes.json."""
    rng = np.random.default_rng(seed)
    n = SIZE // PARCEL
    rows = cols = np.arange(SIZE) // PARCEL  # parcel row/column of each pixel row/column
    class_map = np.array([[class_of_parcel(r, c) for c in cols] for r in rows])
    values = np.moveaxis(profiles()[class_map], (0, 1), (2, 3)).copy()  # (H, W, T, C) -> (T, C, H, W)
    offsets = rng.normal(0, 0.01, size=(n, n, len(BANDS))).astype(np.float32)  # per-parcel variation
    values += np.moveaxis(offsets[rows][:, cols], -1, 0)[None]
    values += rng.normal(0, 0.015, size=values.shape).astype(np.float32)
    gaps = rng.random((DATES, SIZE, SIZE)) < 0.2  # scattered clouds
    gaps[3, :, : SIZE // 2] = True  # one date half covered
    values[np.broadcast_to(gaps[:, None], values.shape)] = np.nan
    times = pd.date_range("2024-04-01", periods=DATES, freq="10D")
    # SAR (dB): VV follows the class's green-up, VH a constant per class; no clouds, a little speckle
    sar = np.stack([-12 + 4 * values[:, 2] / 0.5, np.broadcast_to(-18.0 + class_map, values[:, 0].shape)], axis=1)
    sar = np.nan_to_num(sar, nan=-12.0) + rng.normal(0, 0.3, size=sar.shape)
    ds = xr.Dataset(
        {
            "s2": (("time", "band", "y", "x"), values.astype(np.float32)),
            "s2_valid": (("time", "y", "x"), (~gaps).astype(np.float32)),
            "s1": (("time", "s1_band", "y", "x"), sar.astype(np.float32)),
            "s1_valid": (("time", "y", "x"), np.ones((DATES, SIZE, SIZE), np.float32)),
        },
        coords={
            "time": times,
            "band": np.array(BANDS, dtype=object),
            "s1_band": np.array(SAR_BANDS, dtype=object),
            "y": Y0 - 5 - 10 * np.arange(SIZE, dtype=np.float64),
            "x": X0 + 5 + 10 * np.arange(SIZE, dtype=np.float64),
            "doy": ("time", np.asarray(times.dayofyear + 5, dtype=np.int16)),
        },
        attrs={
            "crs": "EPSG:32631",
            "transform": [10.0, 0.0, X0, 0.0, -10.0, Y0],
            "resolution": 10.0,
            "season": ["2024-04-01", "2024-07-09"],
        },
    )
    cube = folder / "cube.zarr"
    with warnings.catch_warnings():  # consolidated metadata, as the cube builder writes it, is not in the v3 spec
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.chunk({"time": -1, "band": -1, "s1_band": -1, "y": 32, "x": 32}).to_zarr(
            cube, zarr_format=3, mode="w", consolidated=True
        )
    records = [
        {
            "parcel_id": r * n + c + 1,
            "class_id": class_of_parcel(r, c),
            "class_name": CLASS_NAMES[class_of_parcel(r, c)],
            "split": split_of_parcel(r),
            "geometry": box(
                X0 + 10 * PARCEL * c, Y0 - 10 * PARCEL * (r + 1), X0 + 10 * PARCEL * (c + 1), Y0 - 10 * PARCEL * r
            ),
        }
        for r in range(n)
        for c in range(n)
    ]
    labels = folder / "labels.parquet"
    gpd.GeoDataFrame(records, crs="EPSG:32631").to_parquet(labels)
    classes = folder / "classes.json"
    colors = ["#e6c229", "#f17105", "#1a8fe3"]
    entries = [{"id": i, "name": name, "color": colors[i]} for i, name in enumerate(CLASS_NAMES)]
    classes.write_text(json.dumps({"nodata": 255, "classes": entries}))
    return {"cube": cube, "labels": labels, "classes": classes}


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_synthetic_region(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def cube_arrays(region):
    ds = open_zarr(region["cube"], chunks=None)
    classes = read_classes(region["classes"])
    target, split = rasterize_labels(read_labels(region["labels"], classes), *cube_grid(ds))
    return load_cube_arrays(ds, target, split)


@pytest.fixture(scope="module")
def trained(region, tmp_path_factory):
    """One short training run shared by the checkpoint tests: `(out_dir, result, seconds)`."""
    out = tmp_path_factory.mktemp("train")
    start = time.monotonic()
    result = train_model(region["cube"], region["labels"], region["classes"], out, epochs=6, **FAST)
    return out, result, time.monotonic() - start


def test_random_patches_centred_on_split_and_augmented(cube_arrays):
    mean, std = split_statistics(cube_arrays, "train")
    ds = PatchDataset(cube_arrays, mean, std, "train", "random", patch_size=16, num_patches=20, date_dropout=0.3)
    x, doy, valid, target = ds[0]
    assert x.shape == (DATES, len(BANDS), 16, 16) and x.dtype == torch.float32
    assert doy.shape == (DATES,) and valid.shape == (DATES, 16, 16) and valid.dtype == torch.bool
    assert target.shape == (16, 16) and target.dtype == torch.int64
    assert torch.isfinite(x).all()
    train_rows = 4 * PARCEL  # parcel rows 0-3 are training parcels
    for i in range(len(ds)):
        x, _, valid, target = ds[i]
        assert (target >= 0).any()
        # labels of val/test parcels never appear: rows >= 32 belong to them and must be -1 after any rotation
        assert set(target.unique().tolist()) <= {-1, 0, 1, 2}
    assert (ds.target[train_rows:] == -1).all() and (ds.target[:train_rows] >= 0).any()
    # the same item of the same epoch is reproducible, another epoch draws another patch
    a, b = ds[3], ds[3]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    ds.set_epoch(1)
    assert not torch.equal(ds[3][0], a[0])


def test_date_dropout_marks_dates_invalid(cube_arrays):
    mean, std = split_statistics(cube_arrays, "train")
    keep = PatchDataset(cube_arrays, mean, std, "train", "random", 16, 50, augment=False)
    drop = PatchDataset(cube_arrays, mean, std, "train", "random", 16, 50, augment=True, date_dropout=0.5)
    whole_dates_missing = [int((~v.any(dim=(1, 2))).sum()) for _, _, v, _ in (drop[i] for i in range(50))]
    baseline = [int((~v.any(dim=(1, 2))).sum()) for _, _, v, _ in (keep[i] for i in range(50))]
    assert np.mean(whole_dates_missing) > np.mean(baseline) + 2  # about half of 10 dates dropped
    assert max(whole_dates_missing) < DATES  # at least one date is kept


def test_grid_patches_score_each_val_pixel_once(cube_arrays):
    mean, std = split_statistics(cube_arrays, "train")
    ds = PatchDataset(cube_arrays, mean, std, "val", "grid", patch_size=20)
    assert grid_starts(SIZE, 20) == [0, 20, 28]
    counted = sum(int((ds[i][3] >= 0).sum()) for i in range(len(ds)))
    val_pixels = (cube_arrays.split == 2) & (cube_arrays.target >= 0)
    assert counted == int(val_pixels.sum()) > 0
    assert all(set(ds[i][3].unique().tolist()) <= {-1, 0, 1, 2} for i in range(len(ds)))


def test_split_statistics_use_training_pixels_only(cube_arrays):
    mean, std = split_statistics(cube_arrays, "train")
    train = cube_arrays.values[:, :, : 4 * PARCEL]
    np.testing.assert_allclose(mean, np.nanmean(train, axis=(0, 2, 3)), rtol=1e-4)
    val_mean, _ = split_statistics(cube_arrays, "val")
    assert not np.allclose(mean, val_mean, rtol=1e-4)
    assert std.shape == (len(BANDS),) and (std > 0).all()


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 100) for s in range(100)]
    assert factors[0] < factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    assert lr_factor(100, 100) == pytest.approx(0.0)


def test_training_learns_fast(trained):
    out, result, seconds = trained
    assert seconds < 30
    history = result.history
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    # three balanced classes: chance is about 1/3
    best = max(history, key=lambda h: h["val_miou"])
    assert best["val_oa"] > 0.85 and best["val_miou"] > 0.7
    assert result.best_epoch == best["epoch"] and result.best_val_miou == best["val_miou"]
    with open(out / "train_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == METRIC_COLUMNS
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    assert float(rows[2]["val_miou"]) == pytest.approx(history[2]["val_miou"])


def test_checkpoint_contract(trained, region, cube_arrays):
    out, result, _ = trained
    assert result.checkpoint == out / "model.pt"
    ckpt = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert {
        "format",
        "model_name",
        "model_config",
        "state_dict",
        "bands",
        "sensor",
        "classes",
        "norm",
        "epoch",
        "metrics",
        "cropflow_version",
        "optimizer",
    } <= ckpt.keys()
    assert ckpt["format"] == 1 and ckpt["model_name"] == "fcn3d" and ckpt["sensor"] == "s2"
    assert ckpt["bands"] == BANDS
    assert ckpt["classes"] == read_classes(region["classes"])
    assert ckpt["model_config"] == {"widths": [8, 16], "in_channels": 4, "num_classes": 3}
    assert len(ckpt["norm"]["mean"]) == len(ckpt["norm"]["std"]) == len(BANDS)
    assert ckpt["epoch"] == result.best_epoch and ckpt["metrics"]["val_miou"] == result.best_val_miou
    assert all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values())

    model, loaded = load_checkpoint(result.checkpoint, BANDS, read_classes(region["classes"]))
    assert not model.training and loaded["epoch"] == ckpt["epoch"]
    # the restored model reproduces the validation score of its epoch
    mean, std = (np.asarray(loaded["norm"][k], dtype=np.float32) for k in ("mean", "std"))
    val = PatchDataset(cube_arrays, mean, std, "val", "grid", patch_size=EVAL_PATCH_FACTOR * FAST["patch_size"])
    hits = total = 0
    with torch.inference_mode():
        for i in range(len(val)):
            x, doy, valid, target = val[i]
            with autocast(torch.device("cpu")):
                pred = model(x[None], doy[None], valid[None])[0].argmax(0)
            keep = target >= 0
            hits, total = hits + int((pred[keep] == target[keep]).sum()), total + int(keep.sum())
    assert hits / total == pytest.approx(ckpt["metrics"]["val_oa"], abs=1e-6)


def test_load_checkpoint_refuses_mismatches(trained, region):
    out, result, _ = trained
    classes = read_classes(region["classes"])
    with pytest.raises(CropflowError, match=r"bands .*\(missing \['B11'\]\)"):
        load_checkpoint(result.checkpoint, BANDS[:3], classes)
    with pytest.raises(CropflowError, match=r"\(extra \['B12'\]\)"):
        load_checkpoint(result.checkpoint, [*BANDS, "B12"], classes)
    renamed = [dict(c, name="rye") if c["id"] == 2 else c for c in classes]
    with pytest.raises(CropflowError, match=r"classes .*differing: \[\(2, 'grass'\), \(2, 'rye'\)\]"):
        load_checkpoint(result.checkpoint, BANDS, renamed)
    with pytest.raises(CropflowError, match="differing"):
        load_checkpoint(result.checkpoint, BANDS, classes[:2])
    with pytest.raises(CropflowError, match="not found"):
        load_checkpoint(out / "nothing.pt", BANDS, classes)


def test_resume_continues_at_next_epoch(trained, region, tmp_path):
    out, result, _ = trained
    shutil.copytree(out, tmp_path / "run", dirs_exist_ok=True)
    before = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    resumed = train_model(
        region["cube"], region["labels"], region["classes"], tmp_path / "run", epochs=8, resume=True, **FAST
    )
    assert [h["epoch"] for h in resumed.history] == list(range(1, 9))
    assert resumed.history[:6] == result.history  # earlier epochs are kept, not rerun
    after = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert after["epoch"] == 8
    steps_per_epoch = FAST["patches_per_epoch"] // FAST["batch_size"]
    first_state = next(iter(after["optimizer"]["state"].values()))
    assert int(first_state["step"]) == int(next(iter(before["optimizer"]["state"].values()))["step"]) + 2 * (
        steps_per_epoch
    )
    with open(tmp_path / "run" / "train_metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(1, 9))


def test_resume_refuses_other_model_settings(trained, region, tmp_path):
    out, _, _ = trained
    shutil.copytree(out, tmp_path / "run", dirs_exist_ok=True)
    with pytest.raises(CropflowError, match="resume with the same model settings"):
        train_model(
            region["cube"],
            region["labels"],
            region["classes"],
            tmp_path / "run",
            epochs=8,
            resume=True,
            **(FAST | {"model_config": {"widths": [8, 16, 32]}}),
        )


def test_time_budget_stops_after_current_epoch(region, tmp_path):
    budget = 0.5
    result = train_model(
        region["cube"], region["labels"], region["classes"], tmp_path, epochs=50, time_budget_s=budget, **FAST
    )
    seconds = [row["seconds"] for row in result.history]
    assert result.stop_reason == "time_budget" and 1 <= result.epochs_run < 50
    # it never starts an epoch it expects to overrun the budget with: at most one epoch's worth beyond it
    assert sum(seconds) <= budget + max(seconds)
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "train_metrics.csv").is_file()


def test_training_refuses_labels_without_val_parcels(region, tmp_path):
    labels = gpd.read_parquet(region["labels"])
    labels.loc[labels["split"] == "val", "split"] = "test"
    labels.to_parquet(tmp_path / "labels.parquet")
    with pytest.raises(CropflowError, match="no labelled val pixel"):
        train_model(region["cube"], tmp_path / "labels.parquet", region["classes"], tmp_path / "out", epochs=1, **FAST)


def test_metrics_artifact_skipped_outside_a_run():
    assert publish_metrics_artifact([{"epoch": 1, "loss": 1.0}], "test") is False


@pytest.mark.slow
def test_task_in_a_flow_publishes_metrics_table(region, prefect_server, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.train import train_model_task

    @flow
    def train_flow():
        return train_model_task(region["cube"], region["labels"], region["classes"], tmp_path, epochs=2, **FAST)

    result = train_flow()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-metrics"])))
    assert result.epochs_run == 2
    assert len(artifacts) == 1 and artifacts[0].type == "table"
    table = json.loads(artifacts[0].data)
    assert [row["epoch"] for row in table] == [1, 2]
    assert table[1]["val_miou"] == pytest.approx(result.history[1]["val_miou"])


@pytest.mark.slow
def test_cli_params_shape_the_trained_model_and_predict_loads_it(region, prefect_server, tmp_path):
    """`cropflow train --params` inline and from a YAML file: the checkpoint holds the merged config, its layers
    have the widths asked for, predict rebuilds it; other params are another cache key, so the model is retrained."""
    from test_distill import _run_folder
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.predict import predict_region_task

    bbox, season, run = _run_folder(region, tmp_path)
    where = ["--region", bbox, "--season", season, "--labels", str(region["labels"]), "--classes"]
    train = ["train", *where, str(region["classes"]), "--outputs", str(tmp_path), "--epochs", "1"]
    (tmp_path / "wide.yaml").write_text(json.dumps({"widths": [8, 16], "use_valid_channel": False}))
    configs, sizes = [], []
    for params, first_width in [('{"widths": [4, 8]}', 4), (str(tmp_path / "wide.yaml"), 8)]:
        result = CliRunner().invoke(app, [*train, "--params", params])
        assert result.exit_code == 0, result.output
        model, ckpt = load_checkpoint(run.out / "model.pt", BANDS, None)
        assert model.head.in_channels == first_width // 2  # the full-resolution features: widths[0] // 2
        configs.append(ckpt["model_config"])
        sizes.append(sum(p.numel() for p in model.parameters()))
        probs = predict_region_task.fn(run.out / "cube.zarr", run.out / "model.pt", tmp_path / f"p{first_width}.zarr")
        assert open_zarr(probs)["class"].shape == (SIZE, SIZE)
    assert configs == [
        {"widths": [4, 8], "in_channels": len(BANDS), "num_classes": 3},
        {"widths": [8, 16], "use_valid_channel": False, "in_channels": len(BANDS), "num_classes": 3},
    ]
    assert sizes[1] > 2 * sizes[0]


# Small configs: every registry model trains in a few seconds on 2 CPU cores.
LTAE = {"embed_dims": [16], "d_model": 16, "n_head": 4, "d_k": 4, "mlp_dims": [16], "decoder_dims": [16]}
STCLN = {"hidden": 8, "d_model": 16, "num_layers": 1, "num_heads": 2, "window": 16}
SMALL = {
    "ltae": LTAE,
    "tempcnn": {"widths": [16, 16], "hidden": 32},
    "utae": {"encoder_widths": [16, 16], "decoder_widths": [16, 16], "out_widths": [16], "n_head": 4, "d_model": 32},
    "stcln": STCLN,
    "joint_reconstruction": {"backbone": "ltae", "backbone_config": LTAE, "hidden_dim": 8, "heads": 2, "layers": 1},
    "modality_distillation": {"optical_config": LTAE, "sar_config": LTAE, "embed_dim": 8},
    "random_forest": {"n_estimators": 20, "max_depth": 8},
}


@pytest.fixture(autouse=True)
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_registry_model_trains(region, tmp_path, name):
    kwargs = FAST | {"model_config": SMALL[name], "lr": 1e-2, "patches_per_epoch": 24}
    result = train_model(region["cube"], region["labels"], region["classes"], tmp_path, name, epochs=6, **kwargs)
    history = result.history
    if name == "random_forest":
        assert result.stop_reason == "fitted" and len(history) == 1
    else:
        assert history[-1]["loss"] < history[0]["loss"]
    best = max(h["val_oa"] for h in history)
    assert best > 0.5  # three balanced classes: chance is about 1/3
    sar = SAR_BANDS if name == "modality_distillation" else None
    _, ckpt = load_checkpoint(result.checkpoint, BANDS, read_classes(region["classes"]), sar_bands=sar)
    assert ckpt["model_name"] == name and ("sar" in ckpt) == (sar is not None)


def test_multimodal_checkpoint_needs_the_sar_bands(region, tmp_path):
    kwargs = FAST | {"model_config": SMALL["modality_distillation"]}
    result = train_model(
        region["cube"], region["labels"], region["classes"], tmp_path, "modality_distillation", epochs=1, **kwargs
    )
    classes = read_classes(region["classes"])
    with pytest.raises(CropflowError, match=r"needs SAR bands \['VV', 'VH'\] but the cube has no SAR series"):
        load_checkpoint(result.checkpoint, BANDS, classes)
    with pytest.raises(CropflowError, match=r"SAR bands .*\(missing \['VH'\]\)"):
        load_checkpoint(result.checkpoint, BANDS, classes, sar_bands=["VV"])


def test_flips_keep_inputs_and_labels_aligned(cube_arrays):
    """A patch whose values, validity and target all hold the same asymmetric pattern stays consistent."""
    pattern = np.zeros((SIZE, SIZE), dtype=bool)
    pattern[2:5, 3:12] = True  # an L shape: no flip or rotation maps it onto itself
    pattern[5:14, 3:6] = True
    values = np.where(pattern, 1.0, 0.0).astype(np.float32)[None, None].repeat(DATES, 0).repeat(len(BANDS), 1)
    values[:, :, ~pattern & (np.arange(SIZE)[None, :] % 2 == 0)] = np.nan  # invalid on half the background
    target = np.where(pattern, 1, 0).astype(np.int16)
    cube = CubeArrays(values, cube_arrays.doy, BANDS, target, np.ones_like(cube_arrays.split))
    ds = PatchDataset(cube, np.zeros(4, np.float32), np.ones(4, np.float32), "train", "random", 16, 40, date_dropout=0)
    seen = set()
    for i in range(len(ds)):
        x, _, valid, target = ds[i]
        assert torch.equal(x[0, 0] == 1.0, target == 1) and torch.equal(x[3, 2] == 1.0, target == 1)
        assert (valid[:, target == 1]).all()  # the pattern is valid everywhere, after any flip
        seen.add(target.numpy().tobytes())
    assert len(seen) > 4  # several orientations were drawn


def test_cloud_gaps_and_random_crops(cube_arrays):
    mean, std = split_statistics(cube_arrays, "train")
    plain = PatchDataset(cube_arrays, mean, std, "train", "random", 16, 40, augment=False)
    cloudy = PatchDataset(
        cube_arrays, mean, std, "train", "random", 16, 40, date_dropout=0, cloud_gaps=(0.5, 0.5), flips=False
    )
    hidden = [int((~v.any(dim=(1, 2))).sum()) for _, _, v, _ in (cloudy[i] for i in range(40))]
    assert min(hidden) >= DATES // 2  # half the dates hidden, besides any cloudy date of the cube
    centred = PatchDataset(cube_arrays, mean, std, "train", "random", 16, 60, augment=False)
    cropped = PatchDataset(cube_arrays, mean, std, "train", "random", 16, 60, random_crop=True, date_dropout=0)
    # the same draws: the pixel is the same, but the crop puts it anywhere in the patch rather than at its centre
    origins = [(ds._random_origin(np.random.default_rng([0, 0, i])) for ds in (centred, cropped)) for i in range(60)]
    assert sum(a != b for a, b in origins) > 40
    assert len(plain) == 40


def test_workers_give_the_same_batches_and_cube_pickles(cube_arrays):
    clone = pickle.loads(pickle.dumps(cube_arrays))
    assert np.array_equal(clone.values, cube_arrays.values, equal_nan=True) and clone.bands == cube_arrays.bands
    mean, std = split_statistics(cube_arrays, "train")
    ds = PatchDataset(cube_arrays, mean, std, "train", "random", 16, 12, cloud_gaps=(0.0, 0.8), random_crop=True)
    batches = {}
    for workers in (0, 2):
        loader = make_loader(ds, 4, num_workers=workers, seed=3)
        batches[workers] = []
        for epoch in (0, 1):  # persistent workers learn the epoch from the sampler
            loader.sampler.set_epoch(epoch)
            batches[workers].append([b for batch in loader for b in batch])
        del loader  # stop the persistent workers now, not whenever the garbage collector gets to them
        gc.collect()
    for a, b in zip(batches[0], batches[2], strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(batches[2][0][0], batches[2][1][0])


def test_label_options_read_points_without_split(region, tmp_path):
    labels = gpd.read_parquet(region["labels"])
    points = labels.assign(geometry=labels.geometry.centroid).drop(columns=["split"])
    points.to_file(tmp_path / "points.gpkg")
    result = train_model(
        region["cube"],
        tmp_path / "points.gpkg",
        region["classes"],
        tmp_path / "out",
        epochs=1,
        label_options={"split_block_m": 160, "point_buffer_px": 2},
        **FAST,
    )
    assert result.epochs_run == 1 and (tmp_path / "out" / "model.pt").is_file()


def test_checkpoint_normalisation_comes_with_its_band_order() -> None:
    """A teacher trained on the cube's bands in another order sees its own order, with its own statistics."""
    from tasks.dataset import CubeArrays
    from tasks.train import TrainData

    values = np.stack([np.full((2, 3, 3), v, np.float32) for v in (1.0, 2.0, 3.0)], axis=1)  # T=2, C=3
    cube = CubeArrays(values, np.array([10, 20]), ["B02", "B03", "B04"], np.zeros((3, 3), np.int16), np.ones((3, 3)))
    data = TrainData(cube, [], (np.zeros(3, np.float32), np.ones(3, np.float32)))
    ckpt = {"bands": ["B04", "B02", "B03"], "norm": {"mean": [3.0, 1.0, 2.0], "std": [1.0, 1.0, 1.0]}}
    ordered = data.with_norm(ckpt)
    assert ordered.cube.bands == ["B04", "B02", "B03"]
    assert ordered.cube.values[0, :, 0, 0].tolist() == [3.0, 1.0, 2.0]
    assert np.allclose(ordered.cube.values - ordered.norm[0][None, :, None, None], 0)
    assert data.with_norm({**ckpt, "bands": ["B02", "B03", "B04"]}).cube is cube
