"""Soft intersection-over-union loss, optionally combined with cross-entropy.

Mohammadi, S., Belgiu, M., Stein, A. (2021). "3D fully convolutional neural networks with intersection over
union loss for crop mapping from multi-temporal satellite images". IGARSS 2021.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class IoULoss(nn.Module):
    """Soft IoU loss `mean_k (1 - IoU_k)` over the classes present in the labelled pixels of the batch.

    `IoU_k = (sum(p_k * y_k) + eps) / (sum(p_k + y_k - p_k * y_k) + eps)` with `p` the softmax probabilities and
    `y` the one-hot target, summed over all labelled pixels of the batch. Pixels whose target is `ignore_index`
    count in neither sum. Averaging over the present classes (the paper sums over all classes) keeps the loss in
    [0, 1] and at 0 for a perfect prediction whatever the number of classes; `eps` only smooths the ratio.
    With `ce_weight > 0`, `ce_weight * cross_entropy` is added. Computed in float32, also under autocast.
    A batch without labelled pixels gives a zero loss.
    """

    def __init__(self, ce_weight: float = 0.0, ignore_index: int = -1, eps: float = 1e-6) -> None:
        super().__init__()
        self.ce_weight = ce_weight
        self.ignore_index = ignore_index
        self.eps = eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss for logits (B, K, H, W) and integer target (B, H, W)."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            log_p = logits.float().log_softmax(dim=1)
            labelled = (target != self.ignore_index).unsqueeze(1)  # (B, 1, H, W)
            classes = torch.where(labelled.squeeze(1), target.long(), 0)
            y = F.one_hot(classes, logits.shape[1]).movedim(-1, 1).float() * labelled  # (B, K, H, W), 0 where ignored
            p = log_p.exp() * labelled
            dims = (0, 2, 3)
            intersection = (p * y).sum(dims)
            union = (p + y).sum(dims) - intersection
            iou = (intersection + self.eps) / (union + self.eps)
            present = y.sum(dims) > 0
            loss = ((1.0 - iou) * present).sum() / present.sum().clamp(min=1)
            if self.ce_weight > 0:
                ce = -(log_p * y).sum() / labelled.sum().clamp(min=1)
                loss = loss + self.ce_weight * ce
            return loss


def labelled_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Cross-entropy of logits `(B, K, H, W)` with integer targets `(B, H, W)`, averaged over the labelled pixels
    (0 when there is none); computed in float32, also under autocast."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        ce = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="sum")
        return ce / (target != ignore_index).sum().clamp(min=1)


def pixel_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-pixel `KL(softmax(teacher / T) || softmax(student / T))` over the class axis: (B, K, H, W) -> (B, H, W).

    Computed in float32 (also under autocast); gradients flow into both arguments.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_q = (student_logits.float() / temperature).log_softmax(dim=1)
        log_p = (teacher_logits.float() / temperature).log_softmax(dim=1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Knowledge-distillation loss `T^2 * mean over pixels of weight * KL(p_teacher^T || p_student^T)`.

    Hinton, Vinyals & Dean (2015), "Distilling the knowledge in a neural network": soft targets at temperature T,
    scaled by T^2 so that the gradient magnitude does not depend on T. Logits are (B, K, H, W); `weight` (B, H, W)
    scales each pixel (e.g. modality weights); `mask` (B, H, W) bool keeps only some pixels (the mean runs over the
    kept pixels; none kept gives 0). The teacher is a fixed target: no gradient flows into `teacher_logits`.
    """
    kl = pixel_kl(teacher_logits.detach(), student_logits, temperature) * temperature**2
    if weight is not None:
        kl = kl * weight.float()
    if mask is None:
        return kl.mean()
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the entries where `mask` is True (masked pre-training's reconstruction loss).

    Qin et al. (JAG 2025), "Spatiotemporal masked pre-training for advancing crop mapping on satellite image time
    series with limited labels": only the hidden pixel-dates count. `mask` is bool and broadcasts to `prediction`
    (e.g. (B, T, 1, H, W) for (B, T, C, H, W)); the mean runs over the selected elements, every channel counted.
    Unselected entries do not count at all (NaN targets there are fine). Computed in float32, also under autocast;
    an empty mask gives 0 (with a graph, so `backward` still works).
    """
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        selected = mask.expand_as(prediction)
        error = torch.where(selected, prediction.float() - target.float(), 0.0)  # no NaN gradient from unselected
        return error.square().sum() / selected.sum().clamp(min=1)
