"""Training and validation patches from a cube held in memory, with the labels burnt onto its grid.

Random patches (training) are centred on labelled pixels of one split, drawn with class weights proportional to
the square root of each class's pixel count (rare crops are seen more often than their area alone would give).
Grid patches (validation) tile the region; each pixel is scored by one tile only. Without a split (`split=None`)
random patches fall anywhere on the cube and carry no label (masked pre-training on unlabelled pixels).

Items are reproducible whatever the DataLoader workers: item `i` of epoch `e` is drawn from `default_rng([seed, e,
i])`, and `EpochSampler` passes the epoch with each index, so persistent workers need no `set_epoch` of their copy.
The cube arrays are in memory (numpy, read once from Zarr by `load_cube_arrays`) and picklable: workers get them
by fork (shared pages) or pickling, and never reopen the store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr
from torch.utils.data import DataLoader, Dataset, Sampler

from infra.errors import CropflowError
from models.masking import cloud_gap_mask
from tasks.labels import SPLITS
from tasks.preprocess import band_statistics, prepare_window


@dataclass(frozen=True)
class CubeArrays:
    """A sensor's cube values in memory and the rasterized labels on the same grid."""

    values: np.ndarray  # (T, C, H, W) float32, NaN where the bin holds no valid observation
    doy: np.ndarray  # (T,) int64 day of year of each bin
    bands: list[str]
    target: np.ndarray  # (H, W) int16 class id, -1 = unlabelled or border
    split: np.ndarray  # (H, W) uint8: 0 none, 1 train, 2 val, 3 test


def load_cube_arrays(
    ds: xr.Dataset, target: np.ndarray | None = None, split: np.ndarray | None = None, sensor: str = "s2"
) -> CubeArrays:
    """Read `ds[sensor]` `(time, band, y, x)` into memory once, with its `doy` and band names.

    Without `target` and `split` every pixel is unlabelled (-1) and in no split (0). SAR (`s1`) loads the same way.
    """
    if sensor not in ds:
        raise CropflowError(f"the cube has no {sensor!r} variable; rebuild the cube with that sensor.")
    var = ds[sensor]
    band_dim = var.dims[1]
    values = var.transpose("time", band_dim, "y", "x").values.astype(np.float32, copy=False)
    target = np.full(values.shape[2:], -1, np.int16) if target is None else target
    split = np.zeros(values.shape[2:], np.uint8) if split is None else split
    if target.shape != values.shape[2:] or split.shape != values.shape[2:]:
        raise ValueError(f"target {target.shape} / split {split.shape} differ from the cube grid {values.shape[2:]}")
    return CubeArrays(
        values=values,
        doy=ds["doy"].values.astype(np.int64),
        bands=[str(b) for b in var[band_dim].values],
        target=target,
        split=split,
    )


def split_statistics(
    cube: CubeArrays, split: str | None = "train", max_pixels: int = 20_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-band `mean, std` (`tasks.preprocess.band_statistics`) of at most `max_pixels` pixels of one split
    (`None`: of all pixels)."""
    rows, cols = np.nonzero(cube.split == SPLITS[split] if split else np.ones_like(cube.split, dtype=bool))
    if rows.size == 0:
        raise CropflowError(f"no {split} parcel lies on the cube; the labels need {split} parcels inside the region.")
    if rows.size > max_pixels:
        pick = np.sort(np.random.default_rng(seed).choice(rows.size, size=max_pixels, replace=False))
        rows, cols = rows[pick], cols[pick]
    return band_statistics(cube.values[:, :, rows, cols][..., None], seed=seed)


def grid_starts(size: int, patch: int) -> list[int]:
    """Starts of `patch`-wide tiles covering `[0, size)`; the last tile is moved back to end at `size`."""
    starts = list(range(0, size - patch + 1, patch))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


class PatchDataset(Dataset):
    """Square patches of a `CubeArrays` as model inputs: `(x (T,C,P,P), doy (T,), valid (T,P,P), target (P,P))`,
    followed by `(x_sar (T',C',P,P), doy_sar (T',), valid_sar (T',P,P))` when `sar` is given (the same window).

    `mode="random"`: `num_patches` patches on labelled pixels of `split` (anywhere when `split` is None). With
    `augment`, before gap filling: dates set to NaN with probability `date_dropout` each, and simulated cloud
    gaps (`models.masking.cloud_gap_mask`, a rate drawn in `cloud_gaps` per patch, random or contiguous dates);
    `random_crop` puts the drawn pixel anywhere in the patch instead of at its centre; `flips` applies a random
    90° rotation and mirror to every array alike. `min_valid_fraction` redraws (up to 10 times) patches whose
    optical pixel-dates are less observed than that (a nearly cloud-free teacher set).
    `mode="grid"`: the tiles of a regular grid that hold labelled pixels of `split`.
    Target pixels outside `split` are -1. `mean`, `std` standardise the inputs (`tasks.preprocess.prepare_window`);
    `sar_norm` the SAR series'. Indices may be `(epoch, i)` pairs (`EpochSampler`).
    """

    def __init__(
        self,
        cube: CubeArrays,
        mean: np.ndarray,
        std: np.ndarray,
        split: str | None = "train",
        mode: str = "random",
        patch_size: int = 64,
        num_patches: int = 256,
        augment: bool = True,
        date_dropout: float = 0.2,
        seed: int = 0,
        *,
        cloud_gaps: tuple[float, float] | None = None,
        random_crop: bool = False,
        flips: bool = True,
        min_valid_fraction: float = 0.0,
        sar: CubeArrays | None = None,
        sar_norm: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        if mode not in ("random", "grid"):
            raise ValueError(f"mode must be 'random' or 'grid', got {mode!r}")
        if split is None and mode == "grid":
            raise ValueError("grid patches need a split")
        if (sar is None) != (sar_norm is None):
            raise ValueError("give both sar and sar_norm, or neither")
        h, w = cube.target.shape
        if sar is not None and sar.values.shape[2:] != (h, w):
            raise CropflowError(f"the SAR series grid {sar.values.shape[2:]} differs from the optical {(h, w)}.")
        self.cube, self.mean, self.std, self.mode = cube, mean, std, mode
        self.patch = min(patch_size, h, w)
        self.num_patches, self.augment, self.date_dropout, self.seed = num_patches, augment, date_dropout, seed
        self.cloud_gaps, self.random_crop, self.flips = cloud_gaps, random_crop, flips
        self.min_valid_fraction, self.sar, self.sar_norm = min_valid_fraction, sar, sar_norm
        self.epoch = 0
        self.hidden: np.ndarray | None = None
        self.labelled = split is not None
        self.target = np.full((h, w), -1, np.int16)
        if split:
            self.target = np.where(cube.split == SPLITS[split], cube.target, -1).astype(np.int16)
        labelled = self.target >= 0
        if split and not labelled.any():
            raise CropflowError(f"no labelled {split} pixel lies on the cube; the labels need {split} parcels there.")
        self.sar_doy = None if sar is None else torch.from_numpy(sar.doy)
        self.doy = torch.from_numpy(cube.doy)
        if mode == "random" and split:
            flat = self.target.ravel()
            order = np.argsort(flat, kind="stable")
            classes, first, counts = np.unique(flat[order], return_index=True, return_counts=True)
            keep = classes >= 0
            self.pixels_of = [order[f : f + n] for f, n in zip(first[keep], counts[keep], strict=True)]
            weights = np.sqrt(counts[keep].astype(np.float64))
            self.class_p = weights / weights.sum()
        elif mode == "grid":
            self.tiles = self._grid_tiles(labelled)

    def _grid_tiles(self, labelled: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """`(y0, x0, owned)` of every grid tile with labelled pixels it owns (overlaps go to the earlier tile)."""
        p = self.patch
        h, w = labelled.shape
        owner = np.zeros((h, w), dtype=bool)
        tiles = []
        for y0 in grid_starts(h, p):
            for x0 in grid_starts(w, p):
                owned = ~owner[y0 : y0 + p, x0 : x0 + p]
                owner[y0 : y0 + p, x0 : x0 + p] = True
                if (owned & labelled[y0 : y0 + p, x0 : x0 + p]).any():
                    tiles.append((y0, x0, owned))
        return tiles

    def set_epoch(self, epoch: int) -> None:
        """Draw the random patches of `epoch` (call before each training epoch)."""
        self.epoch = epoch

    def hide_dates(self, hidden: np.ndarray) -> None:
        """Grid mode: from now on set the dates `hidden[i]` of item `i` to NaN before gap filling, as cloudy dates.

        `hidden` is `(len(self), T)` bool, e.g. from `models.masking.cloud_gap_mask` (robustness to missing dates).
        """
        if self.mode != "grid" or hidden.shape != (len(self), self.cube.values.shape[0]):
            raise ValueError(f"hidden dates need grid mode and shape {(len(self), self.cube.values.shape[0])}")
        self.hidden = hidden.astype(bool)

    def __len__(self) -> int:
        return self.num_patches if self.mode == "random" else len(self.tiles)

    def _random_origin(self, rng: np.random.Generator) -> tuple[int, int]:
        h, w = self.target.shape
        p = self.patch
        best, best_fraction = (0, 0), -1.0
        for _ in range(10 if self.min_valid_fraction > 0 else 1):
            if self.labelled:
                pixels = self.pixels_of[rng.choice(len(self.pixels_of), p=self.class_p)]
                r, c = divmod(int(pixels[rng.integers(pixels.size)]), w)
            else:
                r, c = int(rng.integers(h)), int(rng.integers(w))
            dy, dx = (int(v) for v in rng.integers(p, size=2)) if self.random_crop else (p // 2, p // 2)
            origin = min(max(r - dy, 0), h - p), min(max(c - dx, 0), w - p)
            if self.min_valid_fraction <= 0:
                return origin
            window = self.cube.values[:, 0, origin[0] : origin[0] + p, origin[1] : origin[1] + p]
            fraction = float((~np.isnan(window)).mean())
            if fraction >= self.min_valid_fraction:
                return origin
            if fraction > best_fraction:
                best, best_fraction = origin, fraction
        return best

    def _hidden_dates(self, rng: np.random.Generator) -> np.ndarray:
        """Dates hidden by date dropout and simulated cloud gaps; at least one date stays."""
        t = self.cube.values.shape[0]
        hidden = rng.random(t) < self.date_dropout
        if self.cloud_gaps is not None:
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            hidden |= cloud_gap_mask(1, t, generator, rate=self.cloud_gaps)[0].numpy()
        if hidden.all():
            hidden[rng.integers(t)] = False
        return hidden

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        p = self.patch
        random = self.mode == "random"
        if random:
            rng = np.random.default_rng([self.seed, epoch, i])
            y0, x0 = self._random_origin(rng)
            target = self.target[y0 : y0 + p, x0 : x0 + p]
        else:
            y0, x0, owned = self.tiles[i]
            target = np.where(owned, self.target[y0 : y0 + p, x0 : x0 + p], -1)
        window = np.s_[..., y0 : y0 + p, x0 : x0 + p]
        values = self.cube.values[window]
        hidden = self._hidden_dates(rng) if random and self.augment else np.zeros(values.shape[0], dtype=bool)
        if self.hidden is not None:
            hidden = hidden | self.hidden[i]
        if hidden.any():
            values = values.copy()
            values[hidden] = np.nan
        arrays = [*prepare_window(values, self.mean, self.std), target.astype(np.int64)]
        if self.sar is not None:
            arrays += prepare_window(self.sar.values[window], *self.sar_norm)
        if random and self.augment and self.flips:
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            arrays = [np.rot90(a, k, axes=(-2, -1)) for a in arrays]
            if flip:
                arrays = [a[..., ::-1] for a in arrays]
        x, valid, target, *sar = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        if self.sar is None:
            return x, self.doy, valid, target
        return x, self.doy, valid, target, sar[0], self.sar_doy, sar[1]


class EpochSampler(Sampler[tuple[int, int]]):
    """Indices `(epoch, i)`, `i` in order, of a dataset of `length` items; `set_epoch` before each epoch.

    The epoch travels with each index, so `PatchDataset` copies held by persistent DataLoader workers draw the
    patches of the right epoch.
    """

    def __init__(self, length: int) -> None:
        self.length, self.epoch = length, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in range(self.length))


def make_loader(
    dataset: PatchDataset, batch_size: int, num_workers: int = 0, seed: int = 0, pin_memory: bool = False
) -> DataLoader:
    """DataLoader over `dataset` in order: random-mode datasets through an `EpochSampler` (`loader.sampler`),
    `num_workers` persistent worker processes seeded from `seed`. Workers are spawned, not forked: a flow run
    holds threads (Prefect, GDAL) that a forked child would inherit in an undefined state."""
    sampler = EpochSampler(len(dataset)) if dataset.mode == "random" else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        multiprocessing_context="spawn" if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
    )
