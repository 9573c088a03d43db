"""Training and validation patches from a cube held in memory, with the labels burnt onto its grid.

Random patches (training) are centred on labelled pixels of one split, drawn with class weights proportional to
the square root of each class's pixel count (rare crops are seen more often than their area alone would give).
Grid patches (validation) tile the region; each pixel is scored by one tile only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr
from torch.utils.data import Dataset

from infra.errors import CropflowError
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


def load_cube_arrays(ds: xr.Dataset, target: np.ndarray, split: np.ndarray, sensor: str = "s2") -> CubeArrays:
    """Read `ds[sensor]` `(time, band, y, x)` into memory once, with its `doy` and band names."""
    if sensor not in ds:
        raise CropflowError(f"the cube has no {sensor!r} variable; rebuild the cube with that sensor.")
    var = ds[sensor]
    band_dim = var.dims[1]
    values = var.transpose("time", band_dim, "y", "x").values.astype(np.float32, copy=False)
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
    cube: CubeArrays, split: str = "train", max_pixels: int = 20_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-band `mean, std` (`tasks.preprocess.band_statistics`) of at most `max_pixels` pixels of one split."""
    rows, cols = np.nonzero(cube.split == SPLITS[split])
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
    """Square patches of a `CubeArrays` as model inputs: `(x (T,C,P,P), doy (T,), valid (T,P,P), target (P,P))`.

    `mode="random"`: `num_patches` patches centred on labelled pixels of `split`, with random flips/90° rotations
    and date dropout (each date of the patch set to NaN with probability `date_dropout`, before gap filling) when
    `augment`. Item `i` of epoch `e` is drawn from `default_rng([seed, e, i])`: reproducible, different per epoch.
    `mode="grid"`: the tiles of a regular grid that hold labelled pixels of `split`.
    Target pixels outside `split` are -1. `mean`, `std` standardise the inputs (`tasks.preprocess.prepare_window`).
    """

    def __init__(
        self,
        cube: CubeArrays,
        mean: np.ndarray,
        std: np.ndarray,
        split: str = "train",
        mode: str = "random",
        patch_size: int = 64,
        num_patches: int = 256,
        augment: bool = True,
        date_dropout: float = 0.2,
        seed: int = 0,
    ) -> None:
        if mode not in ("random", "grid"):
            raise ValueError(f"mode must be 'random' or 'grid', got {mode!r}")
        h, w = cube.target.shape
        self.cube, self.mean, self.std, self.mode = cube, mean, std, mode
        self.patch = min(patch_size, h, w)
        self.num_patches, self.augment, self.date_dropout, self.seed = num_patches, augment, date_dropout, seed
        self.epoch = 0
        self.target = np.where(cube.split == SPLITS[split], cube.target, -1).astype(np.int16)
        labelled = self.target >= 0
        if not labelled.any():
            raise CropflowError(f"no labelled {split} pixel lies on the cube; the labels need {split} parcels there.")
        self.doy = torch.from_numpy(cube.doy)
        if mode == "random":
            flat = self.target.ravel()
            order = np.argsort(flat, kind="stable")
            classes, first, counts = np.unique(flat[order], return_index=True, return_counts=True)
            keep = classes >= 0
            self.pixels_of = [order[f : f + n] for f, n in zip(first[keep], counts[keep], strict=True)]
            weights = np.sqrt(counts[keep].astype(np.float64))
            self.class_p = weights / weights.sum()
        else:
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

    def __len__(self) -> int:
        return self.num_patches if self.mode == "random" else len(self.tiles)

    def _random_origin(self, rng: np.random.Generator) -> tuple[int, int]:
        h, w = self.target.shape
        pixels = self.pixels_of[rng.choice(len(self.pixels_of), p=self.class_p)]
        r, c = divmod(int(pixels[rng.integers(pixels.size)]), w)
        half = self.patch // 2
        return min(max(r - half, 0), h - self.patch), min(max(c - half, 0), w - self.patch)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.patch
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, self.epoch, i])
            y0, x0 = self._random_origin(rng)
            target = self.target[y0 : y0 + p, x0 : x0 + p]
        else:
            y0, x0, owned = self.tiles[i]
            target = np.where(owned, self.target[y0 : y0 + p, x0 : x0 + p], -1)
        values = self.cube.values[:, :, y0 : y0 + p, x0 : x0 + p]
        if self.mode == "random" and self.augment and self.date_dropout > 0:
            drop = rng.random(values.shape[0]) < self.date_dropout
            drop[rng.integers(values.shape[0])] = False  # keep at least one date
            values = values.copy()
            values[drop] = np.nan
        x, valid = prepare_window(values, self.mean, self.std)
        if self.mode == "random" and self.augment:
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            x, valid, target = (np.rot90(a, k, axes=(-2, -1)) for a in (x, valid, target))
            if flip:
                x, valid, target = (a[..., ::-1] for a in (x, valid, target))
        return (
            torch.from_numpy(np.ascontiguousarray(x)),
            self.doy,
            torch.from_numpy(np.ascontiguousarray(valid)),
            torch.from_numpy(np.ascontiguousarray(target).astype(np.int64)),
        )
