"""Tiled inference over a cube in Zarr, streamed block by block into a probabilities store.

One global grid of `window`-sized windows (stride `window - overlap`) covers the region, reflect-padded by
`overlap // 2` pixels at its edges. Each window's class **logits** are weighted by a cosine ramp over the overlap
and averaged, then turned into probabilities by one softmax per pixel: neighbouring windows fade into each other and
the mosaic has no seams. Averaging logits (rather than probabilities) is a normalised weighted geometric mean of the
windows' probabilities, in which a window sure of its class outweighs an unsure neighbour; it costs one
softmax per pixel instead of one per window pixel, and for the random forest (log class frequencies) it averages
log-frequencies.

The region is processed one block (`block_chunks` cube chunks a side) at a time, in vertical strips of
`STRIP_BLOCKS` blocks, row-major inside a strip (a block's left and upper neighbours come before it). A block runs
the windows whose first pixel in the region lies in it (read with their right and bottom halo) and blends every
window touching it; the logits of windows reaching into later blocks are kept until used (one or two rows of
windows along a strip and one column along the region's height), so each window runs once and a pixel's result
does not depend on the block size. Inputs are decoded and prepared per cube chunk, kept in an LRU of the chunks of a
strip's row of blocks and its halo, and the next block is read in a background thread while the model runs: memory
does not grow with the region's area.

The same region can be predicted in parts by several processes (`flows/predict.py` runs them on Dask workers):
`create_output` makes the output store once, `region_parts` splits the region into a grid of tiles of whole output
chunks, and `predict_part` predicts one tile into that store. A part runs every window touching it (on the same
region-wide grid), so a window straddling two parts runs in both, and it writes only its own chunks: the parts
together give the store `predict_region` writes in one piece.

Inputs follow `tasks.preprocess.prepare_window` (gaps filled in time, standardised, `valid` marks real
observations), as in training. A model with SAR input (`sar_channels`, e.g. `modality_distillation`) also gets the
checkpoint's `"sar"` sensor from the cube (`x_sar`, `doy_sar`, `valid_sar`, same grid and dates).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import torch
import xarray as xr
import zarr
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from rich.progress import Progress
from torch import nn

from infra.atomic import atomic_path
from infra.errors import CropflowError
from infra.runs import in_prefect_run
from infra.storage import location, open_zarr, unpack, zarr_store
from tasks.labels import CLASS_NODATA, read_classes
from tasks.preprocess import prepare_window
from tasks.train import autocast, load_for_cube, resolve_device

log = logging.getLogger(__name__)

NODATA = CLASS_NODATA
STRIP_BLOCKS = 2  # blocks are visited in vertical strips this many blocks wide, row-major inside a strip


def ramp_weights(window: int, overlap: int) -> np.ndarray:
    """`(window, window)` float32 blending weights: 1 inside, a cosine ramp over `overlap` pixels at each side.

    The falling ramp of a window and the rising ramp of its neighbour (at stride `window - overlap`) sum to 1.
    """
    r = np.ones(window, dtype=np.float64)
    if overlap > 0:
        rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)
        r[:overlap] = rise
        r[window - overlap :] = rise[::-1]
    return np.outer(r, r).astype(np.float32)


def window_starts(size: int, window: int, overlap: int) -> np.ndarray:
    """Start offsets of the windows covering `[0, size)` along one axis; the first starts `overlap // 2` before 0."""
    stride, pad = window - overlap, overlap // 2
    n = max(1, math.ceil((size + 2 * pad - window) / stride) + 1)
    return -pad + stride * np.arange(n)


def _blocks(lo: int, hi: int, block: int) -> list[tuple[int, int]]:
    return [(s, min(hi, s + block)) for s in range(lo, hi, block)]


def _touching(starts: np.ndarray, window: int, lo: int, hi: int) -> np.ndarray:
    return starts[(starts < hi) & (starts + window > lo)]


def _owned(starts: np.ndarray, lo: int, hi: int, start: int) -> np.ndarray:
    """Starts of the windows whose first pixel at or after `start` (the region's or part's first pixel) lies in
    `[lo, hi)`: the block that computes them."""
    first = np.maximum(starts, start)
    return starts[(first >= lo) & (first < hi)]


def _extent(owned: np.ndarray, window: int, lo: int, hi: int) -> np.ndarray:
    """Pixel indices a block reads along one axis: its core `[lo, hi)` and the windows it computes."""
    if owned.size:
        lo, hi = min(lo, int(owned[0])), max(hi, int(owned[-1]) + window)
    return np.arange(lo, hi)


class _Progress:
    """Rich progress bar (optional) and a Prefect progress artifact when running inside a flow or task run."""

    def __init__(self, total: int, show: bool, label: str) -> None:
        self.total, self.done = max(total, 1), 0
        self.bar = Progress(disable=not show)
        self.job = self.bar.add_task(label, total=total)
        self.artifact = create_progress_artifact(0.0, description=label) if in_prefect_run() else None

    def __enter__(self) -> _Progress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def step(self, n: int) -> None:
        self.done += n
        self.bar.advance(self.job, n)

    def flush(self) -> None:
        """Send the progress so far to Prefect (once per block, not per window)."""
        if self.artifact is not None:
            update_progress_artifact(self.artifact, 100.0 * self.done / self.total)


def _out_of_memory(exc: BaseException) -> bool:
    """True for a device or host allocation failure (`torch.OutOfMemoryError`, "out of memory", "can't allocate")."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


@dataclass(frozen=True)
class _Input:
    """One sensor's model input: the cube variable (the checkpoint's bands), its normalisation, and the keyword
    names of its `x`, `doy` and `valid` in `model.forward`."""

    var: xr.DataArray
    band_index: np.ndarray  # where the checkpoint's bands lie along the cube variable's band axis
    mean: np.ndarray
    std: np.ndarray
    keys: tuple[str, str, str]


def _sensor_input(ds: xr.Dataset, spec: dict, keys: tuple[str, str, str]) -> _Input:
    """`spec` = `{"sensor", "bands", "norm": {"mean", "std"}}` (a checkpoint or its `"sar"` entry) read from `ds`."""
    sensor = spec.get("sensor", "s2")
    if sensor not in ds:
        raise CropflowError(f"the cube has no {sensor!r} variable the model was trained on; rebuild the cube with it.")
    var = ds[sensor]
    band_dim = var.dims[1]
    bands = list(spec["bands"])
    cube_bands = [str(b) for b in var[band_dim].values]
    missing = sorted(set(bands) - set(cube_bands))
    if missing:
        raise CropflowError(f"the cube lacks bands {missing} the model was trained on; rebuild the cube with them.")
    mean = np.asarray(spec["norm"]["mean"], dtype=np.float32)
    std = np.asarray(spec["norm"]["std"], dtype=np.float32)
    if mean.shape != (len(bands),) or std.shape != (len(bands),):
        raise CropflowError(f"checkpoint norm has {mean.size} means / {std.size} stds for {len(bands)} bands.")
    band_index = np.array([cube_bands.index(b) for b in bands])
    return _Input(var.sel({band_dim: bands}), band_index, mean, std, keys)


def _model_inputs(ds: xr.Dataset, ckpt: dict, model: nn.Module) -> list[_Input]:
    """The optical input, plus the SAR input (checkpoint key `"sar"`) for a model with `sar_channels`."""
    inputs = [_sensor_input(ds, ckpt, ("x", "doy", "valid"))]
    if getattr(model, "sar_channels", None):
        if "sar" not in ckpt:
            raise CropflowError(
                f"{type(model).__name__} takes a SAR series but the checkpoint has no 'sar' entry "
                "({'sensor', 'bands', 'norm'}); save the SAR sensor, bands and normalisation with the model."
            )
        inputs.append(_sensor_input(ds, ckpt["sar"], ("x_sar", "doy_sar", "valid_sar")))
    return inputs


class _ChunkReader:
    """Model inputs `(x, valid)` of one sensor read by cube chunk: each chunk is decoded and prepared
    (`prepare_window`, per pixel) when first needed and kept in an LRU holding a strip's row of blocks with its
    halo, so that a chunk is decoded about `(STRIP_BLOCKS + 1) / STRIP_BLOCKS` times (once more as the right halo of
    the strip before), with memory independent of the region's size.
    """

    def __init__(self, inp: _Input, array: zarr.Array, extents: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """`array`: the cube variable of `inp` in the Zarr store, read directly (zarr's basic selection of a chunk
        takes 0.13 CPU-s where xarray's selection of the same bands takes 0.33); `extents`: the `(rows, cols)` of each
        strip's row of blocks; the LRU holds the chunks of the largest."""
        self.inp, self.array = inp, array
        self.every_band = np.array_equal(inp.band_index, np.arange(array.shape[1]))
        self.cy, self.cx = _chunks(inp)
        self.capacity = max((self._chunks_spanned(rows, cols) for rows, cols in extents), default=1)
        self.cache: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _chunks_spanned(self, rows: np.ndarray, cols: np.ndarray) -> int:
        h, w = self.inp.var.sizes["y"], self.inp.var.sizes["x"]
        ny = (min(int(rows[-1]), h - 1) // self.cy) - (max(int(rows[0]), 0) // self.cy) + 1
        nx = (min(int(cols[-1]), w - 1) // self.cx) - (max(int(cols[0]), 0) // self.cx) + 1
        return ny * nx

    def _chunk(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        if (i, j) in self.cache:
            self.cache.move_to_end((i, j))
        else:
            values = self.array[:, :, i * self.cy : (i + 1) * self.cy, j * self.cx : (j + 1) * self.cx]
            if not self.every_band:
                values = values[:, self.inp.band_index]
            values = unpack(values, self.inp.var.encoding)  # as the xarray readers decode it (packed reflectance)
            self.cache[(i, j)] = prepare_window(values, self.inp.mean, self.inp.std)
            if len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
        return self.cache[(i, j)]

    def read(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inputs of the contiguous index ranges `rows` x `cols`, which may run past the region: mirrored back into
        it (edge not repeated, as `np.pad(mode="reflect")`)."""
        var = self.inp.var
        h, w = var.sizes["y"], var.sizes["x"]
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        ya, yb, xa, xb = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
        x = np.empty((*var.shape[:2], yb - ya, xb - xa), dtype=np.float32)
        valid = np.empty((var.shape[0], yb - ya, xb - xa), dtype=bool)
        for i in range(ya // self.cy, (yb - 1) // self.cy + 1):
            for j in range(xa // self.cx, (xb - 1) // self.cx + 1):
                cx, cv = self._chunk(i, j)
                oy, ox = i * self.cy, j * self.cx
                y0, y1, x0, x1 = max(ya, oy), min(yb, oy + self.cy), max(xa, ox), min(xb, ox + self.cx)
                x[..., y0 - ya : y1 - ya, x0 - xa : x1 - xa] = cx[..., y0 - oy : y1 - oy, x0 - ox : x1 - ox]
                valid[:, y0 - ya : y1 - ya, x0 - xa : x1 - xa] = cv[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        pad = ((ya - r0, r1 - yb), (xa - c0, c1 - xb))
        if any(any(p) for p in pad):
            x, valid = np.pad(x, ((0, 0), (0, 0), *pad), mode="reflect"), np.pad(valid, ((0, 0), *pad), mode="reflect")
        return x, valid


def _create_store(path: Path, ds: xr.Dataset, classes: list[dict], chunks: tuple[int, int], model_name: str) -> None:
    """Empty output store (arrays, coordinates, attributes); data is written block by block afterwards.

    The `class` map shares its name with the class dimension, so xarray lists it among the coordinates;
    `ds["class"]` is still the `(y, x)` map.
    """
    k, h, w = len(classes), ds.sizes["y"], ds.sizes["x"]
    cy, cx = chunks
    template = xr.Dataset(
        {
            "probabilities": (("class", "y", "x"), da.empty((k, h, w), chunks=(k, cy, cx), dtype=np.float32)),
            "class": (("y", "x"), da.empty((h, w), chunks=(cy, cx), dtype=np.uint8)),
            "confidence": (("y", "x"), da.empty((h, w), chunks=(cy, cx), dtype=np.float32)),
        },
        coords={
            "class_id": ("class", np.array([c["id"] for c in classes], dtype=np.int16)),
            "class_name": ("class", np.array([c["name"] for c in classes], dtype=object)),
            "y": ds["y"].values,
            "x": ds["x"].values,
        },
        attrs={key: ds.attrs[key] for key in ("crs", "transform", "resolution", "region", "season") if key in ds.attrs}
        | {"classes": json.dumps(classes), "model_name": model_name},
    )
    template["probabilities"].attrs = {"long_name": "class probability", "nodata": "NaN"}
    template["class"].attrs = {"long_name": "most probable class id", "nodata": NODATA}
    template["confidence"].attrs = {"long_name": "probability of the most probable class", "nodata": "NaN"}
    encoding = {name: {"_FillValue": None} for name in ("probabilities", "class", "confidence")}  # no masking on read
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        template.to_zarr(path, zarr_format=3, mode="w", compute=False, consolidated=True, encoding=encoding)


@dataclass
class _Tiler:
    """Runs the model on windows and blends their logits, block by block (left and upper neighbours first).

    Each window is computed once, by the block holding its first pixel inside the region; its logits stay in
    `cache` until the last block it touches (to the right or below) has used them, so windows across block borders
    are not recomputed.
    """

    model: nn.Module
    keys: list[tuple[str, str, str]]
    weights: np.ndarray
    doy: torch.Tensor
    batch_size: int
    num_classes: int
    prog: _Progress
    cache: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def _run(self, inputs: list[tuple[np.ndarray, np.ndarray]], starts: list[tuple[int, int]], origin: tuple) -> None:
        window = self.weights.shape[0]
        (r0, c0), dev = origin, self.doy.device
        done = 0
        while done < len(starts):
            batch = starts[done : done + self.batch_size]
            kwargs = {}
            for (x, valid), (kx, kd, kv) in zip(inputs, self.keys, strict=True):
                spans = [(slice(sy - r0, sy - r0 + window), slice(sx - c0, sx - c0 + window)) for sy, sx in batch]
                kwargs[kx] = torch.from_numpy(np.stack([x[:, :, r, c] for r, c in spans])).to(dev)
                kwargs[kv] = torch.from_numpy(np.stack([valid[:, r, c] for r, c in spans])).to(dev)
                kwargs[kd] = self.doy.expand(len(batch), -1)
            try:
                with torch.inference_mode(), autocast(dev):
                    logits = self.model(**kwargs)
            except RuntimeError as exc:  # torch.OutOfMemoryError is one
                if not _out_of_memory(exc) or len(batch) == 1:
                    raise
                del kwargs
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                self.batch_size = len(batch) // 2  # halve what failed (a block's last batch may be short)
                log.warning("out of memory with %d windows per batch; retrying with %d", len(batch), self.batch_size)
                continue
            done += len(batch)
            if logits.shape[1:] != (self.num_classes, window, window):
                raise ValueError(
                    f"model returned {tuple(logits.shape)}, expected (B, {self.num_classes}, {window}, {window})"
                )
            self.cache.update(zip(batch, logits.float().cpu().numpy(), strict=True))
            self.prog.step(len(batch))

    def block(
        self,
        inputs: list[tuple[np.ndarray, np.ndarray]],
        origin: tuple[int, int],
        touching: tuple[np.ndarray, np.ndarray],
        owned: tuple[np.ndarray, np.ndarray],
        core: tuple[int, int, int, int],
    ) -> np.ndarray:
        """Probabilities `(K, h, w)` of a block's core from the blended logits, NaN where no window saw anything.

        `inputs` holds each sensor's model inputs `(x, valid)` of the block's pixels read from `origin` (region
        pixel coordinates, possibly negative); `touching` are the window starts over the core `(y0, y1, x0, x1)`,
        `owned` those this block computes. A pixel counts as observed when any sensor observed it at some date.
        """
        window = self.weights.shape[0]
        (r0, c0), (y0, y1, x0, x1) = origin, core
        observed = np.logical_or.reduce([valid.any(axis=0) for _, valid in inputs])
        new = [(sy, sx) for sy in owned[0] for sx in owned[1]]
        todo = [(sy, sx) for sy, sx in new if observed[sy - r0 : sy - r0 + window, sx - c0 : sx - c0 + window].any()]
        self.prog.step(len(new) - len(todo))  # windows without any observation are skipped
        self._run(inputs, todo, origin)
        acc = np.zeros((self.num_classes, y1 - y0, x1 - x0), dtype=np.float32)
        wsum = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
        for sy in touching[0]:
            for sx in touching[1]:
                z = self.cache.get((sy, sx))
                if z is None:  # not observed
                    continue
                ya, yb, xa, xb = max(sy, y0), min(sy + window, y1), max(sx, x0), min(sx + window, x1)
                wgt = self.weights[ya - sy : yb - sy, xa - sx : xb - sx]
                acc[:, ya - y0 : yb - y0, xa - x0 : xb - x0] += z[:, ya - sy : yb - sy, xa - sx : xb - sx] * wgt
                wsum[ya - y0 : yb - y0, xa - x0 : xb - x0] += wgt
                if sy + window <= y1 and sx + window <= x1:  # no later block needs it
                    del self.cache[(sy, sx)]
        ok = observed[y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] & (wsum > 0)
        probs = torch.softmax(torch.from_numpy(acc / np.where(ok, wsum, 1)), dim=0).numpy()
        return np.where(ok, probs, np.nan).astype(np.float32)


def _check_options(window: int, overlap: float, batch_size: int, block_chunks: int) -> int:
    """The overlap in pixels, once the options are checked."""
    if window < 1 or not 0 <= overlap < 1 or batch_size < 1 or block_chunks < 1:
        raise ValueError(
            "need window >= 1, 0 <= overlap < 1, batch_size >= 1, block_chunks >= 1; "
            f"got {window}, {overlap}, {batch_size}, {block_chunks}"
        )
    return min(round(window * overlap), window - 1)


def _classes(ckpt: dict) -> list[dict]:
    """The checkpoint's classes by id, refused when an id does not fit the uint8 class map beside its no-data."""
    classes = sorted(ckpt["classes"], key=lambda c: c["id"])
    if not all(0 <= c["id"] < NODATA for c in classes):
        raise CropflowError(f"class ids must lie in 0..{NODATA - 1} ({NODATA} marks no-data); renumber the classes.")
    return classes


def _chunks(inp: _Input) -> tuple[int, int]:
    """The `(y, x)` chunk of an input's cube variable, clipped to the region: the output store's chunk too."""
    chunks = inp.var.encoding.get("chunks") or (256, 256)
    return tuple(min(int(c), inp.var.sizes[d]) for c, d in zip(chunks[-2:], ("y", "x"), strict=True))


def create_output(cube_path: Path, ckpt: dict, store: Path, model_name: str) -> None:
    """The empty output store at `store` (a location) for the prediction of the cube at `cube_path` with `ckpt`'s
    classes and bands, chunked like the cube; `predict_part` fills it."""
    ds = open_zarr(cube_path, chunks=None)
    chunks = _chunks(_sensor_input(ds, ckpt, ("x", "doy", "valid")))
    _create_store(zarr_store(store), ds, _classes(ckpt), chunks, model_name)


def region_parts(cube_path: Path, ckpt: dict, n: int) -> list[tuple[int, int, int, int]]:
    """At most `n` parts of the region for `predict_part`: `(y0, y1, x0, x1)` rectangles of whole output chunks in a
    grid of nearly equal tiles, as many as allowed and, among such grids, the one with the shortest borders (a border
    costs a row or column of windows run on both sides); vertical strips when rows and columns tie."""
    ds = open_zarr(cube_path, chunks=None)
    inp = _sensor_input(ds, ckpt, ("x", "doy", "valid"))
    (cy, cx), (h, w) = _chunks(inp), (inp.var.sizes["y"], inp.var.sizes["x"])
    rows, cols = np.arange(math.ceil(h / cy)), np.arange(math.ceil(w / cx))
    grids = [(a, b) for a in range(1, rows.size + 1) for b in range(1, cols.size + 1) if a * b <= max(n, 1)]
    py, px = max(grids, key=lambda g: (g[0] * g[1], -(g[0] - 1) * w - (g[1] - 1) * h))
    return [
        (int(r[0]) * cy, min(h, (int(r[-1]) + 1) * cy), int(c[0]) * cx, min(w, (int(c[-1]) + 1) * cx))
        for r in np.array_split(rows, py)
        for c in np.array_split(cols, px)
    ]


def _predict_part(
    cube_path: Path,
    model: nn.Module,
    ckpt: dict,
    store: Path,
    part: tuple[int, int, int, int] | None,
    window: int,
    overlap: float,
    batch_size: int,
    device: str,
    progress: bool,
    block_chunks: int,
) -> int:
    """Predict the region's part `(y0, y1, x0, x1)` (all of it when None) into the output store at `store`; the
    windows visited.

    Every window touching the part is run (the window grid stays the region's), so a pixel's result does not depend
    on the part it lies in; only the part's own output chunks are written.
    """
    ov = _check_options(window, overlap, batch_size, block_chunks)
    ids = np.array([c["id"] for c in _classes(ckpt)], dtype=np.uint8)
    dev = resolve_device(device)
    model = model.to(dev).eval()

    ds = open_zarr(cube_path, chunks=None)
    inputs = _model_inputs(ds, ckpt, model)
    h, w = ds.sizes["y"], ds.sizes["x"]
    r0, r1, c0, c1 = part or (0, h, 0, w)
    cy, cx = _chunks(inputs[0])
    ys = _touching(window_starts(h, window, ov), window, r0, r1)
    xs = _touching(window_starts(w, window, ov), window, c0, c1)
    weights = ramp_weights(window, ov)
    blocks_y, blocks_x = _blocks(r0, r1, cy * block_chunks), _blocks(c0, c1, cx * block_chunks)
    doy = torch.from_numpy(ds["doy"].values.astype(np.int64))[None].to(dev)

    label = f"predict {location(cube_path).name}" + (f" rows {r0}-{r1} columns {c0}-{c1}" if part else "")
    with _Progress(ys.size * xs.size, progress, label) as prog:
        out = zarr.open_group(zarr_store(store), mode="r+", zarr_format=3)
        tiler = _Tiler(model, [i.keys for i in inputs], weights, doy, batch_size, ids.size, prog)
        plan, strip_rows = [], []  # blocks in visiting order; the extent of each strip's row of blocks
        for s0 in range(0, len(blocks_x), STRIP_BLOCKS):
            for y0, y1 in blocks_y:
                ty, oy = _touching(ys, window, y0, y1), _owned(ys, y0, y1, r0)
                rows = _extent(oy, window, y0, y1)
                for x0, x1 in blocks_x[s0 : s0 + STRIP_BLOCKS]:
                    tx, ox = _touching(xs, window, x0, x1), _owned(xs, x0, x1, c0)
                    plan.append(((y0, y1, x0, x1), (ty, tx), (oy, ox), (rows, _extent(ox, window, x0, x1))))
                first_col = plan[-min(STRIP_BLOCKS, len(blocks_x) - s0)][3][1][0]
                strip_rows.append((rows, np.arange(first_col, plan[-1][3][1][-1] + 1)))

        cube = zarr.open_group(zarr_store(cube_path, read_only=True), mode="r")
        readers = [_ChunkReader(i, cube[str(i.var.name)], strip_rows) for i in inputs]

        def load(extent: tuple[np.ndarray, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
            return [reader.read(*extent) for reader in readers]

        with ThreadPoolExecutor(1) as prefetch:  # reads and prepares the next block while the model runs
            pending = prefetch.submit(load, plan[0][3])
            for n, (core, touching, owned, (rows, cols)) in enumerate(plan):
                block = pending.result()
                if n + 1 < len(plan):
                    pending = prefetch.submit(load, plan[n + 1][3])
                probs = tiler.block(block, (rows[0], cols[0]), touching, owned, core)
                del block
                y0, y1, x0, x1 = core
                mapped = ~np.isnan(probs[0])
                out["probabilities"][:, y0:y1, x0:x1] = probs
                out["class"][y0:y1, x0:x1] = np.where(mapped, ids[np.argmax(np.nan_to_num(probs), axis=0)], NODATA)
                out["confidence"][y0:y1, x0:x1] = np.max(probs, axis=0)
                prog.flush()
    return int(ys.size * xs.size)


def predict_region(
    cube_path: Path,
    model: nn.Module,
    ckpt: dict,
    out_path: Path,
    window: int = 64,
    overlap: float = 0.25,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
    block_chunks: int = 1,
) -> Path:
    """Class probabilities, class and confidence maps of the cube at `cube_path`, written atomically to Zarr v3.

    `model` follows the cropflow model interface (it is put in eval mode on `device`); `ckpt` supplies `bands`,
    `sensor`, `norm` and `classes` (and `"sar"`: `{"sensor", "bands", "norm"}` for a model with SAR input).
    `overlap` is the fraction of `window` shared by neighbouring windows; a block is `block_chunks` cube chunks
    per side. Pixels without a valid observation (of any input sensor) at any date get class 255 and NaN
    probabilities/confidence. A batch that runs out of memory is run again at half the size (logged), down to 1.
    """
    _check_options(window, overlap, batch_size, block_chunks)
    with atomic_path(location(out_path)) as tmp:
        create_output(cube_path, ckpt, tmp, str(ckpt.get("model_name", type(model).__name__)))
        _predict_part(cube_path, model, ckpt, tmp, None, window, overlap, batch_size, device, progress, block_chunks)
    log.info("probabilities of %s written to %s", location(cube_path).name, out_path)
    return location(out_path)


def load_model(cube_path: Path, checkpoint: Path, classes_path: Path | None = None) -> tuple[nn.Module, dict]:
    """The checkpoint's model and dict, checked against the cube's bands, SAR bands and, if given, the class map."""
    classes = read_classes(classes_path) if classes_path else None  # None: the checkpoint's own classes
    return load_for_cube(checkpoint, open_zarr(cube_path), classes, cube_path)


def predict_part(
    cube_path: Path,
    checkpoint: Path,
    store: Path,
    part: tuple[int, int, int, int],
    classes_path: Path | None = None,
    window: int = 64,
    overlap: float = 0.25,
    batch_size: int = 16,
    device: str = "auto",
) -> int:
    """Predict one part of `region_parts` (`(y0, y1, x0, x1)`) into the store `create_output` made at `store`, in
    this process (e.g. a Dask worker); the windows visited. Torch's threads are the process's own: Dask starts worker
    processes with OMP_NUM_THREADS=1, so each part runs on one thread there.

    The checkpoint is read here, so only its path travels to a worker. Parts write disjoint output chunks, so any
    number of them can run at once; together they give the same store as `predict_region` in one piece.
    """
    model, ckpt = load_model(cube_path, checkpoint, classes_path)
    return _predict_part(cube_path, model, ckpt, store, part, window, overlap, batch_size, device, False, 1)


@task(name="predict-region", tags=["gpu"])
def predict_region_task(
    cube_path: Path,
    checkpoint: Path,
    out_path: Path,
    classes_path: Path | None = None,
    window: int = 64,
    overlap: float = 0.25,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Load the checkpoint (checked against the cube's bands, SAR bands and, if given, the class map) and predict
    the cube."""
    model, ckpt = load_model(cube_path, checkpoint, classes_path)
    return predict_region(cube_path, model, ckpt, out_path, window, overlap, batch_size, device, progress)


predict_part_task = task(name="predict-part", cache_policy=NO_CACHE, retries=1)(predict_part)
