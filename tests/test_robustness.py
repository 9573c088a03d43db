"""Robustness report: a tiny model trained on the synthetic region of test_train, scored with dates hidden."""

from __future__ import annotations

import csv
import json

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from test_train import FAST, SMALL, write_synthetic_region
from torch.utils.data import DataLoader

from infra.storage import open_zarr
from tasks.dataset import PatchDataset, load_cube_arrays
from tasks.labels import cube_grid, rasterize_labels, read_classes, read_labels
from tasks.robustness import COLUMNS, FRACTIONS, GAP_MODES, robustness_report
from tasks.train import evaluate_patches, load_checkpoint, resolve_device, train_model

PATCH = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Region, trained checkpoint and the report written to its own folder."""
    region = write_synthetic_region(tmp_path_factory.mktemp("synthetic"))
    trained = train_model(
        region["cube"], region["labels"], region["classes"], tmp_path_factory.mktemp("train"), epochs=6, **FAST
    )
    out = tmp_path_factory.mktemp("robustness")
    args = (region["cube"], trained.checkpoint, region["labels"], region["classes"])
    report = robustness_report(*args, out, patch_size=PATCH, device="cpu")
    return {"region": region, "checkpoint": trained.checkpoint, "args": args, "out": out, "report": report}


def _row(report: dict, mode: str, fraction: float) -> dict:
    return next(r for r in report["rows"] if r["gap_mode"] == mode and r["missing_fraction"] == fraction)


def test_no_missing_date_equals_plain_evaluation(setup):
    region = setup["region"]
    classes = read_classes(region["classes"])
    ds = open_zarr(region["cube"], chunks=None)
    cube = load_cube_arrays(ds, *rasterize_labels(read_labels(region["labels"], classes), *cube_grid(ds)))
    model, ckpt = load_checkpoint(setup["checkpoint"], cube.bands, classes)
    mean, std = (np.asarray(ckpt["norm"][k], dtype=np.float32) for k in ("mean", "std"))
    test = PatchDataset(cube, mean, std, "test", "grid", PATCH)
    names = [c["name"] for c in classes]
    plain = evaluate_patches(model, DataLoader(test, batch_size=8), resolve_device("cpu"), len(names), names)
    assert plain["n_pixels"] == int((test.target >= 0).sum()) > 0
    for mode in GAP_MODES:
        row = _row(setup["report"], mode, 0.0)
        assert row["dates_hidden"] == 0
        assert row["n_pixels"] == 3 * plain["n_pixels"]  # three repeats pooled
        for key in ("overall_accuracy", "kappa", "macro_f1", "miou"):
            assert row[key] == pytest.approx(plain[key])


def test_metrics_do_not_improve_as_dates_go_missing(setup):
    report = setup["report"]
    assert [(r["gap_mode"], r["missing_fraction"]) for r in report["rows"]] == [
        (m, f) for m in GAP_MODES for f in FRACTIONS
    ]
    assert [r["dates_hidden"] for r in report["rows"]] == [0, 2, 4, 6, 8] * 2  # of 10 dates
    for mode in GAP_MODES:
        oa = [_row(report, mode, f)["overall_accuracy"] for f in FRACTIONS]
        miou = [_row(report, mode, f)["miou"] for f in FRACTIONS]
        assert oa[0] > 0.6  # the model learnt the classes
        # soft: the heavy-loss half does no better than the light-loss half, and 80 % loss hurts
        assert np.mean(oa[3:]) <= np.mean(oa[:2]) + 0.02 and np.mean(miou[3:]) <= np.mean(miou[:2]) + 0.02
        assert oa[-1] < oa[0] and miou[-1] < miou[0]


def test_reports_written_and_seeded(setup):
    out, report = setup["out"], setup["report"]
    assert sorted(p.name for p in out.iterdir()) == ["robustness.csv", "robustness.json", "robustness.png"]
    assert json.loads((out / "robustness.json").read_text()) == report
    assert report["patch_size"] == PATCH and report["num_dates"] == 10
    rows = list(csv.DictReader((out / "robustness.csv").open()))
    assert tuple(rows[0]) == COLUMNS and len(rows) == len(report["rows"])
    assert float(rows[7]["miou"]) == pytest.approx(report["rows"][7]["miou"])
    img = mpimg.imread(out / "robustness.png")
    assert img.shape[0] > 200 and img[..., :3].std() > 0.05
    # fixed seeds: one (mode, fraction) evaluated again gives the same row
    again = robustness_report(
        *setup["args"], out / "again", fractions=(0.4,), gap_modes=("contiguous",), patch_size=PATCH, device="cpu"
    )
    assert again["rows"] == [_row(report, "contiguous", 0.4)]
    with pytest.raises(ValueError, match="fractions in"):
        robustness_report(*setup["args"], out / "bad", fractions=(1.5,))


def test_hide_dates_needs_grid_patches_and_one_row_per_patch(setup):
    region = setup["region"]
    classes = read_classes(region["classes"])
    ds = open_zarr(region["cube"], chunks=None)
    cube = load_cube_arrays(ds, *rasterize_labels(read_labels(region["labels"], classes), *cube_grid(ds)))
    mean, std = np.zeros(4, np.float32), np.ones(4, np.float32)
    grid = PatchDataset(cube, mean, std, "test", "grid", PATCH)
    hidden = np.zeros((len(grid), 10), dtype=bool)
    hidden[:, [1, 4]] = True
    grid.hide_dates(hidden)
    _, _, valid, _ = grid[0]
    assert not valid[[1, 4]].any() and valid.any()
    with pytest.raises(ValueError, match="grid mode"):
        grid.hide_dates(hidden[:, :5])
    with pytest.raises(ValueError, match="grid mode"):
        PatchDataset(cube, mean, std, "train", "random", PATCH).hide_dates(hidden)


def test_an_s2_s1_model_loses_optical_dates_only(setup, tmp_path):
    """A `modality_distillation` model is scored with its S1 series, whose dates all stay."""
    region = setup["region"]
    kwargs = FAST | {"model_config": SMALL["modality_distillation"], "lr": 1e-2}
    trained = train_model(
        region["cube"], region["labels"], region["classes"], tmp_path, "modality_distillation", epochs=3, **kwargs
    )
    args = (region["cube"], trained.checkpoint, region["labels"], region["classes"], tmp_path / "report")
    report = robustness_report(
        *args, fractions=(0.0, 0.8), gap_modes=("contiguous",), repeats=1, patch_size=PATCH, device="cpu"
    )
    assert report["sensors"] == ["s2", "s1"] and [r["dates_hidden"] for r in report["rows"]] == [0, 8]

    classes = read_classes(region["classes"])
    ds = open_zarr(region["cube"], chunks=None)
    target_split = rasterize_labels(read_labels(region["labels"], classes), *cube_grid(ds))
    optical, sar = (load_cube_arrays(ds, *target_split, sensor) for sensor in ("s2", "s1"))
    model, ckpt = load_checkpoint(trained.checkpoint, optical.bands, classes, sar.bands)
    norms = [tuple(np.asarray(spec["norm"][k], np.float32) for k in ("mean", "std")) for spec in (ckpt, ckpt["sar"])]
    test = PatchDataset(optical, *norms[0], "test", "grid", PATCH, sar=sar, sar_norm=norms[1])
    names = [c["name"] for c in classes]
    plain = evaluate_patches(model, DataLoader(test, batch_size=8), resolve_device("cpu"), len(names), names)
    assert report["rows"][0]["overall_accuracy"] == pytest.approx(plain["overall_accuracy"])
    before = test[0]
    test.hide_dates(np.ones((len(test), 10), dtype=bool))
    after = test[0]
    assert not after[2].any() and before[2].any()  # every optical date hidden
    assert all(torch.equal(a, b) for a, b in zip(after[4:], before[4:], strict=True))  # S1 as it was


@pytest.mark.slow
def test_reports_published_as_artifacts_inside_a_flow(setup, prefect_server, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.evaluate import evaluate_map
    from tasks.robustness import robustness_report_task

    classes = [{"id": i, "name": n, "color": "#000000"} for i, n in enumerate("ab")]
    grid = np.array([[0, 1], [1, 1]])

    @flow
    def report_flow():
        evaluate_map(grid.astype(np.uint8), grid.astype(np.int16), np.full((2, 2), 3, np.uint8), classes, tmp_path)
        return robustness_report_task(*setup["args"], tmp_path, patch_size=PATCH, repeats=1, device="cpu")

    report = report_flow()
    with get_client(sync_client=True) as client:
        keys = ArtifactFilterKey(any_=["crop-map-accuracy", "robustness"])
        found = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=keys))}
    assert found["crop-map-accuracy"].type == "markdown" and "Area-adjusted" in found["crop-map-accuracy"].data
    assert found["robustness"].type == "table" and len(report["rows"]) == 10
    assert json.loads(found["robustness"].data)[0]["overall_accuracy"] == pytest.approx(
        report["rows"][0]["overall_accuracy"]
    )
