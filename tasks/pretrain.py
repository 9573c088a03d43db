"""Masked pre-training of STCLN on unlabelled cube pixels, then fine-tuning with `train_model(init_from=...)`.

Qin et al. (JAG 2025), "Spatiotemporal masked pre-training for advancing crop mapping on satellite image time
series with limited labels": random patches anywhere on the cube (no labels), pixel-dates hidden by
`models.masking.pretraining_mask` (spatial, temporal or spatiotemporal, p = 0.4), loss = MSE of the reconstructed
inputs on the hidden, valid pixel-dates (`STCLN.pretrain_loss`). The normalisation is computed on all pixels and
stored with the encoder; fine-tuning uses it. The checkpoint (`out_dir/model.pt`, `kind: pretrained_encoder`) has
the contract's keys with an empty class list; `train_model(..., init_from=model.pt)` loads its encoder.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from prefect import task

from infra.errors import CropflowError
from infra.storage import location, open_zarr
from models.masking import PATTERNS, pretraining_mask
from models.registry import build_model
from tasks.dataset import load_cube_arrays, split_statistics
from tasks.train import (
    SENSOR,
    TrainData,
    TrainOptions,
    TrainResult,
    checkpoint_meta,
    datasets,
    fit_loop,
    resolve_device,
    step_generator,
)

PRETRAIN_MODEL = "stcln"
PRETRAIN_OPTIONS = TrainOptions(augment={"date_dropout": 0.0})  # the masks hide pixel-dates; flips stay


def pretrain_model(
    cube_path: Path,
    out_dir: Path,
    model_config: dict | None = None,
    mask_p: float = 0.4,
    patterns: tuple[str, ...] = PATTERNS,
    mask_block: int = 1,
    options: TrainOptions = PRETRAIN_OPTIONS,
) -> TrainResult:
    """Pre-train an STCLN encoder (`model_config`, without `in_channels`/`num_classes`) by masked reconstruction
    on every pixel of the cube; writes `out_dir/model.pt` (lowest training loss), `last.pt`, `train_metrics.csv`.

    `mask_p`, `patterns`, `mask_block`: `models.masking.pretraining_mask`. `options`: as for `train_model`
    (early stopping and the best checkpoint follow the training loss; there are no labels to validate on).
    """
    started = time.monotonic()
    if not location(cube_path).exists():
        raise CropflowError(f"cube {cube_path} not found; build the cube first.")
    dev = resolve_device(options.device)
    cube = load_cube_arrays(open_zarr(cube_path, chunks=None), sensor=SENSOR)
    data = TrainData(cube, [], split_statistics(cube, None, seed=options.seed))
    config = dict(model_config or {}) | {"in_channels": len(cube.bands), "num_classes": 1, "reconstruction_head": True}
    torch.manual_seed(options.seed)
    model = build_model(PRETRAIN_MODEL, **config)
    meta = checkpoint_meta(PRETRAIN_MODEL, config, data) | {"kind": "pretrained_encoder"}
    (train_ds,) = datasets(data, options, train_split=None)

    def batch_loss(batch: list[torch.Tensor], step: int) -> torch.Tensor:
        x, doy, valid = batch[:3]
        b, t, _, h, w = x.shape
        mask = pretraining_mask(
            (b, t, h, w), step_generator(options.seed, step, x.device), mask_p, patterns, mask_block
        )
        return model.pretrain_loss(x, doy, valid, mask)

    return fit_loop(
        model,
        batch_loss,
        train_ds,
        dict,
        meta,
        out_dir,
        options,
        dev,
        score=lambda row: -row["loss"],
        description=f"STCLN masked pre-training on {location(cube_path).name}",
        started=started,
    )


@task(name="pretrain-model", tags=["gpu"])
def pretrain_model_task(
    cube_path: Path, out_dir: Path, model_config: dict | None = None, **kwargs: object
) -> TrainResult:
    """`pretrain_model` as a Prefect task (tag `gpu`)."""
    return pretrain_model(cube_path, out_dir, model_config, **kwargs)
