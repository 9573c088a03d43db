"""Teacher -> student distillation runs, through the shared epoch loop of `tasks.train`.

- `distill_incomplete`: Wang, Belgiu et al. (2025), "Joint feature reconstruction and prediction for incomplete
  satellite image time series" (arXiv 2505.19159). The teacher is a trained checkpoint of a temporal-encoder
  model (e.g. ltae, stcln); the student is `joint_reconstruction` around the same backbone and config, trained on
  the series with simulated cloud gaps (`models.masking.cloud_gap_mask`, 0-80 % of the dates) against the labels,
  the teacher's logits and the teacher's features (`JointReconstruction.training_losses`).
- `distill_modalities`: Wang et al., "Multi-modality transfer learning for cloudy remote sensing images with
  knowledge distillation". (1) A teacher on nearly cloud-free optical patches (`min_valid_fraction`); (2) an
  auxiliary optical student on the series with simulated cloud gaps and an auxiliary SAR student, both from the
  teacher's pseudo-labels kept where it is confident (`pseudo_label_loss`); (3) the target `modality_distillation`
  model on cloudy optical + SAR, with the label term and the three distillation terms weighted per pixel
  (`ModalityDistillation.training_losses`).

Students use their teacher's normalisation and start from its weights wherever a parameter has the same name and
shape (`warm_start`): the student of a teacher with the same backbone starts where the teacher is, only a new head or
branch starts afresh. Each stage writes `model.pt`, `last.pt` and `train_metrics.csv` and is validated on the
labelled val split like `train_model`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from prefect import task
from torch import nn

from infra.errors import CropflowError
from infra.storage import location
from models.masking import cloud_gap_mask
from models.modality_distillation import MultiModalBatch, hide_unobserved, pseudo_label_loss
from models.registry import build_model
from tasks.dataset import make_loader
from tasks.train import (
    SAR_SENSOR,
    SENSOR,
    Batch,
    BatchLoss,
    Forward,
    TrainData,
    TrainOptions,
    TrainResult,
    checkpoint_meta,
    checkpoint_model,
    datasets,
    default_forward,
    fit_loop,
    load_best,
    load_training_data,
    read_checkpoint,
    resolve_device,
    step_generator,
    train_model,
    val_scores,
)

GAP_RATE = (0.0, 0.8)
_SETTINGS = ("in_channels", "num_classes")
# Shares of a time budget among the stages of `distill_modalities`: the target runs five models per step.
STAGE_SHARES = {"teacher": 1.0, "optical_student": 1.0, "sar_student": 1.0, "target": 2.0}


def _gaps(batch: Batch, seed: int, step: int, rate: tuple[float, float]) -> torch.Tensor:
    """Simulated cloud gaps (B, T) of one step (random or contiguous dates, a rate in `rate` per sample)."""
    b, t = batch[1].shape
    return cloud_gap_mask(b, t, step_generator(seed, step, batch[0].device), rate=rate)


def incomplete_loss(student: nn.Module, teacher: nn.Module, seed: int, gap_rate: tuple[float, float]) -> BatchLoss:
    """Batch loss of a `joint_reconstruction` student: its `training_losses` total with the step's simulated gaps."""

    def batch_loss(batch: Batch, step: int) -> torch.Tensor:
        gaps = _gaps(batch, seed, step, gap_rate)
        return student.training_losses(*batch[:4], teacher, gaps)["total"]

    return batch_loss


def optical_student_loss(
    optical: nn.Module, teacher: nn.Module, seed: int, gap_rate: tuple[float, float], threshold: float
) -> BatchLoss:
    """Batch loss of the auxiliary optical student: the teacher's confident pseudo-labels, the optical series with
    the step's simulated gaps hidden."""

    def batch_loss(batch: Batch, step: int) -> torch.Tensor:
        valid = batch[2] & ~_gaps(batch, seed, step, gap_rate)[..., None, None]
        logits = optical(hide_unobserved(batch[0], valid), batch[1], valid)
        return pseudo_label_loss(logits, _logits(teacher, batch), threshold)

    return batch_loss


def sar_student_loss(sar: nn.Module, teacher: nn.Module, threshold: float) -> BatchLoss:
    """Batch loss of the auxiliary SAR student: the teacher's confident pseudo-labels from the SAR series."""
    return lambda batch, step: pseudo_label_loss(sar(*batch[4:7]), _logits(teacher, batch), threshold)


def modality_target_loss(
    target: nn.Module,
    teacher: nn.Module,
    optical: nn.Module,
    sar: nn.Module,
    seed: int,
    gap_rate: tuple[float, float],
) -> BatchLoss:
    """Batch loss of the `modality_distillation` target: its `training_losses` total with the step's gaps."""

    def batch_loss(batch: Batch, step: int) -> torch.Tensor:
        pair = MultiModalBatch(*batch[:3], *batch[4:7])
        gaps = _gaps(batch, seed, step, gap_rate)
        return target.training_losses(pair, batch[3], teacher, optical, sar, gaps)["total"]

    return batch_loss


def _logits(teacher: nn.Module, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return teacher(*batch[:3])


def _setup(
    cube_path: Path, labels_path: Path, classes_path: Path, options: TrainOptions, sar: bool
) -> tuple[TrainData, torch.device]:
    data = load_training_data(cube_path, labels_path, classes_path, sar, options.label_options, options.seed)
    return data, resolve_device(options.device)


def frozen(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device` in eval mode without gradients (a teacher or auxiliary source)."""
    model.requires_grad_(False)
    return model.to(device).eval()


def warm_start(model: nn.Module, teacher: nn.Module) -> nn.Module:
    """`model` with the teacher's weights wherever a parameter or buffer has the same name and shape (the student of
    a teacher with the same backbone starts where the teacher is; only a new head or branch starts afresh)."""
    own = model.state_dict()
    model.load_state_dict(
        {k: v for k, v in teacher.state_dict().items() if k in own and own[k].shape == v.shape}, strict=False
    )
    return model


def load_teacher(path: Path, data: TrainData, device: torch.device) -> tuple[nn.Module, dict, TrainData]:
    """The frozen teacher at `path`, its checkpoint, and `data` in its band order and normalisation.

    A teacher is a supervised model of the optical bands alone (`sensor` s2, no SAR input) with the run's bands and
    classes; anything else is refused with a `CropflowError` saying what it is.
    """
    ckpt = read_checkpoint(path, "teacher checkpoint")
    hint = "give the model.pt of a supervised optical run (e.g. cropflow train --model ltae) as the teacher."
    if ckpt.get("kind") == "pretrained_encoder":
        raise CropflowError(f"teacher {path} is a masked pre-training checkpoint (an encoder, no classifier); {hint}")
    if ckpt.get("sensor") != SENSOR or "sar" in ckpt:
        sensors = "+".join([str(ckpt.get("sensor")), *([ckpt["sar"]["sensor"]] if "sar" in ckpt else [])])
        raise CropflowError(
            f"teacher {path} is a {ckpt.get('model_name')} model of {sensors} bands, not of the optical ({SENSOR}) "
            f"bands alone; {hint}"
        )
    model = checkpoint_model(ckpt, path, data.cube.bands, data.classes)
    return frozen(model, device), ckpt, data.with_norm(ckpt)


def distill_incomplete(
    cube_path: Path,
    labels_path: Path,
    classes_path: Path,
    out_dir: Path,
    teacher: Path,
    student_config: dict | None = None,
    gap_rate: tuple[float, float] = GAP_RATE,
    options: TrainOptions = TrainOptions(),  # noqa: B008 (frozen dataclass)
) -> TrainResult:
    """Train `joint_reconstruction` (backbone and config of the `teacher` checkpoint, starting from its weights;
    other settings in `student_config`) by joint reconstruction and distillation from the teacher; see the module
    docstring."""
    started = time.monotonic()
    data, dev = _setup(cube_path, labels_path, classes_path, options, sar=False)
    teacher_model, ckpt, data = load_teacher(teacher, data, dev)
    backbone = {k: v for k, v in ckpt["model_config"].items() if k not in _SETTINGS}
    config = {"backbone": ckpt["model_name"], "backbone_config": backbone} | dict(student_config or {})
    config |= {"in_channels": len(data.cube.bands), "num_classes": len(data.classes)}
    torch.manual_seed(options.seed)
    student = build_model("joint_reconstruction", **config)
    warm_start(student.student, teacher_model)
    meta = checkpoint_meta("joint_reconstruction", config, data) | {"distilled_from": str(teacher)}
    train_ds, val_ds = datasets(data, options)
    val_loader = make_loader(val_ds, options.batch_size)

    return fit_loop(
        student,
        incomplete_loss(student, teacher_model, options.seed, gap_rate),
        train_ds,
        lambda: val_scores(student, val_loader, dev, data.classes),
        meta,
        out_dir,
        options,
        dev,
        description=f"joint reconstruction distillation from {location(teacher).name}",
        started=started,
    )


def _load_best(model: nn.Module, result: TrainResult, device: torch.device) -> nn.Module:
    """`model` with the weights of the best checkpoint of its run, frozen."""
    return frozen(load_best(model, result), device)


def distill_modalities(
    cube_path: Path,
    labels_path: Path,
    classes_path: Path,
    out_dir: Path,
    teacher: Path | None = None,
    teacher_name: str = "ltae",
    teacher_config: dict | None = None,
    student_name: str | None = None,
    student_config: dict | None = None,
    target_config: dict | None = None,
    min_valid_fraction: float = 0.8,
    threshold: float = 0.7,
    gap_rate: tuple[float, float] = GAP_RATE,
    options: TrainOptions = TrainOptions(),  # noqa: B008 (frozen dataclass)
) -> dict[str, TrainResult]:
    """The stages of optical + SAR distillation; returns their results by stage name (`teacher` when trained here,
    `optical_student`, `sar_student`, `target`). The target `modality_distillation` model is written to `out_dir`
    itself (`model.pt`, the model of the run), the other stages to `out_dir/<stage>/`.

    `teacher`: a trained optical checkpoint (`load_teacher`), else one is trained (`teacher_name`,
    `teacher_config`) with `train_model` on patches with at least `min_valid_fraction` observed pixel-dates. The
    auxiliary students and the target's two backbones are `student_name` with `student_config` (default: the
    teacher's model and config, so that the optical student and the target's optical branch start from the
    teacher's weights); `target_config` sets the target's other arguments (`embed_dim`, `temperature`, `tau`,
    weights). `threshold`: confidence of the kept pseudo-labels. `options.time_budget_s` is shared by the stages
    run, in the proportions of `STAGE_SHARES`.
    """
    out_dir = location(out_dir)
    results: dict[str, TrainResult] = {}
    stages = [*(["teacher"] if teacher is None else []), "optical_student", "sar_student", "target"]

    def stage_options(name: str) -> TrainOptions:
        if options.time_budget_s is None:
            return options
        share = STAGE_SHARES[name] / sum(STAGE_SHARES[s] for s in stages)
        return dataclasses.replace(options, time_budget_s=share * options.time_budget_s)

    if teacher is None:
        augment = {"min_valid_fraction": min_valid_fraction, "date_dropout": 0.0}
        kwargs = dataclasses.asdict(stage_options("teacher")) | {"augment": augment, "model_config": teacher_config}
        results["teacher"] = train_model(
            cube_path, labels_path, classes_path, out_dir / "teacher", teacher_name, **kwargs
        )
        teacher = results["teacher"].checkpoint
    data, dev = _setup(cube_path, labels_path, classes_path, options, sar=True)
    teacher_model, ckpt, data = load_teacher(teacher, data, dev)
    if student_name is None:
        student_name = ckpt["model_name"]
        student_config = {k: v for k, v in ckpt["model_config"].items() if k not in _SETTINGS} | (student_config or {})
    if student_name == "random_forest":
        raise CropflowError(
            "the students of optical + SAR distillation learn by gradient descent and cannot be random forests; "
            "distill from a teacher of another model (e.g. ltae) or give student_name."
        )
    train_ds, val_ds = datasets(data, options)
    val_loader = make_loader(val_ds, options.batch_size)
    student_config = dict(student_config or {})
    sizes = {"num_classes": len(data.classes)}

    def run(name: str, model: nn.Module, loss: BatchLoss, forward: Forward, meta: dict, folder: Path) -> nn.Module:
        results[name] = fit_loop(
            model,
            loss,
            train_ds,
            lambda: val_scores(model, val_loader, dev, data.classes, forward),
            meta,
            folder,
            stage_options(name),
            dev,
            description=f"{name} of optical + SAR distillation",
        )
        return _load_best(model, results[name], dev)

    torch.manual_seed(options.seed)
    optical_args = student_config | sizes | {"in_channels": len(data.cube.bands)}
    optical = warm_start(build_model(student_name, **optical_args), teacher_model)
    meta = checkpoint_meta(student_name, optical_args, data)
    optical_loss = optical_student_loss(optical, teacher_model, options.seed, gap_rate, threshold)
    optical = run("optical_student", optical, optical_loss, lambda m, b: m(*b[:3]), meta, out_dir / "optical_student")

    sar_args = student_config | sizes | {"in_channels": len(data.sar.bands)}
    sar = build_model(student_name, **sar_args)
    meta = checkpoint_meta(student_name, sar_args, data, sensor=SAR_SENSOR)
    sar_loss = sar_student_loss(sar, teacher_model, threshold)
    sar = run("sar_student", sar, sar_loss, lambda m, b: m(*b[4:7]), meta, out_dir / "sar_student")

    target_args = {"optical_backbone": student_name, "optical_config": student_config, "sar_backbone": student_name}
    target_args |= {"sar_config": student_config} | dict(target_config or {}) | sizes
    target_args |= {"in_channels": len(data.cube.bands), "sar_channels": len(data.sar.bands)}
    target = build_model("modality_distillation", **target_args)
    warm_start(target.optical, teacher_model)

    target_loss = modality_target_loss(target, teacher_model, optical, sar, options.seed, gap_rate)
    meta = checkpoint_meta("modality_distillation", target_args, data, multimodal=True)
    run("target", target, target_loss, default_forward, meta | {"distilled_from": str(teacher)}, out_dir)
    return results


@task(name="distill-incomplete", tags=["gpu"])
def distill_incomplete_task(
    cube_path: Path, labels_path: Path, classes_path: Path, out_dir: Path, teacher: Path, **kwargs: object
) -> TrainResult:
    """`distill_incomplete` as a Prefect task (tag `gpu`)."""
    return distill_incomplete(cube_path, labels_path, classes_path, out_dir, teacher, **kwargs)


@task(name="distill-modalities", tags=["gpu"])
def distill_modalities_task(
    cube_path: Path, labels_path: Path, classes_path: Path, out_dir: Path, **kwargs: object
) -> dict[str, TrainResult]:
    """`distill_modalities` as a Prefect task (tag `gpu`)."""
    return distill_modalities(cube_path, labels_path, classes_path, out_dir, **kwargs)
