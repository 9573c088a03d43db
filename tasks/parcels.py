"""Labelled time series of samples (parcels or single pixels) as model inputs: loading, cross-validation splits,
missing dates at test time, training and scoring with the registry models.

A `SeriesSet` holds N samples on one date axis: optical values (N, T, C) with NaN where a date was not observed,
optionally SAR values (N, T, C') on the same dates, and one class per sample. Models of `models/` take image time
series (B, T, C, H, W); a sample is given to them as a 1 x 1 image (H = W = 1), so the pixel-wise models (L-TAE,
TempCNN, the random forest) see exactly its series; STCLN's 3 x 3 convolutions then reduce to their centre taps (a
per-date linear map) and its spatial attention to the identity, leaving its Transformer temporal encoder.

Sources:
- `load_parcels`: WorldCereal long-format parquet (one row per sample and time step: `sample_id`, `timestamp`,
  `ewoc_code`, `S2-L2A-<band>` reflectance x 10000 with 65535 = no data, `S1-SIGMA0-<pol>` DN with dB =
  20 log10(DN) - 83 and 0 / 65535 = no data), any time step, mapped to a legend of `class_mappings.json`.
- `load_pixel_csv`: the TempCNN CSV layout (class, polygon id, then per date the interleaved band values).

Inputs are prepared as in the rest of cropflow (`tasks.preprocess.prepare_window`: linear gap filling in time,
standardisation with statistics of the training samples, `valid` = dates actually observed).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch import nn
from torch.utils.data import Dataset

from infra.errors import CropflowError
from models.masking import cloud_gap_mask
from models.random_forest import RandomForest
from tasks.evaluate import accuracy_metrics
from tasks.preprocess import band_statistics, prepare_window
from tasks.train import (
    Batch,
    BatchLoss,
    Forward,
    TrainOptions,
    confusion,
    default_forward,
    fit_loop,
    load_best,
    model_meta,
    resolve_device,
)

S2_PREFIX, S1_PREFIX = "S2-L2A-", "S1-SIGMA0-"
NODATA = 65535
LABEL_COLUMN = "ewoc_code"
OTHER = "other"
IGNORED = ("ignore", "unknown")
MODALITIES = ("s2", "s1", "s2+s1", "pair")


@dataclasses.dataclass(frozen=True)
class SeriesSet:
    """N labelled samples on one date axis (shapes in the module docstring); `notes` say how it was built."""

    optical: np.ndarray  # (N, T, C) float32, NaN = not observed
    bands: list[str]
    doy: np.ndarray  # (T,) int64, days since 1 January of the first date's year
    labels: np.ndarray  # (N,) int64 index into `classes`
    classes: list[str]
    sar: np.ndarray | None = None  # (N, T, C') float32 dB, NaN = not observed
    sar_bands: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> SeriesSet:
        """The samples `idx` (same dates, bands and classes)."""
        sar = None if self.sar is None else self.sar[idx]
        return dataclasses.replace(self, optical=self.optical[idx], labels=self.labels[idx], sar=sar)


def _pivot(df: pd.DataFrame, ids: pd.Index, times: pd.Index, columns: list[str]) -> np.ndarray:
    """(N, T, C) float32 array of `columns` with NaN where a sample has no row at a time."""
    index = pd.MultiIndex.from_product([ids, times])
    table = df.set_index(["sample_id", "timestamp"])[columns].astype("float64")
    return table.reindex(index).to_numpy(np.float32).reshape(len(ids), len(times), len(columns))


def merge_rare(names: pd.Series, min_count: int) -> tuple[pd.Series, list[str]]:
    """Class names with those of fewer than `min_count` samples replaced by `OTHER`; also the merged names."""
    counts = names.value_counts()
    rare = sorted(counts[counts < min_count].index)
    return names.where(~names.isin(rare), OTHER), rare


def load_parcels(path: Path, mappings: Path, legend: str, min_count: int = 5) -> SeriesSet:
    """Parcel series of a WorldCereal long-format (geo)parquet, labelled with the `legend` of `mappings`.

    Samples whose code the legend does not map, or maps to "ignore"/"unknown", are left out; classes of fewer than
    `min_count` samples are merged into "other" (`notes` lists both). Bands without any observation are dropped.
    """
    path, mappings = Path(path), Path(mappings)
    for f, what in ((path, "--parcels"), (mappings, "class mappings")):
        if not f.is_file():
            raise CropflowError(f"{what} file {f} not found.")
    try:
        schema = pq.read_schema(path).names
    except Exception as exc:
        raise CropflowError(f"--parcels {path} is not a readable parquet file: {exc}") from None
    s2_cols = sorted(c for c in schema if c.startswith(S2_PREFIX))
    s1_cols = sorted(c for c in schema if c.startswith(S1_PREFIX))
    missing = [c for c in ("sample_id", "timestamp", LABEL_COLUMN) if c not in schema]
    if missing or not s2_cols:
        need = ", ".join(missing + ([] if s2_cols else [f"{S2_PREFIX}<band>"]))
        raise CropflowError(f"--parcels {path} lacks column(s) {need}; it needs the WorldCereal long format.")
    table = json.loads(mappings.read_text())
    if legend not in table:
        raise CropflowError(f"--legend {legend!r} is not in {mappings}; valid legends: {', '.join(table)}.")
    df = pd.read_parquet(path, columns=["sample_id", "timestamp", LABEL_COLUMN, *s2_cols, *s1_cols])
    df["timestamp"] = pd.to_datetime(df["timestamp"])
    codes = df.groupby("sample_id", sort=True)[LABEL_COLUMN].first()
    names = codes.astype(str).map(table[legend])
    unmapped = int(names.isna().sum())
    ignored = int(names.isin(IGNORED).sum())
    names = names[names.notna() & ~names.isin(IGNORED)]
    names, rare = merge_rare(names, min_count)
    if names.nunique() < 2:
        raise CropflowError(f"--parcels {path} has fewer than 2 classes of the legend {legend!r} to classify.")
    df = df[df["sample_id"].isin(names.index)]
    times = pd.Index(sorted(df["timestamp"].unique()))
    s2 = _pivot(df, names.index, times, s2_cols)
    s2[s2 == NODATA] = np.nan
    s2 /= 10_000.0
    observed = ~np.isnan(s2).all(axis=(0, 1))
    notes = [
        f"{len(names)} samples labelled with legend {legend}; {unmapped} with codes outside it and {ignored} "
        "mapped to ignore/unknown left out",
        f"classes with fewer than {min_count} samples merged into '{OTHER}': {', '.join(rare) or 'none'}",
    ]
    if not observed.all():
        notes.append(f"bands without any observation dropped: {', '.join(np.array(s2_cols)[~observed])}")
    sar = None
    if s1_cols:
        dn = _pivot(df, names.index, times, s1_cols)
        dn[(dn == 0) | (dn == NODATA)] = np.nan
        sar = (20 * np.log10(dn) - 83).astype(np.float32)
    classes = sorted(names.unique())
    first = times[0]
    doy = np.asarray((times - pd.Timestamp(first.year, 1, 1)).days, np.int64)
    return SeriesSet(
        optical=np.ascontiguousarray(s2[..., observed]),
        bands=[c.removeprefix(S2_PREFIX) for c, keep in zip(s2_cols, observed, strict=True) if keep],
        doy=doy,
        labels=names.map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64),
        classes=classes,
        sar=sar,
        sar_bands=[c.removeprefix(S1_PREFIX) for c in s1_cols],
        notes=notes,
    )


def load_pixel_csv(path: Path, bands: Sequence[str], class_map: Path | None = None) -> SeriesSet:
    """Pixel series of a TempCNN-layout CSV (no header: class, polygon id, then the `bands` of each date in turn).

    The file gives no acquisition dates: the T dates are taken as evenly spread over one year. Class names come from
    `class_map` (`value,class,...` rows) when given, else the class values.
    """
    if not Path(path).is_file():
        raise CropflowError(f"pixel CSV {path} not found.")
    raw = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    c = len(bands)
    if raw.shape[1] < 2 + c or (raw.shape[1] - 2) % c:
        raise CropflowError(f"{path}: {raw.shape[1]} columns, not class, id and {c} values per date.")
    values = raw[:, 2:].reshape(len(raw), -1, c).astype(np.float32)
    codes = raw[:, 0].astype(np.int64)
    present = np.unique(codes)
    t = values.shape[1]
    notes = [f"{len(codes)} pixels of {path.name}, {t} dates (no dates in the file: spread evenly over a year)"]
    names = {int(v): str(v) for v in present}
    if class_map is not None and Path(class_map).is_file():
        rows = pd.read_csv(class_map)
        mapped = dict(zip(rows.iloc[:, 0].astype(int), rows.iloc[:, 1].astype(str), strict=True))
        if all(int(v) in mapped for v in present):
            names = {int(v): mapped[int(v)] for v in present}
        elif all(int(v) + 1 in mapped for v in present):
            # the TempCNN example files number classes from 0 and their class_map.txt from 1
            names = {int(v): mapped[int(v) + 1] for v in present}
            notes.append(f"class codes are 0-based, {Path(class_map).name} 1-based: code c is value c + 1")
        else:
            missing = sorted(int(v) for v in present if int(v) not in mapped)
            raise CropflowError(f"{path}: class codes {missing} are not in {class_map}; add them or fix the file.")
    return SeriesSet(
        optical=values,
        bands=list(bands),
        doy=np.round(np.linspace(1, 365, t)).astype(np.int64),
        labels=np.searchsorted(present, codes),
        classes=[names[int(v)] for v in present],
        notes=notes,
    )


def stratified_folds(labels: np.ndarray, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) sample indices of stratified `n_folds`-fold cross-validation, shuffled with `seed`."""
    smallest = int(np.bincount(labels).min())
    if smallest < n_folds:
        raise CropflowError(f"a class has {smallest} samples, fewer than the {n_folds} folds; use fewer --folds.")
    return list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(labels, labels))


def inner_split(labels: np.ndarray, idx: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`idx` split into (train, validation) samples, stratified, `fraction` of them for validation (early stopping:
    the test samples are never looked at while training)."""
    counts = np.bincount(labels[idx])
    single = counts[labels[idx]] < 2  # a class with one sample cannot be split: it stays in training
    pool = idx[~single]
    size = max(round(fraction * len(pool)), int(np.count_nonzero(counts >= 2)))
    train, val = train_test_split(pool, test_size=size, stratify=labels[pool], random_state=seed)
    return np.sort(np.concatenate([train, idx[single]])), np.sort(val)


def hide_observed_dates(valid: np.ndarray, fraction: float, mode: str, seed: int) -> np.ndarray:
    """(N, T) bool: dates to hide so that each sample loses `fraction` of its observed dates (`valid` (N, T)).

    Per sample the observed dates are taken in order and `models.masking.cloud_gap_mask` picks which to hide among
    them: at random, or one contiguous run of consecutive observations (a long cloudy spell); at least one stays.
    One generator seeded with `seed` draws every sample in turn, so random gaps at a higher fraction contain those
    at a lower one.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = np.zeros_like(valid, dtype=bool)
    for i, row in enumerate(valid):
        dates = np.flatnonzero(row)
        if dates.size:
            hidden[i, dates] = cloud_gap_mask(1, dates.size, gen, float(fraction), mode)[0].numpy()
    return hidden


@dataclasses.dataclass(frozen=True)
class Norms:
    """Per-band mean and std of the optical and SAR values of the training samples."""

    optical: tuple[np.ndarray, np.ndarray]
    sar: tuple[np.ndarray, np.ndarray] | None

    @classmethod
    def of(cls, data: SeriesSet, seed: int = 0) -> Norms:
        def stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return band_statistics(values.transpose(1, 2, 0)[..., None], seed=seed)

        return cls(stats(data.optical), None if data.sar is None else stats(data.sar))


def _prepare(values: np.ndarray, norm: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T, C) values -> x (N, T, C, 1, 1) and valid (N, T, 1, 1) through `prepare_window` (samples as a 1 x N
    image)."""
    x, valid = prepare_window(values.transpose(1, 2, 0)[:, :, None, :], *norm)
    x = torch.from_numpy(np.ascontiguousarray(x[:, :, 0].transpose(2, 0, 1)))[..., None, None]
    return x, torch.from_numpy(np.ascontiguousarray(valid[:, 0].T))[..., None, None]


def model_batch(data: SeriesSet, norms: Norms, modality: str = "s2", hidden: np.ndarray | None = None) -> Batch:
    """All samples of `data` as one batch in `tasks.train`'s layout `(x, doy, valid, target[, x_sar, doy_sar,
    valid_sar])`, shapes (N, T, C, 1, 1), (N, T), (N, T, 1, 1), (N, 1, 1).

    `modality`: "s2" optical only, "s1" SAR only, "s2+s1" both stacked as the channels of one series (a date counts
    as observed when either sensor observed it), "pair" optical then SAR as the two series of a multi-modal model.
    `hidden` (N, T) bool: optical dates removed (set to NaN before gap filling) as if clouded over.
    """
    if modality not in MODALITIES:
        raise CropflowError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}.")
    if modality != "s2" and data.sar is None:
        raise CropflowError(f"modality {modality!r} needs SAR columns ({S1_PREFIX}<pol>) in the parcels file.")
    optical = data.optical if hidden is None else np.where(hidden[..., None], np.nan, data.optical)
    n, t = len(data), len(data.doy)
    doy = torch.from_numpy(data.doy).expand(n, t)
    target = torch.from_numpy(data.labels).view(n, 1, 1)
    if modality == "s1":
        x_sar, valid_sar = _prepare(data.sar, norms.sar)
        return x_sar, doy, valid_sar, target
    x, valid = _prepare(optical, norms.optical)
    if modality == "s2":
        return x, doy, valid, target
    x_sar, valid_sar = _prepare(data.sar, norms.sar)
    if modality == "s2+s1":
        return torch.cat([x, x_sar], dim=2), doy, valid | valid_sar, target
    return x, doy, valid, target, x_sar, doy, valid_sar


class SeriesDataset(Dataset):
    """Training items of a `model_batch`: index `(epoch, i)` (`tasks.dataset.EpochSampler`) gives sample
    `permutation_epoch[i]`, the permutation drawn from `default_rng([seed, epoch])`; `mode` "random" tells
    `tasks.dataset.make_loader` to pass the epoch."""

    mode = "random"

    def __init__(self, batch: Batch, seed: int = 0) -> None:
        self.batch, self.seed = batch, seed

    def __len__(self) -> int:
        return len(self.batch[0])

    def __getitem__(self, index: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        epoch, i = index
        j = np.random.default_rng([self.seed, epoch]).permutation(len(self))[i]
        return tuple(t[j] for t in self.batch)


def score(
    model: nn.Module, batch: Batch, classes: list[str], forward: Forward = default_forward, chunk: int = 256
) -> dict:
    """`tasks.evaluate.accuracy_metrics` (OA, kappa, macro-F1, per class) of `model` on the samples of `batch`,
    `chunk` samples at a time."""
    chunks = ([t[start : start + chunk] for t in batch] for start in range(0, len(batch[0]), chunk))
    return accuracy_metrics(confusion(model, chunks, batch[0].device, len(classes), forward), classes)


def train_series(
    model: nn.Module,
    batch_loss: BatchLoss,
    train: Batch,
    val: Batch,
    classes: list[str],
    options: TrainOptions,
    forward: Forward = default_forward,
    name: str = "model",
) -> nn.Module:
    """Train `model` on the samples of `train` with `tasks.train.fit_loop` (early stopping on the validation
    macro-F1 of `val`); returns it with the weights of its best epoch. The random forest is fitted once instead."""
    if isinstance(model, RandomForest):
        return model.fit(*train[:4])
    device = resolve_device(options.device)

    def evaluate() -> dict[str, float]:
        m = score(model, [t.to(device) for t in val], classes, forward)
        return {"val_oa": m["overall_accuracy"], "val_miou": m["miou"], "val_macro_f1": m["macro_f1"]}

    meta = model_meta(name, {}, [{"id": i, "name": c} for i, c in enumerate(classes)])
    with tempfile.TemporaryDirectory(prefix="cropflow-series-") as out:
        result = fit_loop(
            model,
            batch_loss,
            SeriesDataset(train, options.seed),
            evaluate,
            meta,
            Path(out),
            options,
            device,
            score=lambda row: row["val_macro_f1"],
            description=f"{name} on series",
        )
        load_best(model, result)
    return model.eval()


def loss_on(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], model: nn.Module) -> BatchLoss:
    """Batch loss `loss(model(inputs), target)` (inputs: x, doy, valid and the SAR series when present)."""
    return lambda batch, step: loss(default_forward(model, batch), batch[3])
