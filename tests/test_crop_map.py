"""The crop_map flow end to end on a tiny sample region, and bad input refused by the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from infra.settings import Settings
from infra.storage import open_zarr

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_sample(stac_api: Settings) -> Path:
    from flows.demo import ensure_sample

    return ensure_sample("sample-tiny")


def test_crop_map_end_to_end(stac_api: Settings, tiny_sample: Path, prefect_server, tmp_path, monkeypatch):
    """Search -> cube -> train -> tiled inference -> map: georeferenced like the cube, far better than chance. With
    a Dask cluster configured, the cube's tiles and the inference's part run on its workers."""
    from flows.crop_map import crop_map
    from flows.params import ModelSpec

    for name, value in {"CROPFLOW_DASK": "local", "CROPFLOW_DASK_WORKERS": "2", "CROPFLOW_DASK_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    model = ModelSpec(epochs=8, time_budget_s=None)
    outputs = crop_map(region="sample-tiny", model=model, outputs=out, robustness=True)
    keys = ("cube", "model", "probabilities", "crop_map", "confidence", "preview", "stac_item", "metrics", "robustness")
    for key in keys:
        assert Path(outputs[key]).exists(), key
    cube = open_zarr(outputs["cube"])
    with rasterio.open(outputs["crop_map"]) as src:
        assert src.crs.to_string() == cube.attrs["crs"]
        assert list(src.transform)[:6] == cube.attrs["transform"]
        assert (src.height, src.width) == (cube.sizes["y"], cube.sizes["x"])
        assert src.nodata == 255
        assert src.colormap(1)
        classes = src.read(1)
    assert np.isin(classes, np.arange(9)).mean() > 0.99
    metrics = json.loads(Path(outputs["metrics"]).read_text())
    n_classes = len(json.loads((tiny_sample / "classes.json").read_text())["classes"])
    # chance for a uniform guess is 1/K; the map must be far better on held-out parcels
    assert metrics["overall_accuracy"] > 3 / n_classes
    assert metrics["kappa"] > 0.3
    area = metrics["area_adjusted"]
    assert area["total_area_ha"] == pytest.approx(np.isin(classes, np.arange(9)).sum() * 0.01)
    robustness = json.loads(Path(outputs["robustness"]).read_text())
    assert [r["missing_fraction"] for r in robustness["rows"]] == [0.0, 0.2, 0.4, 0.6, 0.8] * 2
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        keys = ["crop-map-accuracy", "robustness"]
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
        parts = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="predict-part")))
    assert len(parts) == 1 and parts[0].state.is_completed()  # the 96 px cube is a single 256 px chunk: one part
    assert {(a.key, a.type) for a in found} == {("crop-map-accuracy", "markdown"), ("robustness", "table")}
    assert "Area-adjusted accuracy" in next(a.data for a in found if a.key == "crop-map-accuracy")


def test_cube_cache_key_includes_the_s2_cloud_mask(tmp_path):
    """Another `s2_cloud_mask` is another cube: the cube step's cache key differs per option, stable for each."""
    from flows.params import resolve_run
    from flows.steps import cube_key

    run = resolve_run("4.40,50.90,4.41,50.91", "2024-03-01..2024-03-15", tmp_path)
    query, items = {"catalog": "local", "sensors": ["s2"]}, {"s2": ["a", "b"]}
    keys = {mask: cube_key(run, query, items, mask) for mask in ("auto", "scl", "spectral")}
    assert len(set(keys.values())) == 3 and keys["auto"] == cube_key(run, query, items, "auto")


@pytest.fixture(scope="module")
def custom_regions(tmp_path_factory, tiny_sample: Path) -> Path:
    """The shipped region catalog plus broken entries, pointing at the tiny region's labels."""
    from flows.regions import CATALOG

    folder = tmp_path_factory.mktemp("catalog")
    meta = json.loads((tiny_sample / "region.json").read_text())
    good = {
        "bbox": meta["bbox"],
        "labels": str(tiny_sample / "labels.parquet"),
        "classes": str(tiny_sample / "classes.json"),
        "season": {"start": "2024-03-01", "end": "2024-10-31"},
    }
    regions = yaml.safe_load(CATALOG.read_text())["regions"] | {
        "far-away": {**good, "bbox": [30.0, -10.0, 30.05, -9.95]},
        "no-labels": {**good, "labels": str(folder / "missing.parquet")},
        "inverted": {**good, "bbox": [4.5, 50.9, 4.4, 51.0]},
        "no-season": {k: v for k, v in good.items() if k != "season"},
    }
    path = folder / "regions.yaml"
    path.write_text(yaml.safe_dump({"regions": regions}))
    return path


BAD_INPUT = [
    (["crop-map", "--region", "atlantis"], "unknown region 'atlantis'"),
    (["crop-map", "--region", "sample-tiny", "--season", "2024-13-01..2024-10-31"], "is not a date"),
    (["crop-map", "--region", "sample-tiny", "--season", "2024-08-01..2024-05-01"], "ends before it starts"),
    (["crop-map", "--region", "sample-tiny", "--season", "summer"], "is not a season"),
    (["crop-map", "--region", "sample-tiny", "--sensors", "s2,modis"], "unknown sensor 'modis'"),
    (["crop-map", "--region", "sample-tiny", "--season", "2019"], "no Sentinel-2 items"),
    (["crop-map", "--region", "far-away"], "do not overlap the cube extent"),  # labels off the region
    (["crop-map", "--region", "no-labels"], "missing.parquet"),
    (["crop-map", "--region", "inverted"], "inverted"),
    (["crop-map", "--region", "no-season"], "season.start and season.end"),
    (["stac", "load", "/nonexistent/region"], "has no items/ folder"),
    (["crop-map", "--region", "sample-tiny", "--s2-cloud-mask", "fmask"], "s2_cloud_mask='fmask'; choose one of"),
    (["build-cube", "--region", "sample-tiny", "--s2-cloud-mask", "SCL"], "s2_cloud_mask='SCL'; choose one of auto"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=["-".join(a[1:]) for a, _ in BAD_INPUT])
def test_bad_input_is_refused_cleanly(
    args, message, stac_api: Settings, custom_regions: Path, prefect_server, refused_cli, monkeypatch
):
    monkeypatch.setenv("CROPFLOW_REGIONS", str(custom_regions))
    outputs = stac_api.outputs_dir
    before = sorted(outputs.rglob("*")) if outputs.exists() else []
    code, output = refused_cli(args)
    assert code == 2, output
    assert message in output and "Traceback" not in output
    after = sorted(outputs.rglob("*")) if outputs.exists() else []
    assert after == before, "a refused run must leave no output behind"
