"""Joint feature reconstruction and prediction for incomplete satellite image time series.

Wang, Belgiu et al. (2025), "Joint feature reconstruction and prediction for incomplete satellite image time
series" (arXiv 2505.19159). A teacher model is trained on complete series; a student receives the same series with
dates removed by simulated cloud gaps, rebuilds the per-date features of the removed dates so that they match the
teacher's, and predicts from the rebuilt features. The paper publishes no code; the choices made here:

- Backbone-agnostic: the student is any registry model following `models.base.TemporalEncoderModel`
  (`encode` -> per-date features (B, T, D, H, W), `classify` -> logits). Its `classify` is the prediction head.
- "Complete" series: the cube's own observations. The teacher gets the series with its real validity mask (cloudy
  pixel-dates of even the least-cloudy series stay marked invalid); the student additionally loses the dates of a
  simulated gap mask (random or contiguous, rates 0 to 80 %, see `models.masking`).
- Hidden observations are zeroed before the student's encoder, so nothing of a masked or cloudy pixel-date reaches
  the student, whatever its backbone does with `valid` (zero is the band mean after standardisation).
- Reconstruction branch: per pixel, a small pre-norm Transformer encoder over the dates (width `hidden_dim`, no
  dropout). Its input tokens are the projected student features at observed dates and a learned mask token at
  unobserved ones, each plus the sinusoidal day-of-year encoding of `models.ltae`. The mask tokens take part in
  attention as keys, as in the decoder of masked autoencoders, so a pixel without any observation still gets
  finite features.
  Only unobserved dates take the reconstructed features; observed dates keep the encoder's. The head then
  classifies all dates (`valid` all True).
- Losses (`training_losses`): cross-entropy with the labels (unlabelled = -1 ignored), distillation from the
  teacher's logits on every pixel (`models.losses.distillation_kl`: KL at temperature T, times T^2), and the mean
  squared error (`models.losses.masked_mse`) between the student's reconstructed and the teacher's features on the
  dates the gap mask removed and the teacher observed. The teacher is frozen (eval mode, no gradient) and must
  have the student's `feature_dim` (typically the same backbone and config, trained on the observed series).

At inference the model is a plain crop-type model: `forward(x, doy, valid) -> logits` (student encoder,
reconstruction, head); `valid` is the cube's validity mask, and every date of the input is a real date.

Cost: the reconstruction Transformer runs on every pixel; at the bench size (B=4, T=24, 64 x 64) with the default
L-TAE backbone a CPU training step takes about 4x the bare L-TAE's time and 2.4x its peak memory.
"""

from __future__ import annotations

import torch
from torch import nn

from infra.errors import CropflowError
from models.base import Count, Positive, TemporalEncoderModel, Weight
from models.losses import distillation_kl, labelled_cross_entropy, masked_mse
from models.ltae import doy_encoding


def as_temporal_encoder(model: nn.Module, name: str) -> TemporalEncoderModel:
    """`model` itself, after checking that it splits into `encode` and `classify` (else a `CropflowError`)."""
    if not isinstance(model, TemporalEncoderModel):
        raise CropflowError(f"backbone {name!r} has no encode/classify/feature_dim: it cannot be wrapped")
    return model


class FeatureReconstruction(nn.Module):
    """Rebuild per-date features where `observed` is False from the observed dates of the same pixel.

    (B, T, D, H, W) features, (B, T) doy, (B, T, H, W) bool `observed` -> (B, T, D, H, W) features.
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.project_in = nn.Linear(feature_dim, hidden_dim)
        self.mask_token = nn.Parameter(torch.zeros(hidden_dim))
        layer = nn.TransformerEncoderLayer(
            hidden_dim, heads, dim_feedforward=2 * hidden_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.project_out = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, feature_dim))
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, features: torch.Tensor, doy: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        b, t, d, h, w = features.shape
        tokens = self.project_in(features.permute(0, 3, 4, 1, 2).reshape(b * h * w, t, d))
        seen = observed.permute(0, 2, 3, 1).reshape(b * h * w, t, 1)
        tokens = torch.where(seen, tokens, self.mask_token.to(tokens.dtype))
        position = doy_encoding(doy, self.hidden_dim).to(tokens.dtype)  # (B, T, hidden)
        tokens = tokens + position.repeat_interleave(h * w, dim=0)
        rebuilt = self.project_out(self.transformer(tokens)).reshape(b, h, w, t, d).permute(0, 3, 4, 1, 2)
        return torch.where(observed.unsqueeze(2), features, rebuilt.to(features.dtype))


class JointReconstruction(nn.Module):
    """Student with feature reconstruction (Wang, Belgiu et al., 2025) around a registry backbone.

    Args:
        in_channels: bands per date; num_classes: K. Both are passed on to the backbone.
        backbone: registry name of a `TemporalEncoderModel` (e.g. "ltae", "stcln").
        backbone_config: the backbone's other keyword arguments.
        hidden_dim, heads, layers: size of the reconstruction Transformer.
        temperature: distillation temperature T.
        ce_weight, distill_weight, align_weight: weights of the three terms of the total training loss.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        backbone: str = "ltae",
        backbone_config: dict | None = None,
        hidden_dim: Count = 64,
        heads: Count = 4,
        layers: Count = 2,
        temperature: Positive = 2.0,
        ce_weight: Weight = 1.0,
        distill_weight: Weight = 1.0,
        align_weight: Weight = 1.0,
    ) -> None:
        super().__init__()
        from models.registry import build_model  # the registry imports this module

        config = dict(backbone_config or {}) | {"in_channels": in_channels, "num_classes": num_classes}
        self.student = as_temporal_encoder(build_model(backbone, **config), backbone)
        self.reconstruction = FeatureReconstruction(self.student.feature_dim, hidden_dim, heads, layers)
        self.temperature = temperature
        self.weights = {"ce": ce_weight, "distill": distill_weight, "align": align_weight}

    def features(self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Per-date features (B, T, D, H, W): the student's at observed dates, reconstructed elsewhere."""
        if valid is None:
            b, t, _, h, w = x.shape
            valid = torch.ones((b, t, h, w), dtype=torch.bool, device=x.device)
        x = x * valid.unsqueeze(2).to(x.dtype)  # nothing of an unobserved pixel-date reaches the student
        return self.reconstruction(self.student.encode(x, doy, valid), doy, valid)

    def head(self, features: torch.Tensor, doy: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) from complete per-date features."""
        b, t, _, h, w = features.shape
        return self.student.classify(features, doy, torch.ones((b, t, h, w), dtype=torch.bool, device=doy.device))

    def forward(self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, K, H, W) for x (B, T, C, H, W), doy (B, T) and valid (B, T, H, W)."""
        return self.head(self.features(x, doy, valid), doy)

    def training_losses(
        self,
        x: torch.Tensor,
        doy: torch.Tensor,
        valid: torch.Tensor,
        target: torch.Tensor,
        teacher: nn.Module,
        gap_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Named losses for one batch: "ce", "distill", "align" (unweighted) and their weighted sum "total".

        `valid` (B, T, H, W) is the observed series, which the teacher sees; `gap_mask` (B, T) or (B, T, H, W),
        True = removed by a simulated cloud gap, is hidden from the student; `target` (B, H, W), -1 = unlabelled.
        """
        teacher_model = as_temporal_encoder(teacher, "teacher")
        if teacher_model.feature_dim != self.student.feature_dim:
            raise CropflowError(
                f"teacher features have {teacher_model.feature_dim} channels, the student's {self.student.feature_dim}"
            )
        teacher.eval()
        with torch.no_grad():
            teacher_features = teacher_model.encode(x, doy, valid)
            teacher_logits = teacher_model.classify(teacher_features, doy, valid)
        gap = gap_mask.view(*gap_mask.shape, *(1,) * (valid.dim() - gap_mask.dim())).expand_as(valid)
        features = self.features(x, doy, valid & ~gap)
        logits = self.head(features, doy)
        ce = labelled_cross_entropy(logits, target)
        aligned = (gap & valid).unsqueeze(2)  # removed from the student, observed by the teacher
        losses = {
            "ce": ce,
            "distill": distillation_kl(logits, teacher_logits, self.temperature),
            "align": masked_mse(features, teacher_features, aligned),
        }
        losses["total"] = sum(self.weights[name] * loss for name, loss in losses.items())
        return losses
