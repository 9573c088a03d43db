"""Train a crop-type model on a cube and labelled parcels; write the best checkpoint and per-epoch metrics.

Training draws random patches centred on training parcels (`tasks.dataset`), optimises soft IoU + cross-entropy
(`models.losses.IoULoss`) with AdamW under a warm-up + cosine learning-rate schedule, and scores every epoch on
validation parcels. The checkpoint with the best validation mIoU is `out_dir/model.pt`; the state after the
latest epoch, for `resume`, is `out_dir/last.pt`. Both follow the checkpoint contract of docs/architecture.md.

Every model of `models.registry` trains here: gradient models through `fit_loop`, the epoch loop shared with
masked pre-training (`tasks.pretrain`) and distillation (`tasks.distill`), which takes the loss of a batch as a
function; multi-modal models (a `sar_channels` argument) get the cube's SAR series on the same patches; the random
forest is fitted once on sampled training pixels (`fit_forest`) and checkpointed and scored like the others.
Runs pick CUDA when present (else the CPU), autocast to bfloat16 where the hardware runs it (float16 with a
`GradScaler` on GPUs without bfloat16), optionally `torch.compile` the model, and seed everything (deterministic
algorithms where PyTorch has them).
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.exceptions import MissingContextError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader

from infra.errors import CropflowError
from infra.runs import in_prefect_run
from infra.storage import location, make_folder, open_zarr, output_file
from models.losses import IoULoss
from models.random_forest import RandomForest
from models.registry import MODELS, build_model
from tasks.cube import cropflow_version
from tasks.dataset import CubeArrays, EpochSampler, PatchDataset, load_cube_arrays, make_loader, split_statistics
from tasks.evaluate import accuracy_metrics, confusion_matrix
from tasks.labels import SPLITS, cube_grid, rasterize_labels, read_classes, read_labels
from tasks.preprocess import prepare_window

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
SENSOR = "s2"
SAR_SENSOR = "s1"
# Default model settings per device type: the paper's widths on a GPU; on CPU half of them (about 3x cheaper per
# patch), so that a 512 x 512 px region trains in a few minutes. Narrower (8, ...) learns the dates far slower.
DEFAULT_MODEL_CONFIG: dict[str, dict[str, dict]] = {
    "cuda": {"fcn3d": {"widths": [32, 64, 128, 256]}},
    "cpu": {"fcn3d": {"widths": [16, 32, 64, 128]}},
}
EVAL_PATCH_FACTOR = 2  # validation tiles are this many times the training patch size: more context, fewer edges
WEIGHT_DECAY = 1e-4
GRAD_CLIP_NORM = 1.0
WARMUP_FRACTION = 0.05  # of the scheduled steps, linear from 0 to `lr`
METRIC_COLUMNS = ("epoch", "loss", "val_oa", "val_miou", "lr", "seconds")

Batch = Sequence[torch.Tensor]  # a PatchDataset batch: (x, doy, valid, target[, x_sar, doy_sar, valid_sar])
BatchLoss = Callable[[Batch, int], torch.Tensor]  # (batch on the device, global step) -> loss to minimise
Forward = Callable[[nn.Module, Batch], torch.Tensor]  # (model, batch on the device) -> logits (B, K, H, W)


@dataclass(frozen=True)
class TrainResult:
    """Where training wrote its outputs and how it ended (`stop_reason`: epochs, early_stopping, time_budget or
    fitted)."""

    checkpoint: Path
    metrics_csv: Path
    best_epoch: int
    best_val_miou: float
    epochs_run: int
    stop_reason: str
    history: list[dict]


@dataclass(frozen=True)
class TrainOptions:
    """How a run trains, whatever the model and loss (`train_model` documents each option)."""

    epochs: int = 30
    patches_per_epoch: int = 128
    patch_size: int = 32
    batch_size: int = 8
    lr: float = 3e-3
    seed: int = 0
    device: str = "auto"
    time_budget_s: float | None = None
    resume: bool = False
    progress: bool = True
    patience: int = 12
    num_workers: int = 0
    compile: bool = False
    deterministic: bool = True
    augment: dict | None = None
    label_options: dict | None = None


@dataclass(frozen=True)
class TrainData:
    """A cube's optical (and optionally SAR) arrays with labels, the class map and the input normalisations."""

    cube: CubeArrays
    classes: list[dict]
    norm: tuple[np.ndarray, np.ndarray]
    sar: CubeArrays | None = None
    sar_norm: tuple[np.ndarray, np.ndarray] | None = None

    def with_norm(self, ckpt: dict) -> TrainData:
        """The same data in a checkpoint's band order (its model and normalisation follow that order, which may
        differ from the cube's), standardised with the normalisation(s) the checkpoint stores."""
        cube, norm = _in_band_order(self.cube, ckpt["bands"]), _norm_arrays(ckpt["norm"])
        sar, sar_norm = self.sar, self.sar_norm
        if "sar" in ckpt and sar is not None:
            sar, sar_norm = _in_band_order(sar, ckpt["sar"]["bands"]), _norm_arrays(ckpt["sar"]["norm"])
        return dataclasses.replace(self, cube=cube, norm=norm, sar=sar, sar_norm=sar_norm)


def _in_band_order(arrays: CubeArrays, bands: list[str]) -> CubeArrays:
    """`arrays` with their bands in the order of `bands` (the same set, as `check_compatible` ensures)."""
    have = [str(b) for b in arrays.bands]
    if have == [str(b) for b in bands]:
        return arrays
    order = [have.index(str(b)) for b in bands]
    return dataclasses.replace(arrays, values=arrays.values[:, order], bands=[have[i] for i in order])


def resolve_device(device: str) -> torch.device:
    """`"auto"`: CUDA if available, else CPU; anything else is passed to `torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lr_factor(step: int, total_steps: int) -> float:
    """Linear warm-up over `WARMUP_FRACTION` of `total_steps`, then cosine decay to 0 at `total_steps`."""
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def needs_sar(model_name: str) -> bool:
    """Whether the registry model takes a SAR series besides the optical one (a `sar_channels` argument)."""
    return model_name in MODELS and "sar_channels" in inspect.signature(MODELS[model_name]).parameters


def model_inputs(batch: Batch) -> tuple[torch.Tensor, ...]:
    """Positional `forward` inputs of a batch: `(x, doy, valid)`, then `(x_sar, doy_sar, valid_sar)` if present."""
    return (*batch[:3], *batch[4:])


def _norm_arrays(norm: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)


def load_training_data(
    cube_path: Path,
    labels_path: Path,
    classes_path: Path,
    sar: bool = False,
    label_options: dict | None = None,
    seed: int = 0,
) -> TrainData:
    """Cube arrays with the labels burnt on, class map, and normalisation on the training split.

    `label_options`: keyword arguments of `read_labels` (`class_column`, `crs`, `split_block_m`) and
    `point_buffer_px` of `rasterize_labels`. `sar=True` also loads the cube's `s1` series.
    """
    options = dict(label_options or {})
    buffer = options.pop("point_buffer_px", 0.0)
    classes = read_classes(classes_path)
    labels = read_labels(labels_path, classes, **options)
    if not location(cube_path).exists():
        raise CropflowError(f"cube {cube_path} not found; build the cube first.")
    ds = open_zarr(cube_path, chunks=None)
    target, split = rasterize_labels(labels, *cube_grid(ds), point_buffer_px=buffer)
    cube = load_cube_arrays(ds, target, split, SENSOR)
    norm = split_statistics(cube, "train", seed=seed)
    if not sar:
        return TrainData(cube, classes, norm)
    if SAR_SENSOR not in ds:
        raise CropflowError(
            f"this model needs the SAR series but the cube {cube_path} has no {SAR_SENSOR!r}; "
            "build the cube with --sensors s2,s1."
        )
    sar_cube = load_cube_arrays(ds, target, split, SAR_SENSOR)
    return TrainData(cube, classes, norm, sar_cube, split_statistics(sar_cube, "train", seed=seed))


def datasets(data: TrainData, options: TrainOptions, train_split: str | None = "train") -> tuple[PatchDataset, ...]:
    """Training (random, augmented as `options.augment` says) and validation (grid) patch datasets."""
    sar = {"sar": data.sar, "sar_norm": data.sar_norm}
    augment = dict(options.augment or {})
    train = PatchDataset(
        data.cube,
        *data.norm,
        train_split,
        "random",
        options.patch_size,
        options.patches_per_epoch,
        seed=options.seed,
        **augment,
        **sar,
    )
    if train_split is None:
        return (train,)
    return train, PatchDataset(data.cube, *data.norm, "val", "grid", EVAL_PATCH_FACTOR * options.patch_size, **sar)


def default_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(*model_inputs(batch))


def evaluate_patches(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    class_names: list[str],
    forward: Forward = default_forward,
) -> dict:
    """Overall accuracy and mIoU (`tasks.evaluate.accuracy_metrics`) of `model` over the labelled pixels of `loader`
    (autocast as in training)."""
    with autocast(device):
        return accuracy_metrics(confusion(model, loader, device, num_classes, forward), class_names)


def confusion(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    num_classes: int,
    forward: Forward = default_forward,
) -> np.ndarray:
    """Confusion matrix (truth x prediction) of `model` over the labelled pixels (target >= 0) of `batches`."""
    model.eval()
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    with torch.inference_mode():
        for batch in batches:
            logits = forward(model, [t.to(device) for t in batch])
            pred = logits.argmax(dim=1).cpu().numpy()
            cm += confusion_matrix(batch[3].cpu().numpy(), pred, num_classes)
    return cm


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Autocast type: bfloat16 on CUDA GPUs that run it (float16 on older ones) and on CPUs with AVX512-BF16 or
    AMX; None (float32) elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device) -> AbstractContextManager:
    """Autocast to `amp_dtype(device)`, or nothing.

    On a CPU with bfloat16 it trains and predicts about 1.6x faster than float32 at the same accuracy.
    """
    dtype = amp_dtype(device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@contextmanager
def reproducible(seed: int, deterministic: bool) -> Iterator[None]:
    """Seed torch (CPU and CUDA); with `deterministic`, use deterministic algorithms where PyTorch has them (a
    warning, not an error, for the others) and no cuDNN autotuning, restoring the previous settings afterwards."""
    torch.manual_seed(seed)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (CUDA >= 10.2)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """Generator of the random masks of one optimisation step: the same seed and step give the same masks (also
    after a resume)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def _to_cpu(obj: object) -> object:
    """Copy of nested dicts/lists/tuples with every tensor on the CPU (a checkpoint loads without a GPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _norm_dict(norm: tuple[np.ndarray, np.ndarray]) -> dict:
    return {"mean": [float(v) for v in norm[0]], "std": [float(v) for v in norm[1]]}


def model_meta(model_name: str, model_config: dict, classes: list[dict]) -> dict:
    """The checkpoint fields of every run: format, model, classes and cropflow version (`checkpoint_meta` adds the
    cube's bands and normalisation)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model_name": model_name,
        "model_config": model_config,
        "classes": [dict(c) for c in classes],
        "cropflow_version": cropflow_version(),
    }


def checkpoint_meta(
    model_name: str, model_config: dict, data: TrainData, sensor: str = SENSOR, multimodal: bool = False
) -> dict:
    """The parts of a checkpoint fixed for a run: model, bands, sensor, classes, normalisation (and SAR's)."""
    use_sar = sensor == SAR_SENSOR
    cube, norm = (data.sar, data.sar_norm) if use_sar else (data.cube, data.norm)
    meta = model_meta(model_name, model_config, data.classes) | {
        "bands": list(cube.bands),
        "sensor": sensor,
        "norm": _norm_dict(norm),
    }
    if multimodal:
        meta["sar"] = {"sensor": SAR_SENSOR, "bands": list(data.sar.bands), "norm": _norm_dict(data.sar_norm)}
    return meta


def save_checkpoint(ckpt: dict, path: Path) -> Path:
    """`torch.save` to a temporary file beside `path`, then rename over it (readers never see a partial file)."""
    with output_file(path) as tmp:
        torch.save(ckpt, tmp)
    return location(path)


def _write_metrics_csv(history: list[dict], path: Path) -> None:
    with output_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _check_bands(theirs: list[str], ours: list[str] | None, what: str, path: Path) -> None:
    """`what`: "" for the optical bands, "SAR " for the SAR ones."""
    theirs = [str(b) for b in theirs]
    if ours is None:
        raise CropflowError(
            f"checkpoint {path} needs {what}bands {theirs} but the cube has no SAR series; "
            f"build the cube with --sensors s2,{SAR_SENSOR} or use another model."
        )
    ours = [str(b) for b in ours]
    if set(theirs) != set(ours):
        missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        diff = ", ".join(f"{k} {v}" for k, v in (("missing", missing), ("extra", extra)) if v)
        raise CropflowError(
            f"checkpoint {path} was trained on {what}bands {theirs} but the cube has {ours} ({diff}); "
            "use a cube with the model's bands or train a new model."
        )


def check_compatible(
    ckpt: dict, bands: list[str], classes: list[dict] | None, path: Path, sar_bands: list[str] | None = None
) -> None:
    """Raise `CropflowError` naming the mismatch if the checkpoint's bands (optical, and SAR for a multi-modal
    model) or classes (unless None: the checkpoint's own classes are used) differ from the given ones."""
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CropflowError(f"checkpoint {path} has format {ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT}.")
    _check_bands(ckpt["bands"], bands, "", path)
    if "sar" in ckpt:
        _check_bands(ckpt["sar"]["bands"], sar_bands, "SAR ", path)
    if classes is None:
        return
    want = [(c["id"], c["name"]) for c in sorted(classes, key=lambda c: c["id"])]
    have = [(c["id"], c["name"]) for c in sorted(ckpt["classes"], key=lambda c: c["id"])]
    if want != have:
        diff = sorted(set(have) ^ set(want))
        raise CropflowError(
            f"checkpoint {path} was trained on classes {have} but the class map has {want} (differing: {diff}); "
            "use the class map the model was trained with or train a new model."
        )


def read_checkpoint(path: Path, what: str = "checkpoint") -> dict:
    """The checkpoint dict at `path` (local or object store; tensors on the CPU, `weights_only`)."""
    path = location(path)
    if not path.is_file():
        raise CropflowError(f"{what} {path} not found; train a model first (or give the path of model.pt).")
    with path.open("rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def load_best(model: nn.Module, result: TrainResult) -> nn.Module:
    """`model` with the weights of the best checkpoint of its training run `result`."""
    model.load_state_dict(read_checkpoint(result.checkpoint)["state_dict"])
    return model


def load_checkpoint(
    path: Path, bands: list[str], classes: list[dict] | None, sar_bands: list[str] | None = None
) -> tuple[nn.Module, dict]:
    """Model (eval mode, on CPU) and checkpoint dict from `path`, refused if its bands (`sar_bands` for a
    multi-modal model; None = the cube has no SAR) or classes (None: not checked) differ."""
    ckpt = read_checkpoint(path)
    return checkpoint_model(ckpt, path, bands, classes, sar_bands), ckpt


def cube_bands(ds: xr.Dataset, sensor: str) -> list[str]:
    """The band names of `sensor`'s variable in the cube `ds`, in the cube's order."""
    var = ds[sensor]
    return [str(b) for b in var[var.dims[1]].values]


def load_for_cube(
    checkpoint: Path, ds: xr.Dataset, classes: list[dict] | None, cube_path: Path
) -> tuple[nn.Module, dict]:
    """`load_checkpoint` checked against the cube `ds` at `cube_path`: its optical bands and its SAR bands if any."""
    if SENSOR not in ds:
        raise CropflowError(f"the cube {cube_path} has no {SENSOR!r} variable; rebuild it with that sensor.")
    sar_bands = cube_bands(ds, SAR_SENSOR) if SAR_SENSOR in ds else None
    return load_checkpoint(checkpoint, cube_bands(ds, SENSOR), classes, sar_bands)


def checkpoint_model(
    ckpt: dict, path: Path, bands: list[str], classes: list[dict] | None, sar_bands: list[str] | None = None
) -> nn.Module:
    """The model (eval mode, on CPU) of the checkpoint `ckpt` read from `path`, checked as `load_checkpoint` does."""
    check_compatible(ckpt, bands, classes, location(path), sar_bands)
    model = build_model(ckpt["model_name"], **ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def load_pretrained_encoder(model: nn.Module, path: Path, bands: list[str]) -> dict:
    """Load the encoder of a masked pre-training checkpoint (`tasks.pretrain`) into `model` (`load_encoder`);
    returns the checkpoint, whose normalisation fine-tuning must use. Refused (`CropflowError`) for another kind
    of checkpoint, other bands or band order, a model without `load_encoder` or another encoder size."""
    ckpt = read_checkpoint(path, "pre-trained checkpoint")
    if ckpt.get("kind") != "pretrained_encoder":
        raise CropflowError(f"{path} is not a pre-training checkpoint (from pretrain_model); give its model.pt.")
    if [str(b) for b in ckpt["bands"]] != [str(b) for b in bands]:
        raise CropflowError(
            f"{path} was pre-trained on bands {ckpt['bands']} but the cube has {bands} (same bands in the same order "
            "needed); pre-train on this cube."
        )
    if not hasattr(model, "load_encoder"):
        raise CropflowError(f"{type(model).__name__} has no pre-trained encoder to load; fine-tune an stcln model.")
    try:
        model.load_encoder(ckpt["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise CropflowError(
            f"the encoder of {path} ({ckpt['model_config']}) does not fit the model: {str(exc)[:300]}; "
            "fine-tune with the pre-training's model_config."
        ) from None
    return ckpt


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run (shown in the UI), else this module's logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return log


def publish_metrics_artifact(history: list[dict], description: str) -> bool:
    """Per-epoch metrics as a Prefect table artifact when inside a flow or task run; False (nothing) outside."""
    if not in_prefect_run():
        return False
    create_table_artifact(table=history, key="train-metrics", description=description)
    return True


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    batch_loss: BatchLoss,
    device: torch.device,
    lr_at: Callable[[int], float],
    on_step: Callable[[float], None],
    scaler: torch.amp.GradScaler,
    first_step: int = 0,
) -> tuple[float, float]:
    """One pass over `loader` (learning rate `lr_at(batch index)`, clipped gradients, loss scaled for float16);
    mean loss and last rate. `batch_loss` gets the batch on `device` and the global step `first_step + i`."""
    model.train()
    losses, lr = [], 0.0
    for i, batch in enumerate(loader):
        lr = lr_at(i)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [t.to(device, non_blocking=True) for t in batch]
        with autocast(device):
            loss = batch_loss(batch, first_step + i)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
        on_step(losses[-1])
    return float(np.mean(losses)), lr


def val_miou(row: dict) -> float:
    """The default score of an epoch (higher is better)."""
    return row["val_miou"]


def _resume(path: Path, meta: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, int]:
    """Training state and epoch of `path` loaded into `model` and `optimizer`, refused if the run differs."""
    ckpt = read_checkpoint(path)
    for key in ("model_name", "model_config", "bands", "sensor", "classes", "norm", "sar", "kind"):
        if ckpt.get(key) != meta.get(key):
            raise CropflowError(
                f"{path} holds another {key} ({ckpt.get(key)!r}, now {meta.get(key)!r}); "
                "resume with the same model settings and data or start afresh (resume=False)."
            )
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["train_state"], int(ckpt["epoch"])


def fit_loop(
    model: nn.Module,
    batch_loss: BatchLoss,
    train_ds: PatchDataset,
    evaluate: Callable[[], dict[str, float]],
    meta: dict,
    out_dir: Path,
    options: TrainOptions,
    device: torch.device,
    score: Callable[[dict], float] = val_miou,
    description: str = "training",
    started: float | None = None,
) -> TrainResult:
    """The epoch loop of every gradient-trained run: AdamW on `model`'s trainable parameters, minimising
    `batch_loss`, scored after each epoch by `score(row)` of the row `{epoch, loss, **evaluate(), lr, seconds}`.

    Writes `out_dir/model.pt` (best score), `out_dir/last.pt` (for `options.resume`) and
    `out_dir/train_metrics.csv`, checkpoints being `meta` plus the weights, epoch, metrics and optimizer state.
    Stops after `options.epochs`, after `options.patience` epochs without a better score, or once the next epoch
    would overrun `options.time_budget_s` (counted from `started`; the schedule is shortened after the first
    epoch to the epochs the budget fits).
    """
    started = time.monotonic() if started is None else started
    out_dir = location(out_dir)
    make_folder(out_dir)
    best_path, last_path, csv_path = out_dir / "model.pt", out_dir / "last.pt", out_dir / "train_metrics.csv"
    logger = _run_logger()
    model.to(device)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=options.lr, weight_decay=WEIGHT_DECAY
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
    state = {"best_score": -math.inf, "best_epoch": 0, "bad_epochs": 0, "history": []}
    epoch = 0
    if not options.resume:
        for stale in (last_path, csv_path):
            stale.unlink(missing_ok=True)
    elif last_path.is_file():
        state, epoch = _resume(last_path, meta, model, optimizer)
        logger.info("resuming from %s after epoch %d", last_path, epoch)
    if options.compile:
        model.compile()  # in place: the state dict keeps its keys
    loader = make_loader(train_ds, options.batch_size, options.num_workers, options.seed, device.type == "cuda")
    steps, horizon, lr = len(loader), options.epochs, options.lr
    history: list[dict] = state["history"]
    first_epoch, call_seconds = epoch, []
    stop_reason = "epochs" if epoch >= options.epochs else None
    with (
        reproducible(options.seed, options.deterministic),
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=not options.progress,
        ) as bar,
    ):
        job = bar.add_task("training", total=(options.epochs - epoch) * steps)
        while stop_reason is None:
            t0 = time.monotonic()
            if isinstance(loader.sampler, EpochSampler):
                loader.sampler.set_epoch(epoch)
            loss, last_lr = train_epoch(
                model,
                loader,
                optimizer,
                batch_loss,
                device,
                lambda i, e=epoch, h=horizon: lr * lr_factor(e * steps + i, h * steps),
                lambda value, e=epoch: bar.update(job, advance=1, description=f"epoch {e + 1} loss {value:.3f}"),
                scaler,
                epoch * steps,
            )
            metrics = evaluate()
            epoch += 1
            call_seconds.append(time.monotonic() - t0)
            row = {"epoch": epoch, "loss": loss, **metrics, "lr": last_lr, "seconds": call_seconds[-1]}
            history.append(row)
            improved = score(row) > state["best_score"]
            if improved:
                state |= {"best_score": score(row), "best_epoch": epoch, "bad_epochs": 0}
            else:
                state["bad_epochs"] += 1
            state["history"] = history
            ckpt = meta | {
                "state_dict": _to_cpu(model.state_dict()),
                "epoch": epoch,
                "metrics": row,
                "optimizer": _to_cpu(optimizer.state_dict()),
                "train_state": state,
            }
            if improved:
                save_checkpoint(ckpt, best_path)
            save_checkpoint(ckpt, last_path)
            _write_metrics_csv(history, csv_path)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "lr", "seconds"))
            logger.info("epoch %d: %s%s (%.1f s)", epoch, shown, " (best)" if improved else "", row["seconds"])
            if state["bad_epochs"] >= options.patience:
                stop_reason = "early_stopping"
            elif epoch >= options.epochs:
                stop_reason = "epochs"
            elif options.time_budget_s is not None:
                elapsed, per_epoch = time.monotonic() - started, float(np.mean(call_seconds))
                if epoch == first_epoch + 1:  # fit the learning-rate schedule to the epochs the budget has room for
                    horizon = min(options.epochs, epoch + int((options.time_budget_s - elapsed) / per_epoch))
                    bar.update(job, total=(max(horizon, epoch) - first_epoch) * steps)
                if epoch >= horizon or elapsed + per_epoch > options.time_budget_s:
                    stop_reason = "time_budget"
    return _finish(history, state["best_epoch"], stop_reason, epoch, out_dir, f"{description}: per-epoch metrics")


def _finish(
    history: list[dict], best_epoch: int, stop_reason: str, epoch: int, out_dir: Path, description: str
) -> TrainResult:
    publish_metrics_artifact(history, description)
    best = history[best_epoch - 1] if best_epoch else {}
    _run_logger().info("%s stopped (%s) after epoch %d; best epoch %d", description, stop_reason, epoch, best_epoch)
    return TrainResult(
        checkpoint=out_dir / "model.pt",
        metrics_csv=out_dir / "train_metrics.csv",
        best_epoch=best_epoch,
        best_val_miou=best.get("val_miou", math.nan),
        epochs_run=epoch,
        stop_reason=stop_reason,
        history=history,
    )


def val_scores(
    model: nn.Module, loader: DataLoader, device: torch.device, classes: list[dict], forward: Forward = default_forward
) -> dict[str, float]:
    """`val_oa` and `val_miou` of `model` on the validation patches of `loader`."""
    val = evaluate_patches(model, loader, device, len(classes), [c["name"] for c in classes], forward)
    return {"val_oa": val["overall_accuracy"], "val_miou": val["miou"]}


def fit_forest(
    model: RandomForest,
    data: TrainData,
    val_ds: PatchDataset,
    meta: dict,
    out_dir: Path,
    options: TrainOptions,
    device: torch.device,
) -> TrainResult:
    """Fit the random forest once (Breiman 2001) on labelled training pixels (at most `model.max_samples`, drawn
    with the run's seed), validate it like the gradient models and write the same checkpoint files (epoch 1)."""
    t0 = time.monotonic()
    out_dir = location(out_dir)
    make_folder(out_dir)
    rows, cols = np.nonzero((data.cube.split == SPLITS["train"]) & (data.cube.target >= 0))
    if rows.size > model.max_samples:
        pick = np.sort(np.random.default_rng(options.seed).choice(rows.size, model.max_samples, replace=False))
        rows, cols = rows[pick], cols[pick]
    x, valid = prepare_window(data.cube.values[:, :, rows, cols][:, :, None, :], *data.norm)  # pixels as a 1 x N image
    target = torch.from_numpy(data.cube.target[rows, cols].astype(np.int64)).view(1, 1, -1)
    inputs = (torch.from_numpy(x)[None], torch.from_numpy(data.cube.doy)[None], torch.from_numpy(valid)[None], target)
    model.to(device).fit(*(t.to(device) for t in inputs))
    loader = make_loader(val_ds, options.batch_size)
    row = {"epoch": 1, "loss": math.nan, **val_scores(model, loader, device, data.classes), "lr": 0.0}
    row["seconds"] = time.monotonic() - t0
    state = {"best_score": row["val_miou"], "best_epoch": 1, "bad_epochs": 0, "history": [row]}
    ckpt = meta | {"state_dict": _to_cpu(model.state_dict()), "epoch": 1, "metrics": row, "train_state": state}
    for name in ("model.pt", "last.pt"):
        save_checkpoint(ckpt, out_dir / name)
    _write_metrics_csv([row], out_dir / "train_metrics.csv")
    _run_logger().info(
        "random forest fitted on %d pixels: val OA %.4f, val mIoU %.4f", rows.size, row["val_oa"], row["val_miou"]
    )
    return _finish([row], 1, "fitted", 1, out_dir, "random_forest fitting")


def device_defaults(model_name: str, device: torch.device) -> dict:
    """The settings of `model_name` that depend on the device (`DEFAULT_MODEL_CONFIG`), before a run's own."""
    return DEFAULT_MODEL_CONFIG.get(device.type, DEFAULT_MODEL_CONFIG["cpu"]).get(model_name, {})


def model_config_for(model_name: str, model_config: dict | None, data: TrainData, device: torch.device) -> dict:
    """`model_config` merged over `device_defaults`, with the input and output sizes of the data: `in_channels`,
    `num_classes`, and `sar_channels` for multi-modal models."""
    config = device_defaults(model_name, device) | dict(model_config or {})
    config |= {"in_channels": len(data.cube.bands), "num_classes": len(data.classes)}
    if data.sar is not None:
        config["sar_channels"] = len(data.sar.bands)
    return config


def train_model(
    cube_path: Path,
    labels_path: Path,
    classes_path: Path,
    out_dir: Path,
    model_name: str = "fcn3d",
    model_config: dict | None = None,
    epochs: int = 30,
    patches_per_epoch: int = 128,
    patch_size: int = 32,
    batch_size: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    device: str = "auto",
    time_budget_s: float | None = None,
    resume: bool = False,
    progress: bool = True,
    patience: int = 12,
    ce_weight: float = 0.5,
    *,
    num_workers: int = 0,
    compile: bool = False,
    deterministic: bool = True,
    augment: dict | None = None,
    label_options: dict | None = None,
    init_from: Path | None = None,
) -> TrainResult:
    """Train `model_name` (any registry model) on the cube at `cube_path` with the labels of `labels_path`.

    `model_config` is merged over `DEFAULT_MODEL_CONFIG[device type][model_name]`; `in_channels`, `num_classes`
    (and `sar_channels`) come from the cube and the class map. Training stops after `epochs`, after `patience`
    epochs without a better validation mIoU, or once the next epoch would overrun `time_budget_s` (see
    `fit_loop`). `resume=True` continues from `out_dir/last.pt` (weights, optimizer, early-stopping state,
    metrics) when it exists. Loss: soft IoU + `ce_weight` x CE. `device`: "auto" (CUDA, else CPU) or a torch
    device. `num_workers`: DataLoader worker processes (persistent; batches as with 0). `compile`:
    `torch.compile` the model. `deterministic`: deterministic algorithms where PyTorch has them. `augment`:
    options of the training `PatchDataset` (`date_dropout`, `cloud_gaps`, `random_crop`, `flips`,
    `min_valid_fraction`). `label_options`: see `load_training_data`. `init_from`: a masked pre-training
    checkpoint (`tasks.pretrain`) whose encoder and normalisation the model starts from (fine-tuning).
    The random forest is fitted once instead (`fit_forest`).
    """
    options = TrainOptions(
        epochs,
        patches_per_epoch,
        patch_size,
        batch_size,
        lr,
        seed,
        device,
        time_budget_s,
        resume,
        progress,
        patience,
        num_workers,
        compile,
        deterministic,
        augment,
        label_options,
    )
    started = time.monotonic()
    dev = resolve_device(device)
    data = load_training_data(cube_path, labels_path, classes_path, needs_sar(model_name), label_options, seed)
    config = model_config_for(model_name, model_config, data, dev)
    torch.manual_seed(seed)
    model = build_model(model_name, **config)
    if init_from is not None:
        data = data.with_norm(load_pretrained_encoder(model, init_from, data.cube.bands))
    meta = checkpoint_meta(model_name, config, data, multimodal=data.sar is not None)
    train_ds, val_ds = datasets(data, options)
    _run_logger().info(
        "training %s %s on %s: %d train / %d val pixels, %d bands x %d dates%s, %d classes",
        model_name,
        config,
        dev,
        int((train_ds.target >= 0).sum()),
        int((val_ds.target >= 0).sum()),
        len(data.cube.bands),
        len(data.cube.doy),
        "" if data.sar is None else f" + SAR {len(data.sar.bands)} bands x {len(data.sar.doy)} dates",
        len(data.classes),
    )
    if isinstance(model, RandomForest):
        return fit_forest(model, data, val_ds, meta, out_dir, options, dev)
    loss_fn = IoULoss(ce_weight=ce_weight)
    val_loader = make_loader(val_ds, batch_size)
    return fit_loop(
        model,
        lambda batch, step: loss_fn(model(*model_inputs(batch)), batch[3]),
        train_ds,
        lambda: val_scores(model, val_loader, dev, data.classes),
        meta,
        out_dir,
        options,
        dev,
        description=f"{model_name} training on {location(cube_path).name}",
        started=started,
    )


@task(name="train-model", tags=["gpu"])
def train_model_task(
    cube_path: Path,
    labels_path: Path,
    classes_path: Path,
    out_dir: Path,
    model_name: str = "fcn3d",
    model_config: dict | None = None,
    epochs: int = 30,
    patches_per_epoch: int = 128,
    patch_size: int = 32,
    batch_size: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    device: str = "auto",
    time_budget_s: float | None = None,
    resume: bool = False,
    progress: bool = True,
    **kwargs: object,
) -> TrainResult:
    """`train_model` as a Prefect task (tag `gpu`: a concurrency limit on it holds runs to the GPUs)."""
    return train_model(
        cube_path,
        labels_path,
        classes_path,
        out_dir,
        model_name,
        model_config,
        epochs,
        patches_per_epoch,
        patch_size,
        batch_size,
        lr,
        seed,
        device,
        time_budget_s,
        resume,
        progress,
        **kwargs,
    )
