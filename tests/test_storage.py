"""Locations through fsspec: local paths unchanged, Zarr stores, files and rasters on a real S3-compatible server."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from affine import Affine

from infra import storage
from infra.errors import CropflowError
from infra.retry import HttpRetry


def test_locations_local_and_remote(tmp_path: Path):
    local = storage.location(tmp_path / "out")
    assert isinstance(local, Path) and storage.is_local(local) and local == tmp_path / "out"
    assert storage.location(f"file://{tmp_path}/out") == local
    remote = storage.location("s3://bucket/runs/cube.zarr")
    assert not storage.is_local(remote)
    assert (str(remote / "x"), remote.name, remote.protocol) == ("s3://bucket/runs/cube.zarr/x", "cube.zarr", "s3")
    with pytest.raises(CropflowError, match=r"unknown protocol 'ftp'.*s3://"):
        storage.location("ftp://host/x")


def test_missing_filesystem_package_is_named():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(CropflowError, match="gcsfs"):
            storage.location("gs://bucket/x")
    else:
        pytest.skip("gcsfs is installed here")


def _dataset() -> xr.Dataset:
    values = np.arange(2 * 6 * 5, dtype=np.float32).reshape(2, 6, 5)
    return xr.Dataset({"v": (("t", "y", "x"), values)}, attrs={"crs": "EPSG:32631"})


def test_zarr_store_on_s3_published_whole(bucket: str):
    url = f"{bucket}/run/probabilities.zarr"
    with storage.output_store(url) as store:
        _dataset().to_zarr(store, zarr_format=3, mode="w", consolidated=False)
        assert not storage.location(url).exists(), "readers must not see a store before it is complete"
    back = storage.open_zarr(url, consolidated=False)
    np.testing.assert_array_equal(back["v"].values, _dataset()["v"].values)
    assert back.attrs["crs"] == "EPSG:32631"
    assert [p.name for p in storage.location(f"{bucket}/run").iterdir()] == ["probabilities.zarr"]

    with pytest.raises(RuntimeError, match="model crashed"), storage.output_store(url) as store:
        (_dataset() * 2).to_zarr(store, zarr_format=3, mode="w", consolidated=False)
        raise RuntimeError("model crashed")
    np.testing.assert_array_equal(storage.open_zarr(url, consolidated=False)["v"].values, _dataset()["v"].values)
    assert [p.name for p in storage.location(f"{bucket}/run").iterdir()] == ["probabilities.zarr"]


def test_files_and_rasters_on_s3(bucket: str, tmp_path: Path):
    url = f"{bucket}/maps/crop_map.tif"
    data = np.arange(64, dtype=np.uint8).reshape(8, 8)
    with storage.output_file(url) as tmp:
        profile = {"driver": "GTiff", "width": 8, "height": 8, "count": 1, "dtype": "uint8", "crs": "EPSG:32631"}
        with rasterio.open(tmp, "w", transform=Affine(10, 0, 600000, 0, -10, 5650000), **profile) as dst:
            dst.write(data, 1)
    with storage.open_raster(url) as src:
        assert src.crs.to_epsg() == 32631 and src.transform.c == 600000
        np.testing.assert_array_equal(src.read(1), data)

    local = tmp_path / "model.pt"
    local.write_bytes(b"weights")
    assert storage.upload(local, f"{bucket}/maps/model.pt").read_bytes() == b"weights"

    storage.remove(f"{bucket}/maps")
    assert not storage.location(f"{bucket}/maps/crop_map.tif").exists()
    with pytest.raises(CropflowError, match=r"could not upload model\.pt to s3://no-such-bucket"):
        storage.upload(local, "s3://no-such-bucket/model.pt")


def test_upload_survives_a_server_restart(bucket: str, s3_server, tmp_path: Path, caplog):
    """The store goes away after the first objects and comes back: the upload resumes, nothing is lost."""
    import fsspec

    rng = np.random.default_rng(0)
    src = tmp_path / "stac"
    for i in range(40):
        path = src / ("items" if i % 2 else "collections") / f"part-{i:02d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.bytes(64 * 1024))
    dst = f"{bucket}/outputs/stac"
    watcher = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)

    def stop_midway_then_restart() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(watcher.find(dst.removeprefix("s3://"))) >= 5:
                break
            time.sleep(0.01)
        s3_server.stop()
        time.sleep(4)
        s3_server.start()

    thread = threading.Thread(target=stop_midway_then_restart)
    thread.start()
    with caplog.at_level(logging.WARNING, logger="infra.storage"):
        storage.upload(src, dst, retry=HttpRetry(retries=10, backoff=0.5, backoff_max=2.0, jitter=0.1))
    thread.join()
    assert any("retry" in r.getMessage() for r in caplog.records), "the outage must have been retried by cropflow"
    uploaded = sorted(watcher.find(dst.removeprefix("s3://")))
    expected = sorted(f"{dst.removeprefix('s3://')}/{p.relative_to(src).as_posix()}" for p in src.rglob("*.bin"))
    assert uploaded == expected
    for path in src.rglob("*.bin"):
        assert watcher.cat_file(f"{dst.removeprefix('s3://')}/{path.relative_to(src).as_posix()}") == path.read_bytes()
