"""Tiled inference (seamless blending, streaming, no-data) and the map exports (COGs, PNG preview, STAC item)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pystac
import pytest
import rasterio
import torch
import xarray as xr
import zarr
from affine import Affine
from pystac.extensions.classification import ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import RasterExtension
from pystac.validation.stac_validator import JsonSchemaSTACValidator
from torch import nn

from infra.storage import open_zarr
from tasks.export import (
    MAP_COLLECTION,
    write_class_cog,
    write_confidence_cog,
    write_map_catalog,
    write_map_item,
    write_preview_png,
)
from tasks.predict import _ChunkReader, _Input, predict_region, ramp_weights, window_starts
from tasks.preprocess import band_statistics, prepare_window

H, W, T = 150, 187, 6  # neither a multiple of the windows nor of the 64 px cube chunks
BANDS = ["B04", "B08", "B11"]
S1_BANDS = ["VV", "VH"]
CLASSES = [
    {"id": 0, "name": "winter wheat", "color": "#e6c84b"},
    {"id": 1, "name": "maize", "color": "#3c9c3c"},
    {"id": 2, "name": "sugar beet", "color": "#9c3c9c"},
    {"id": 3, "name": "grassland", "color": "#8fd18f"},
]
NO_OBS = (slice(0, 9), slice(0, 13))  # never observed: no-data in the map


def _truth() -> np.ndarray:
    """Parcels of 20 x 25 px with a pseudo-random class each."""
    yy, xx = np.mgrid[0:H, 0:W]
    return ((yy // 20) * 7 + (xx // 25) * 3 + (yy // 20) * (xx // 25)) % len(CLASSES)


def _cube(path: Path, rows: slice = slice(None), cols: slice = slice(None), chunk: int = 64) -> Path:
    """A cube in the layout of `tasks.cube`: class-specific seasonal profiles, noise, 25% clouds, one corner the
    optical sensor never sees, and a radar series (`s1`, dB) that sees it, missing 10% of the pixel-dates.

    `rows`, `cols` crop it before writing.
    """
    rng = np.random.default_rng(0)
    truth = _truth()
    t = np.arange(T)[:, None, None, None]
    b = np.arange(len(BANDS))[None, :, None, None]
    k = truth[None, None]
    signal = 0.1 + 0.05 * b + 0.08 * np.sin(2 * np.pi * t / T + k * 1.3 + b * 0.4) + 0.04 * k * (b == 1)
    values = (signal + rng.normal(0, 0.02, (T, len(BANDS), H, W))).astype(np.float32)
    cloudy = rng.random((T, 1, H, W)) < 0.25
    values = np.where(cloudy, np.nan, values)
    values[:, :, NO_OBS[0], NO_OBS[1]] = np.nan
    s1 = -15 + 1.5 * k + 3 * (np.arange(2)[None, :, None, None] == 0) + 2 * np.cos(2 * np.pi * t / T + k)
    s1 = (s1 + rng.normal(0, 0.5, (T, 2, H, W))).astype(np.float32)
    s1 = np.where(rng.random((T, 1, H, W)) < 0.1, np.nan, s1)
    ds = xr.Dataset(
        {
            "s2": (("time", "band", "y", "x"), values),
            "s2_valid": (("time", "y", "x"), (~np.isnan(values[:, 0])).astype(np.float32)),
            "s1": (("time", "s1_band", "y", "x"), s1),
            "s1_valid": (("time", "y", "x"), (~np.isnan(s1[:, 0])).astype(np.float32)),
        },
        coords={
            "time": pd.date_range("2024-03-01", periods=T, freq="30D"),
            "band": np.array(BANDS, dtype=object),
            "s1_band": np.array(S1_BANDS, dtype=object),
            "y": 5_000_000.0 - 5 - 10 * np.arange(H),
            "x": 600_000.0 + 5 + 10 * np.arange(W),
            "doy": ("time", (61 + 30 * np.arange(T)).astype("int16")),
        },
        attrs={
            "crs": "EPSG:32631",
            "transform": [10.0, 0.0, 600_000.0, 0.0, -10.0, 5_000_000.0],
            "resolution": 10.0,
            "region": "synthetic",
            "season": ["2024-03-01", "2024-10-31"],
        },
    )
    ds = ds.isel(y=rows, x=cols).chunk({"time": -1, "band": -1, "s1_band": -1, "y": chunk, "x": chunk})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.to_zarr(path, zarr_format=3, mode="w", consolidated=True)
    return path


class TinyConvNet(nn.Module):
    """Dates and bands stacked as channels, two 3x3 convolutions: a real (spatial) conv model of the interface."""

    def __init__(self, dates: int, bands: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dates * (bands + 1), 24, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(24, 24, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(24, num_classes, 1),
        )

    def forward(self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = x.shape
        return self.net(torch.cat([x, valid[:, :, None].to(x.dtype)], dim=2).reshape(b, t * (c + 1), h, w))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Small convolutions run faster on one thread; OpenMP threads on a busy 2-core runner spin and stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cube(tmp_path_factory.mktemp("cube") / "cube.zarr")


def _fit(model: nn.Module, values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> nn.Module:
    """`model` trained briefly (15 Adam steps) on part of the cube's values, in eval mode."""
    x, valid = prepare_window(values[..., 20:100, 40:120], mean, std)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, vt = torch.from_numpy(x)[None], torch.from_numpy(valid)[None]
    target = torch.from_numpy(_truth()[20:100, 40:120])[None]
    for _ in range(15):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xt, torch.zeros(1, T, dtype=torch.long), vt), target)
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(cube: Path) -> tuple[nn.Module, dict]:
    """The tiny net trained briefly on part of the cube (inputs from `prepare_window`), and its checkpoint dict."""
    values = open_zarr(cube)["s2"].values
    mean, std = band_statistics(values)
    torch.manual_seed(0)
    model = _fit(TinyConvNet(T, len(BANDS), len(CLASSES)), values, mean, std)
    ckpt = {
        "format": 1,
        "model_name": "tiny",
        "sensor": "s2",
        "bands": BANDS,
        "classes": CLASSES,
        "norm": {"mean": mean.tolist(), "std": std.tolist()},
    }
    return model.eval(), ckpt


@pytest.fixture(scope="module")
def tiled(cube: Path, trained: tuple[nn.Module, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, ckpt = trained
    out = tmp_path_factory.mktemp("pred") / "probabilities.zarr"
    return predict_region(cube, model, ckpt, out, window=48, overlap=0.25, batch_size=8, progress=False, block_chunks=1)


def test_ramp_weights_partition_unity_and_window_grid():
    w = ramp_weights(32, 8)
    r = w[0] / w[0].max()
    assert np.allclose(r[-8:] + r[:8], 1.0)  # a falling and the next rising ramp (stride 24) sum to 1
    assert w.min() > 0 and w[8:24, 8:24].min() == pytest.approx(1.0)
    starts = window_starts(100, 32, 8)
    assert starts[0] == -4 and np.all(np.diff(starts) == 24) and starts[-1] + 32 >= 104
    assert window_starts(10, 64, 16).tolist() == [-8]
    column = xr.DataArray(np.arange(5.0).reshape(1, 1, 5, 1).repeat(2, axis=3), dims=("time", "band", "y", "x"))
    column.encoding["chunks"] = (1, 1, 2, 1)
    stored = zarr.create_array(zarr.storage.MemoryStore(), data=column.values, chunks=column.encoding["chunks"])
    rows, cols = np.arange(-3, 8), np.arange(-1, 2)
    norm = np.zeros(1, np.float32), np.ones(1, np.float32)
    reader = _ChunkReader(_Input(column, np.arange(1), *norm, ("x", "doy", "valid")), stored, [])
    x, valid = reader.read(rows, cols)  # from six chunks, mirrored at the edges
    assert x[0, 0, :, 0].tolist() == [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1] and valid.all() and x.shape == (1, 1, 11, 3)
    two = xr.concat([column, 10 * column], dim="band")  # the checkpoint's bands: the cube's second, then its first
    stored = zarr.create_array(zarr.storage.MemoryStore(), data=two.values, chunks=(1, 2, 2, 1))
    reader = _ChunkReader(_Input(two, np.array([1, 0]), *(np.repeat(n, 2) for n in norm), ("x",) * 3), stored, [])
    x, _ = reader.read(np.arange(5), np.arange(2))
    assert x[0, :, :, 0].tolist() == [[0, 10, 20, 30, 40], [0, 1, 2, 3, 4]]


def test_tiled_prediction_matches_one_piece(cube, trained, tiled, tmp_path):
    model, ckpt = trained
    whole = predict_region(cube, model, ckpt, tmp_path / "whole.zarr", window=max(H, W), overlap=0.0, progress=False)
    a, b = open_zarr(tiled), open_zarr(whole)
    mapped = a["class"].values != 255
    truth = _truth()
    # the model is good, so agreement is not trivial
    assert (a["class"].values[mapped] == truth[mapped]).mean() > 0.95
    assert len(np.unique(a["class"].values[mapped])) == len(CLASSES)
    assert (a["class"].values == b["class"].values).mean() >= 0.995
    diff = np.abs(a["probabilities"].values - b["probabilities"].values)
    # at the region's edge the tiles see reflected context, the single window the model's zero padding
    assert np.nanmax(diff[:, 3:-3, 3:-3]) < 0.05 and np.nanmean(diff) < 1e-3


def test_block_size_does_not_change_the_result(cube, trained, tiled, tmp_path):
    model, ckpt = trained
    other = predict_region(
        cube, model, ckpt, tmp_path / "b3.zarr", window=48, overlap=0.25, batch_size=5, progress=False, block_chunks=3
    )
    a, b = open_zarr(tiled), open_zarr(other)
    np.testing.assert_allclose(a["probabilities"].values, b["probabilities"].values, atol=1e-5)
    np.testing.assert_array_equal(a["class"].values, b["class"].values)


def test_output_store_layout(cube, tiled):
    ds, src = open_zarr(tiled), open_zarr(cube)
    assert ds["probabilities"].dims == ("class", "y", "x") and ds["probabilities"].shape == (len(CLASSES), H, W)
    assert ds["probabilities"].dtype == np.float32 and ds["confidence"].dtype == np.float32
    assert ds["class"].dims == ("y", "x") and ds["class"].dtype == np.uint8
    np.testing.assert_array_equal(ds["x"].values, src["x"].values)
    np.testing.assert_array_equal(ds["y"].values, src["y"].values)
    assert ds.attrs["crs"] == "EPSG:32631" and ds.attrs["transform"] == src.attrs["transform"]
    assert ds["class_name"].values.tolist() == [c["name"] for c in CLASSES]
    assert json.loads(ds.attrs["classes"]) == CLASSES
    assert [p.name for p in tiled.parent.iterdir()] == ["probabilities.zarr"]  # the scratch copy was renamed
    probs, cls, conf = ds["probabilities"].values, ds["class"].values, ds["confidence"].values
    mapped = cls != 255
    np.testing.assert_allclose(probs[:, mapped].sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(cls[mapped], probs[:, mapped].argmax(axis=0))
    np.testing.assert_allclose(conf[mapped], probs[:, mapped].max(axis=0))


def test_pixels_never_observed_are_nodata(cube, tiled):
    ds = open_zarr(tiled)
    observed = (~np.isnan(open_zarr(cube)["s2"].values).any(axis=1)).any(axis=0)
    assert not observed[NO_OBS].any() and (~observed).sum() > NO_OBS[0].stop * NO_OBS[1].stop - 1
    np.testing.assert_array_equal(ds["class"].values == 255, ~observed)
    assert np.isnan(ds["confidence"].values[~observed]).all()
    assert np.isnan(ds["probabilities"].values[:, ~observed]).all()
    assert not np.isnan(ds["probabilities"].values[:, observed]).any()


@pytest.mark.parametrize("window", [64, 200])
def test_region_smaller_than_window(tmp_path, trained, window):
    model, ckpt = trained
    small = _cube(tmp_path / "small.zarr", slice(40, 63), slice(50, 81), chunk=16)
    out = predict_region(small, model, ckpt, tmp_path / "p.zarr", window=window, progress=False)
    cls = open_zarr(out)["class"].values
    assert cls.shape == (23, 31) and (cls != 255).mean() > 0.99
    assert (cls[cls != 255] == _truth()[40:63, 50:81][cls != 255]).mean() > 0.9


def test_missing_band_is_a_clear_error(cube, trained, tmp_path):
    from infra.errors import CropflowError

    model, ckpt = trained
    with pytest.raises(CropflowError, match=r"lacks bands \['B12'\]"):
        predict_region(cube, model, {**ckpt, "bands": [*BANDS[:2], "B12"]}, tmp_path / "p.zarr", progress=False)
    assert not list(tmp_path.iterdir())


def test_class_and_confidence_cogs(tiled, tmp_path):
    tif = write_class_cog(tiled, CLASSES, tmp_path / "crop_map.tif")
    ds = open_zarr(tiled)
    with rasterio.open(tif) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.profile["tiled"] and src.dtypes[0] == "uint8" and src.nodata == 255
        assert src.overviews(1) == [2] and src.compression is not None
        assert src.crs.to_string() == "EPSG:32631" and src.transform == Affine(*ds.attrs["transform"])
        cmap = src.colormap(1)
        assert cmap[1] == (60, 156, 60, 255) and cmap[255][3] == 0
        np.testing.assert_array_equal(src.read(1), ds["class"].values)
    conf = write_confidence_cog(tiled, tmp_path / "confidence.tif")
    with rasterio.open(conf) as src:
        assert src.dtypes[0] == "float32" and np.isnan(src.nodata) and src.overviews(1)
        np.testing.assert_array_equal(src.read(1), ds["confidence"].values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confidence.tif", "crop_map.tif"]


def test_preview_png_has_map_and_legend(tiled, tmp_path):
    tif = write_class_cog(tiled, CLASSES, tmp_path / "crop_map.tif")
    png = write_preview_png(tif, CLASSES, tmp_path / "crop_map.png", title="synthetic")
    img = mpimg.imread(png)[..., :3]
    assert img.shape[0] > 300 and img.std() > 0.05
    # from an array without class 2: its colour can only come from the legend; no grid -> axes in pixels
    arr = np.where(_truth() == 2, 0, _truth()).astype(np.uint8)
    png2 = write_preview_png(arr, CLASSES, tmp_path / "array.png")
    rgb = np.round(mpimg.imread(png2)[..., :3] * 255).astype(int)
    for c in CLASSES:
        colour = np.array([int(c["color"][i : i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(rgb - colour).sum(axis=-1) <= 3).sum() > 20, c["name"]


def test_stac_item_of_the_map(tiled, tmp_path):
    tif = write_class_cog(tiled, CLASSES, tmp_path / "crop_map.tif")
    conf = write_confidence_cog(tiled, tmp_path / "confidence.tif")
    out = tmp_path / "crop_map.stac.json"
    write_map_item(
        tif,
        CLASSES,
        "synthetic",
        (date(2024, 3, 1), date(2024, 10, 31)),
        out,
        assets={"confidence": conf},
        derived_from=["https://stac.example/items/s2-1"],
    )
    item = pystac.Item.from_file(str(out))
    JsonSchemaSTACValidator().validate_core(item.to_dict(transform_hrefs=False), pystac.STACObjectType.ITEM, "1.1.0")
    assert item.datetime is None
    assert str(item.common_metadata.start_datetime.date()) == "2024-03-01"
    assert str(item.common_metadata.end_datetime.date()) == "2024-10-31"
    lon0, lat0, lon1, lat1 = item.bbox
    assert 4.2 < lon0 < lon1 < 4.3 and 45.1 < lat0 < lat1 < 45.2  # UTM 31N, E 600 km, N 5000 km
    assert ProjectionExtension.ext(item).code == "EPSG:32631" and ProjectionExtension.ext(item).shape == [H, W]
    asset = item.assets["crop_map"]
    assert Path(asset.get_absolute_href()) == tif and asset.media_type == pystac.MediaType.COG
    assert json.loads(out.read_text())["assets"]["crop_map"]["href"] == "./crop_map.tif"
    classes = ClassificationExtension.ext(asset).classes
    assert [(c.value, c.title, c.color_hint) for c in classes[:-1]] == [
        (c["id"], c["name"], c["color"][1:].upper()) for c in CLASSES
    ]
    assert all(re.fullmatch(r"[0-9A-Za-z_-]+", c.name) for c in classes) and classes[0].name == "winter_wheat"
    assert classes[-1].value == 255 and classes[-1].nodata
    assert RasterExtension.ext(asset).bands[0].nodata == 255
    assert Path(item.assets["confidence"].get_absolute_href()) == conf
    assert [link.href for link in item.get_links("derived_from")] == ["https://stac.example/items/s2-1"]


def test_predict_task_from_a_checkpoint(cube, trained, tmp_path):
    """A 3D-FCN from the registry, saved as a checkpoint, loaded and run by the task; band/class checks apply."""
    from infra.errors import CropflowError
    from models.registry import build_model
    from tasks.predict import predict_region_task

    config = {"in_channels": len(BANDS), "num_classes": len(CLASSES), "widths": [8, 16]}
    model = build_model("fcn3d", **config)
    ckpt = {**trained[1], "model_config": config, "model_name": "fcn3d", "state_dict": model.state_dict()}
    torch.save(ckpt, tmp_path / "model.pt")
    out = predict_region_task.fn(
        cube, tmp_path / "model.pt", tmp_path / "probabilities.zarr", window=64, progress=False
    )
    ds = open_zarr(out)
    assert ds["class"].shape == (H, W) and ds.attrs["model_name"] == "fcn3d"
    assert np.isin(ds["class"].values, [0, 1, 2, 3, 255]).all()
    (tmp_path / "classes.json").write_text(json.dumps({"nodata": 255, "classes": CLASSES[:3]}))
    with pytest.raises(CropflowError, match="trained on classes"):
        predict_region_task.fn(cube, tmp_path / "model.pt", tmp_path / "p2.zarr", tmp_path / "classes.json")
    torch.save({**ckpt, "bands": ["B02", *BANDS[1:]]}, tmp_path / "other.pt")
    with pytest.raises(CropflowError, match="trained on bands"):
        predict_region_task.fn(cube, tmp_path / "other.pt", tmp_path / "p3.zarr")


def test_optical_and_sar_model_reads_both_series(cube, trained, tmp_path):
    """`modality_distillation` gets `s1` with the checkpoint's SAR bands (by name) and normalisation: with pixel-wise
    backbones the map equals one forward over the whole region, and pixels only the radar saw are mapped."""
    from infra.errors import CropflowError
    from models.registry import build_model
    from tasks.predict import predict_region_task
    from tasks.train import autocast

    ltae = {"embed_dims": [16], "d_model": 16, "n_head": 2, "d_k": 4, "mlp_dims": [16], "dropout": 0.0}
    config = {"in_channels": len(BANDS), "num_classes": len(CLASSES), "sar_channels": 2, "embed_dim": 8}
    config |= {"optical_backbone": "ltae", "optical_config": ltae, "sar_backbone": "ltae", "sar_config": ltae}
    torch.manual_seed(0)
    model = build_model("modality_distillation", **config).eval()
    ds = open_zarr(cube)
    sar = ds["s1"].sel(s1_band=["VH", "VV"]).values  # not the cube's band order
    sar_mean, sar_std = band_statistics(sar)
    ckpt = trained[1] | {"model_name": "modality_distillation"}
    with pytest.raises(CropflowError, match="no 'sar' entry"):
        predict_region(cube, model, ckpt, tmp_path / "p.zarr", progress=False)
    ckpt["sar"] = {"sensor": "s1", "bands": ["VH", "VV"], "norm": {"mean": sar_mean.tolist(), "std": sar_std.tolist()}}
    out = predict_region(cube, model, ckpt, tmp_path / "p.zarr", window=48, batch_size=8, progress=False)

    norm = [np.asarray(ckpt["norm"][k], np.float32) for k in ("mean", "std")]
    x, valid = (torch.from_numpy(a)[None] for a in prepare_window(ds["s2"].values, *norm))
    x_sar, valid_sar = (torch.from_numpy(a)[None] for a in prepare_window(sar, sar_mean, sar_std))
    doy = torch.from_numpy(ds["doy"].values.astype(np.int64))[None]
    with torch.inference_mode(), autocast(torch.device("cpu")):
        logits = model(x, doy, valid, x_sar, doy, valid_sar)
    expected = torch.softmax(logits.float(), dim=1)[0].numpy()
    result = open_zarr(out)
    np.testing.assert_allclose(result["probabilities"].values, expected, atol=0.02)
    assert (result["class"].values[NO_OBS] != 255).all()
    # the task loads the checkpoint, checking its SAR bands against the cube's
    torch.save(ckpt | {"model_config": config, "state_dict": model.state_dict()}, tmp_path / "model.pt")
    again = predict_region_task.fn(cube, tmp_path / "model.pt", tmp_path / "t.zarr", window=48, progress=False)
    np.testing.assert_allclose(open_zarr(again)["probabilities"].values, result["probabilities"].values, atol=1e-5)


def test_random_forest_map(cube, trained, tmp_path):
    """The forest (log class frequencies as logits) maps the region from the same `prepare_window` inputs."""
    from models.random_forest import RandomForest

    ckpt = trained[1] | {"model_name": "random_forest"}
    ds = open_zarr(cube)
    norm = [np.asarray(ckpt["norm"][k], np.float32) for k in ("mean", "std")]
    x, valid = (torch.from_numpy(a)[None] for a in prepare_window(ds["s2"].values[..., 20:100, 40:120], *norm))
    doy = torch.from_numpy(ds["doy"].values.astype(np.int64))[None]
    target = torch.from_numpy(_truth()[20:100, 40:120])[None]
    forest = RandomForest(len(BANDS), len(CLASSES), n_estimators=20, seed=0).fit(x, doy, valid, target)
    out = predict_region(cube, forest, ckpt, tmp_path / "p.zarr", window=48, batch_size=8, progress=False)
    cls = open_zarr(out)["class"].values
    held_out = np.ones((H, W), dtype=bool)
    held_out[20:100, 40:120] = False
    held_out &= cls != 255
    assert (cls[held_out] == _truth()[held_out]).mean() > 0.9


def test_map_item_is_found_in_the_local_stac_api(tiled, tmp_path, stac_api):
    """The item's catalog folder loads into the local STAC API; a search by place and date finds the map."""
    from pystac_client import Client

    from infra import stac_api as api

    tif = write_class_cog(tiled, CLASSES, tmp_path / "crop_map.tif")
    item_json = write_map_item(tif, CLASSES, "synthetic", (date(2024, 3, 1), date(2024, 10, 31)), tmp_path / "m.json")
    folder = write_map_catalog(tmp_path / "m.json", tmp_path / "stac")
    assert api.load(stac_api, folder) == {MAP_COLLECTION: 1}
    search = Client.open(stac_api.stac_url).search(
        collections=[MAP_COLLECTION], bbox=[4.25, 45.1, 4.3, 45.2], datetime="2024-06-01/2024-06-30"
    )
    [found] = list(search.items())
    assert found.id == item_json.id and found.collection_id == MAP_COLLECTION
    asset = found.assets["crop_map"]
    assert asset.href == tif.as_uri()
    assert [c.title for c in ClassificationExtension.ext(asset).classes][:-1] == [c["name"] for c in CLASSES]
    with rasterio.open(asset.href) as src:
        np.testing.assert_array_equal(src.read(1), open_zarr(tiled)["class"].values)
    assert not list(Client.open(stac_api.stac_url).search(collections=[MAP_COLLECTION], datetime="2023").items())


class CountingNet(TinyConvNet):
    """The tiny net, counting the windows it is run on."""

    windows = 0

    def forward(self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return super().forward(x, doy, valid)


def test_each_window_runs_once_across_blocks(cube, trained, tiled, tmp_path):
    """Windows straddling block borders are computed once (their logits reused), with the same result."""
    model, ckpt = trained
    counting = CountingNet(T, len(BANDS), len(CLASSES))
    counting.load_state_dict(model.state_dict())
    out = predict_region(cube, counting, ckpt, tmp_path / "p.zarr", window=48, progress=False, block_chunks=1)
    assert counting.windows == window_starts(H, 48, 12).size * window_starts(W, 48, 12).size
    np.testing.assert_allclose(
        open_zarr(out)["probabilities"].values, open_zarr(tiled)["probabilities"].values, atol=1e-5
    )


def test_parts_on_two_dask_workers_match_one_piece(prefect_server, cube, trained, tmp_path):
    """`flows.predict.predict_parts` on a Dask cluster of 2 workers (by its scheduler address; thread workers, which
    start in a moment): 2 parts (chunk columns 0-1 and 2 of the 64 px chunks), the checkpoint read by each worker,
    one store published, progress up to 100 %, and the same map as `predict_region` in one piece. Same windows and
    weights: equal up to float rounding of the batch composition (bit for bit on the bf16 CPU of the benchmarks).
    A checkpoint that does not fit the cube is refused before anything is written; parts failing on their workers (an
    undecodable input chunk) fail the run and leave the store published before as it was, and no scratch store."""
    from distributed import LocalCluster
    from prefect import flow, get_client
    from prefect.context import get_run_context

    from flows.predict import predict_parts
    from infra.dask_cluster import DaskSettings
    from infra.errors import CropflowError
    from models.registry import build_model
    from tasks.predict import create_output, load_model, predict_part, region_parts

    values, norm = open_zarr(cube)["s2"].values, trained[1]["norm"]
    config = {"in_channels": len(BANDS), "num_classes": len(CLASSES), "widths": [8, 16]}
    torch.manual_seed(0)
    fcn = _fit(build_model("fcn3d", **config), values, np.float32(norm["mean"]), np.float32(norm["std"]))
    ckpt = {**trained[1], "model_config": config, "model_name": "fcn3d", "state_dict": fcn.state_dict()}
    torch.save(ckpt, tmp_path / "m.pt")
    model, ckpt = load_model(cube, tmp_path / "m.pt")
    assert region_parts(cube, ckpt, 2) == [(0, H, 0, 128), (0, H, 128, W)]  # 3 x 3 chunks: strips, then tiles
    tiles = region_parts(cube, ckpt, 4)
    assert tiles == [(0, 128, 0, 128), (0, 128, 128, W), (128, H, 0, 128), (128, H, 128, W)]
    assert len(region_parts(cube, ckpt, 9)) == 9 and region_parts(cube, ckpt, 1) == [(0, H, 0, W)]
    options = {"window": 48, "batch_size": 8}
    whole = open_zarr(predict_region(cube, model, ckpt, tmp_path / "whole.zarr", progress=False, **options))
    create_output(cube, ckpt, tmp_path / "tiles.zarr", "fcn3d")  # 2 x 2 tiles, one after the other, in this process
    windows = [predict_part(cube, tmp_path / "m.pt", tmp_path / "tiles.zarr", t, **options) for t in tiles]
    assert windows == [4 * 4, 4 * 3, 2 * 4, 2 * 3]  # the windows touching each tile (5 x 6 in the region)
    by_tiles = open_zarr(tmp_path / "tiles.zarr")["probabilities"].values
    np.testing.assert_allclose(by_tiles, whole["probabilities"].values, rtol=0, atol=1e-6)

    torch.save({**ckpt, "bands": ["B02", *BANDS[1:]]}, tmp_path / "other.pt")

    @flow(name="predict-on-dask-test")
    def on_dask(address: str, checkpoint: Path, out: Path, cube_path: Path = cube) -> tuple[Path, str]:
        got = predict_parts(cube_path, checkpoint, out, **options, dask=DaskSettings(address))
        return got, str(get_run_context().flow_run.id)

    broken = tmp_path / "broken.zarr"  # the cube with one input chunk of the second part undecodable
    shutil.copytree(cube, broken)
    next(f for f in sorted((broken / "s2" / "c").rglob("2")) if f.is_file()).write_bytes(b"not a chunk")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with pytest.raises(CropflowError, match="trained on bands"):  # checked before any part runs
            on_dask(cluster.scheduler_address, tmp_path / "other.pt", tmp_path / "refused" / "probabilities.zarr")
        out, run_id = on_dask(cluster.scheduler_address, tmp_path / "m.pt", tmp_path / "out" / "probabilities.zarr")
        with pytest.raises(RuntimeError, match="decompression error"):  # its parts fail on their workers
            on_dask(cluster.scheduler_address, tmp_path / "m.pt", out, broken)
    assert not (tmp_path / "refused").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["probabilities.zarr"]  # no scratch store left
    # ... and the failed run left the store published before it as it was (compared with the one-piece map below)
    parts = open_zarr(out)
    mapped = whole["class"].values != 255
    assert mapped.mean() > 0.9 and len(np.unique(whole["class"].values[mapped])) == len(CLASSES)
    np.testing.assert_array_equal(parts["class"].values, whole["class"].values)
    np.testing.assert_allclose(parts["probabilities"].values, whole["probabilities"].values, rtol=0, atol=1e-6)
    np.testing.assert_allclose(parts["confidence"].values, whole["confidence"].values, rtol=0, atol=1e-6)
    assert parts.attrs == whole.attrs
    with get_client(sync_client=True) as client:
        progress = [a.data for a in client.read_artifacts() if str(a.flow_run_id) == run_id and a.type == "progress"]
    assert 100.0 in progress
