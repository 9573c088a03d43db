"""Optical + SAR crop mapping under clouds by knowledge distillation with modality balancing.

Wang et al., "Multi-modality transfer learning for cloudy remote sensing images with knowledge distillation"
(ESCCS). Three stages: (1) a teacher is trained on cloud-free optical data; (2) an auxiliary optical student (on
cloudy optical data) and an auxiliary SAR student are trained on the teacher's pseudo-labels, kept only where the
teacher is confident; (3) a target model on cloudy optical + SAR data is distilled from the teacher and from both
auxiliary students, each term weighted by an information-regulation mechanism that measures how much each source
agrees with the teacher.

Adapted here from scene classification to per-pixel crop maps, with these formulas (logits z are (B, K, H, W);
`p^T = softmax(z / T)`, `KL_T(a, b) = sum_k a^T_k log(a^T_k / b^T_k)` per pixel):

- pseudo-labels: `argmax_k p_teacher` where `max_k softmax(z_teacher) >= threshold`, else -1 (ignored);
  the auxiliary students' loss is the cross-entropy with them (`pseudo_label_loss`).
- information regulation, per pixel: divergences `d = [0, KL_T(teacher, optical), KL_T(teacher, SAR)]` (the
  teacher agrees with itself), weights `w = softmax(-d / tau)` over the three sources (`information_weights`).
  The weights sum to 1 at each pixel, the teacher's is the largest, and among the auxiliaries the one closer to the
  teacher gets more; `tau` sets how sharply disagreement is penalised. They are constants (no gradient).
- target loss: `ce_weight * CE(labels) + distill_weight * sum_s mean_pixels(w_s * T^2 * KL_T(source_s, target))`.

Weights are per pixel, not per sample: in a crop map the unit of prediction is the pixel, and clouds (and SAR
effects such as layover or wet soil) differ from field to field inside one sample; a per-sample weight would let a
cloudy field and a clear neighbour share one trust level.

Two-modality interface (also in docs/architecture.md): optical `x` (B, T, C, H, W) with `doy` (B, T) and `valid`
(B, T, H, W), and SAR `x_sar` (B, T', C', H, W) with its own `doy_sar` (B, T') and `valid_sar` (B, T', H, W), all on
the same H x W grid; `MultiModalBatch` carries the six tensors. The target model is
`forward(x, doy, valid, x_sar, doy_sar, valid_sar) -> logits (B, K, H, W)`: each modality goes through its own
registry backbone (any crop-type model, built with `num_classes=embed_dim` so that its head gives an embedding
after its own temporal aggregation), the two embeddings are concatenated and a per-pixel MLP gives the logits.
Unobserved pixel-dates are zeroed before the backbones, so nothing of a cloudy observation reaches them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from models.base import Count, Positive, Weight
from models.losses import distillation_kl, labelled_cross_entropy, pixel_kl

SOURCES = ("teacher", "optical", "sar")


def hide_unobserved(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, C, H, W) with its unobserved pixel-dates (valid (B, T, H, W) False) set to 0."""
    return x if valid is None else x * valid.unsqueeze(2).to(x.dtype)


@dataclasses.dataclass(frozen=True)
class MultiModalBatch:
    """Optical and SAR time series of the same pixels (shapes in the module docstring)."""

    x: torch.Tensor
    doy: torch.Tensor
    valid: torch.Tensor
    x_sar: torch.Tensor
    doy_sar: torch.Tensor
    valid_sar: torch.Tensor

    def inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of `ModalityDistillation.forward`."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def with_optical_gaps(self, gap_mask: torch.Tensor | None) -> MultiModalBatch:
        """The batch with optical dates hidden where `gap_mask` ((B, T) or (B, T, H, W)) is True."""
        if gap_mask is None:
            return self
        gap = gap_mask.view(*gap_mask.shape, *(1,) * (self.valid.dim() - gap_mask.dim()))
        return dataclasses.replace(self, valid=self.valid & ~gap)


def filter_pseudo_labels(teacher_logits: torch.Tensor, threshold: float, ignore_index: int = -1) -> torch.Tensor:
    """Teacher's class (B, H, W) where its softmax confidence is at least `threshold`, else `ignore_index`."""
    confidence, label = teacher_logits.detach().float().softmax(dim=1).max(dim=1)
    return torch.where(confidence >= threshold, label, ignore_index)


def pseudo_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Cross-entropy of an auxiliary student with the teacher's filtered pseudo-labels (0 if none is confident)."""
    return labelled_cross_entropy(student_logits, filter_pseudo_labels(teacher_logits, threshold))


def information_weights(
    teacher_logits: torch.Tensor,
    auxiliary_logits: Sequence[torch.Tensor],
    temperature: float = 1.0,
    tau: float = 1.0,
) -> torch.Tensor:
    """Per-pixel weights (B, 1 + M, H, W) of the teacher and M auxiliaries: `softmax(-[0, KL_T(teacher, aux_m)] / tau)`.

    Constants: computed without gradient.
    """
    with torch.no_grad():
        divergences = [pixel_kl(teacher_logits, aux, temperature) for aux in auxiliary_logits]
        d = torch.stack([torch.zeros_like(divergences[0]), *divergences], dim=1)
        return torch.softmax(-d / tau, dim=1)


class ModalityDistillation(nn.Module):
    """Target model on cloudy optical + SAR series, trained with modality-balanced distillation (Wang et al.).

    Args:
        in_channels: optical bands C; num_classes: K.
        sar_channels: SAR bands C' (e.g. 2 for VV, VH).
        optical_backbone, sar_backbone: registry names of the per-modality models.
        optical_config, sar_config: their other keyword arguments (`in_channels` and `num_classes` are set here).
        embed_dim: E, channels of each modality's embedding (its backbone's `num_classes`).
        temperature: distillation temperature T.
        tau: temperature of the information-regulation softmax.
        ce_weight, distill_weight: weights of the label and distillation terms of the total training loss.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        sar_channels: int = 2,
        optical_backbone: str = "ltae",
        optical_config: dict | None = None,
        sar_backbone: str = "ltae",
        sar_config: dict | None = None,
        embed_dim: Count = 32,
        temperature: Positive = 2.0,
        tau: Positive = 1.0,
        ce_weight: Weight = 1.0,
        distill_weight: Weight = 1.0,
    ) -> None:
        super().__init__()
        from models.registry import build_model  # the registry imports this module

        optical_config = dict(optical_config or {}) | {"in_channels": in_channels, "num_classes": embed_dim}
        sar_config = dict(sar_config or {}) | {"in_channels": sar_channels, "num_classes": embed_dim}
        self.optical = build_model(optical_backbone, **optical_config)
        self.sar = build_model(sar_backbone, **sar_config)
        self.fusion = nn.Sequential(
            nn.Conv2d(2 * embed_dim, embed_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(embed_dim, num_classes, 1)
        )
        self.sar_channels = sar_channels
        self.temperature, self.tau = temperature, tau
        self.ce_weight, self.distill_weight = ce_weight, distill_weight

    def forward(
        self,
        x: torch.Tensor,
        doy: torch.Tensor,
        valid: torch.Tensor | None,
        x_sar: torch.Tensor,
        doy_sar: torch.Tensor,
        valid_sar: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class logits (B, K, H, W) from optical (x, doy, valid) and SAR (x_sar, doy_sar, valid_sar) series."""
        optical = self.optical(hide_unobserved(x, valid), doy, valid)
        sar = self.sar(hide_unobserved(x_sar, valid_sar), doy_sar, valid_sar)
        return self.fusion(torch.cat([optical, sar], dim=1))

    def training_losses(
        self,
        batch: MultiModalBatch,
        target: torch.Tensor,
        teacher: nn.Module,
        optical_student: nn.Module,
        sar_student: nn.Module,
        gap_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Named losses: "ce", "distill_teacher", "distill_optical", "distill_sar" (each already weighted per pixel
        by the information regulation) and the total `ce_weight * ce + distill_weight * sum(distill_*)`.

        The teacher sees the optical series as observed (`batch.valid`); the optical student and the target model
        see it with the simulated cloud gaps `gap_mask` ((B, T) or (B, T, H, W), True = hidden) also removed and
        the hidden pixel-dates zeroed (train the optical student on `hide_unobserved(x, valid)` likewise); the SAR
        student sees the SAR series. The three source models are frozen (eval mode, no gradient).
        `target` (B, H, W): class ids, -1 = unlabelled.
        """
        cloudy = batch.with_optical_gaps(gap_mask)
        with torch.no_grad():
            sources = [
                teacher.eval()(batch.x, batch.doy, batch.valid),
                optical_student.eval()(hide_unobserved(cloudy.x, cloudy.valid), cloudy.doy, cloudy.valid),
                sar_student.eval()(batch.x_sar, batch.doy_sar, batch.valid_sar),
            ]
        weights = information_weights(sources[0], sources[1:], self.temperature, self.tau)
        logits = self(**cloudy.inputs())
        losses = {"ce": labelled_cross_entropy(logits, target)}
        for i, (name, source) in enumerate(zip(SOURCES, sources, strict=True)):
            losses[f"distill_{name}"] = distillation_kl(logits, source, self.temperature, weight=weights[:, i])
        distill = sum(losses[f"distill_{name}"] for name in SOURCES)
        losses["total"] = self.ce_weight * losses["ce"] + self.distill_weight * distill
        return losses
