"""The crop_map flow with its cube and every output in a bucket of a real S3-compatible server (moto's)."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest

from infra import storage
from infra.settings import Settings

pytestmark = pytest.mark.slow


def test_crop_map_writes_cube_and_outputs_to_a_bucket(stac_api: Settings, bucket: str, prefect_server):
    from flows.crop_map import crop_map
    from flows.demo import ensure_sample
    from flows.params import ModelSpec

    ensure_sample("sample-tiny")
    root = f"{bucket}/runs"
    forest = ModelSpec(name="random_forest", params={"n_estimators": 20, "max_depth": 12}, epochs=1)  # fitted once
    outputs = crop_map(region="sample-tiny", sensors=["s2"], model=forest, outputs=root)

    run = f"{root}/sample-tiny/"
    for key in ("cube", "model", "probabilities", "crop_map", "confidence", "preview", "stac_item", "metrics"):
        assert outputs[key].startswith(run), (key, outputs[key])
        assert storage.location(outputs[key]).exists(), key
    cube = storage.open_zarr(outputs["cube"])
    probabilities = storage.open_zarr(outputs["probabilities"])
    assert cube["s2"].dims == ("time", "band", "y", "x") and cube["s2_valid"].notnull().all()
    with storage.open_raster(outputs["crop_map"]) as src:
        assert src.crs.to_string() == cube.attrs["crs"]
        assert list(src.transform)[:6] == cube.attrs["transform"]
        np.testing.assert_array_equal(src.read(1), probabilities["class"].values)
    metrics = json.loads(storage.location(outputs["metrics"]).read_text())
    assert 0 < metrics["overall_accuracy"] <= 1

    item = json.loads(storage.location(outputs["stac_item"]).read_text())
    assert item["assets"]["crop_map"]["href"] == "./crop_map.tif"
    catalog = storage.location(outputs["stac_catalog"]) / "items" / "cropflow-crop-maps.ndjson"
    hrefs = {a["href"] for a in json.loads(catalog.read_text())["assets"].values()}
    assert hrefs and all(h.startswith(run) for h in hrefs), hrefs

    objects = fsspec.filesystem("s3").find(bucket.removeprefix("s3://"))
    assert not [o for o in objects if ".tmp-" in o or ".partial" in o], "no scratch object may be left behind"
    assert not (stac_api.outputs_dir / "sample-tiny").exists(), "nothing of the run may land on the local disk"
