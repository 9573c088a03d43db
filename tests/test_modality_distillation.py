"""Optical + SAR distillation with modality balancing (models/modality_distillation.py) and the distillation loss."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch
from model_helpers import TinyTemporalEncoder

from models.losses import distillation_kl, pixel_kl
from models.masking import cloud_gap_mask
from models.modality_distillation import (
    ModalityDistillation,
    MultiModalBatch,
    filter_pseudo_labels,
    hide_unobserved,
    information_weights,
    pseudo_label_loss,
)
from models.registry import build_model

pytestmark = pytest.mark.usefixtures("one_thread", "tiny_backbone")

K = 4
CONFIG = {"in_channels": 3, "num_classes": K, "sar_channels": 2, "embed_dim": 8}
CONFIG |= {"optical_backbone": "tiny", "optical_config": {"feature_dim": 16}}
CONFIG |= {"sar_backbone": "tiny", "sar_config": {"feature_dim": 8}}


def batch(b: int, t: int, t_sar: int, h: int, w: int, seed: int = 0) -> MultiModalBatch:
    g = torch.Generator().manual_seed(seed)
    return MultiModalBatch(
        x=torch.randn(b, t, 3, h, w, generator=g),
        doy=torch.sort(torch.randint(1, 365, (b, t), generator=g), dim=1).values,
        valid=torch.rand(b, t, h, w, generator=g) > 0.3,
        x_sar=torch.randn(b, t_sar, 2, h, w, generator=g),
        doy_sar=torch.sort(torch.randint(1, 365, (b, t_sar), generator=g), dim=1).values,
        valid_sar=torch.rand(b, t_sar, h, w, generator=g) > 0.1,
    )


def model(seed: int = 0, **overrides: object) -> ModalityDistillation:
    torch.manual_seed(seed)
    return build_model("modality_distillation", **(CONFIG | overrides))


def gaps(b: int, t: int, rate: float | tuple[float, float], seed: int) -> torch.Tensor:
    return cloud_gap_mask(b, t, torch.Generator().manual_seed(seed), rate)


def two_modality_task(b: int = 2, t: int = 10, t_sar: int = 7, size: int = 12, seed: int = 0):
    """Classes in 3x3 blocks, told apart by the phase of their optical and (noisier) SAR temporal profiles."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, K, (b, size // 3, size // 3), generator=g).repeat_interleave(3, 1).repeat_interleave(3, 2)
    phase = (2 * math.pi * target / K).unsqueeze(1)

    def series(n: int, c: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
        doy = torch.linspace(30, 330, n).round().long().repeat(b, 1)
        profile = torch.sin(2 * math.pi * doy.float()[:, :, None, None] / 365 + phase)
        return profile.unsqueeze(2).repeat(1, 1, c, 1, 1) + noise * torch.randn(b, n, c, size, size, generator=g), doy

    x, doy = series(t, 3, 0.2)
    x_sar, doy_sar = series(t_sar, 2, 0.3)
    valid = torch.rand(b, t, size, size, generator=g) > 0.1
    data = MultiModalBatch(x, doy, valid, x_sar, doy_sar, torch.ones(b, t_sar, size, size, dtype=torch.bool))
    target[:, 0, :] = -1
    return data, target


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    return (logits.argmax(1) == target)[target >= 0].float().mean().item()


def fit(module: torch.nn.Module, loss_fn, done, steps: int = 300, lr: float = 1e-2) -> None:
    """Adam on `loss_fn(step)` until `done()` (checked every 10 steps)."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(step).backward()
        opt.step()
        if step % 10 == 9 and done():
            break
    opt.zero_grad()  # no gradient left behind: tests check that frozen models get none
    module.eval()


@pytest.fixture(scope="module")
def stages():
    """Stages 1 and 2: the teacher on clear optical series, then the auxiliary students on its filtered pseudo-labels
    (the optical one under simulated cloud gaps) learn the classes of a held-out gap mask and of SAR."""
    data, target = two_modality_task()
    torch.manual_seed(1)
    teacher = TinyTemporalEncoder(3, K, 16)

    def teacher_accuracy() -> float:
        with torch.no_grad():
            return accuracy(teacher.eval()(data.x, data.doy, data.valid), target)

    def teacher_loss(_: int) -> torch.Tensor:
        logits = teacher.train()(data.x, data.doy, data.valid)
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=-1)

    fit(teacher, teacher_loss, lambda: teacher_accuracy() > 0.98)
    assert teacher_accuracy() > 0.98
    with torch.no_grad():
        teacher_logits = teacher(data.x, data.doy, data.valid)
    optical, sar = TinyTemporalEncoder(3, K, 16), TinyTemporalEncoder(2, K, 8)

    def optical_loss(step: int) -> torch.Tensor:
        cloudy = data.with_optical_gaps(gaps(2, 10, (0.0, 0.8), step))
        logits = optical.train()(hide_unobserved(cloudy.x, cloudy.valid), cloudy.doy, cloudy.valid)
        return pseudo_label_loss(logits, teacher_logits, threshold=0.7)

    def sar_loss(_: int) -> torch.Tensor:
        return pseudo_label_loss(sar.train()(data.x_sar, data.doy_sar, data.valid_sar), teacher_logits, 0.7)

    held_out = data.with_optical_gaps(gaps(2, 10, 0.5, 7))

    def students_accuracy() -> tuple[float, float]:
        with torch.no_grad():
            optical_logits = optical.eval()(hide_unobserved(held_out.x, held_out.valid), held_out.doy, held_out.valid)
            sar_logits = sar.eval()(data.x_sar, data.doy_sar, data.valid_sar)
        return accuracy(optical_logits, target), accuracy(sar_logits, target)

    fit(optical, optical_loss, lambda: students_accuracy()[0] > 0.95, steps=400)
    fit(sar, sar_loss, lambda: students_accuracy()[1] > 0.95, steps=400)
    assert min(students_accuracy()) > 0.9
    return data, target, teacher, optical, sar


@pytest.mark.parametrize(("t", "t_sar", "h", "w"), [(1, 1, 7, 5), (6, 9, 13, 9), (11, 3, 4, 17)])
def test_output_shape_any_size_and_date_counts(t: int, t_sar: int, h: int, w: int) -> None:
    logits = model()(**batch(2, t, t_sar, h, w).inputs())
    assert logits.shape == (2, K, h, w)
    assert torch.isfinite(logits).all()


def test_unobserved_dates_do_not_change_the_output() -> None:
    m = model().eval()
    data = batch(2, 6, 5, 9, 7)
    data.valid[0, 2] = False
    changed = dataclasses.replace(
        data,
        x=torch.where(data.valid.unsqueeze(2), data.x, 100 * torch.randn_like(data.x)),
        x_sar=torch.where(data.valid_sar.unsqueeze(2), data.x_sar, 100 * torch.randn_like(data.x_sar)),
    )
    with torch.no_grad():
        out = m(**data.inputs())
        assert torch.allclose(m(**changed.inputs()), out, atol=1e-5)
        assert not torch.allclose(m(**data.with_optical_gaps(gaps(2, 6, 0.5, 0)).inputs()), out, atol=1e-3)


def test_batch_gaps_hide_optical_dates_only() -> None:
    data = batch(2, 6, 5, 4, 4)
    gap = torch.zeros(2, 6, dtype=torch.bool)
    gap[1, 3] = True
    cloudy = data.with_optical_gaps(gap)
    assert not cloudy.valid[1, 3].any()
    assert torch.equal(cloudy.valid[0], data.valid[0])
    assert cloudy.valid_sar is data.valid_sar
    assert data.with_optical_gaps(None) is data
    assert list(data.inputs()) == ["x", "doy", "valid", "x_sar", "doy_sar", "valid_sar"]


def test_pixel_kl_and_distillation_kl() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, K, 3, 5, generator=g), torch.randn(2, K, 3, 5, generator=g)
    assert torch.allclose(pixel_kl(a, a.clone(), 2.0), torch.zeros(2, 3, 5), atol=1e-6)
    assert distillation_kl(a, a + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant softmax
    kl = pixel_kl(a, b, 2.0)
    assert kl.shape == (2, 3, 5) and (kl > 0).all()
    p, q = (a / 2).softmax(1), (b / 2).softmax(1)
    assert torch.allclose(kl, (p * (p / q).log()).sum(1), atol=1e-5)
    assert distillation_kl(b, a, 2.0).item() == pytest.approx(4.0 * kl.mean().item(), rel=1e-5)
    weight, mask = torch.rand(2, 3, 5, generator=g), torch.rand(2, 3, 5, generator=g) > 0.5
    expected = (4.0 * kl * weight)[mask].mean()
    assert distillation_kl(b, a, 2.0, weight, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_kl(b, a, 2.0, mask=torch.zeros_like(mask)).item() == 0.0
    student, teacher = b.clone().requires_grad_(), a.clone().requires_grad_()
    distillation_kl(student, teacher, 2.0).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert distillation_kl(b.bfloat16(), a.bfloat16(), 2.0).dtype == torch.float32


def test_pseudo_labels_keep_only_confident_pixels() -> None:
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1]])
    logits = probs.log().T.reshape(1, 3, 2, 2)
    assert filter_pseudo_labels(logits, 0.75).tolist() == [[[0, -1], [2, -1]]]
    assert filter_pseudo_labels(logits, 0.7).tolist() == [[[0, -1], [2, 1]]]
    assert filter_pseudo_labels(logits, 0.0).tolist() == [[[0, 0], [2, 1]]]
    student = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = pseudo_label_loss(student, logits, 0.75)
    expected = torch.nn.functional.cross_entropy(student[..., [0, 1], [0, 0]].squeeze(0).T, torch.tensor([0, 2]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert (student.grad[..., 0, 1] == 0).all() and (student.grad[..., 1, 1] == 0).all()
    assert pseudo_label_loss(student, logits, 0.95).item() == 0.0


def test_information_weights_favour_the_modality_that_agrees_with_the_teacher() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(1, K, 1, 2, generator=g)
    other = 3 * torch.randn(1, K, 1, 2, generator=g)
    optical = torch.cat([teacher[..., :1], other[..., 1:]], dim=-1)  # agrees with the teacher at pixel 0 only
    sar = torch.cat([other[..., :1], teacher[..., 1:]], dim=-1)  # at pixel 1 only
    w = information_weights(teacher, [optical, sar], temperature=2.0)
    assert w.shape == (1, 3, 1, 2)
    assert torch.allclose(w.sum(1), torch.ones(1, 1, 2))
    assert (w[:, 0] >= w[:, 1]).all() and (w[:, 0] >= w[:, 2]).all()
    assert w[0, 1, 0, 0] > w[0, 2, 0, 0] and w[0, 2, 0, 1] > w[0, 1, 0, 1]
    assert w[0, 1, 0, 0].item() == pytest.approx(w[0, 0, 0, 0].item())  # full agreement: as trusted as the teacher
    assert torch.allclose(information_weights(teacher, [other, other], tau=1e6), torch.full((1, 3, 1, 2), 1 / 3))
    sharp, soft = information_weights(teacher, [optical, sar], tau=0.1), information_weights(teacher, [optical, sar])
    assert sharp[0, 2, 0, 0] < soft[0, 2, 0, 0]


def test_gradients_reach_every_parameter(stages) -> None:
    data, target, teacher, optical, sar = stages
    m = model()
    losses = m.training_losses(data, target, teacher, optical, sar, gaps(2, 10, 0.5, 0))
    assert set(losses) == {"ce", "distill_teacher", "distill_optical", "distill_sar", "total"}
    assert all(loss.dim() == 0 and torch.isfinite(loss) and loss > 0 for loss in losses.values())
    losses["total"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 1e-7, name
    for source in (teacher, optical, sar):
        assert all(p.grad is None for p in source.parameters())


def test_total_loss_is_the_weighted_sum(stages) -> None:
    data, target, teacher, optical, sar = stages
    m = model(ce_weight=0.5, distill_weight=3.0)
    with torch.no_grad():
        losses = m.training_losses(data, target, teacher, optical, sar, gaps(2, 10, 0.5, 0))
    distill = losses["distill_teacher"] + losses["distill_optical"] + losses["distill_sar"]
    assert losses["total"].item() == pytest.approx((0.5 * losses["ce"] + 3.0 * distill).item(), rel=1e-6)


def test_tiny_batch_is_overfit_under_cloud_gaps(stages) -> None:
    data, target, teacher, optical, sar = stages
    m = model(3)
    held_out = data.with_optical_gaps(gaps(2, 10, 0.6, 99))

    def held_out_accuracy() -> float:
        with torch.no_grad():
            acc = accuracy(m.eval()(**held_out.inputs()), target)
        m.train()
        return acc

    start = time.perf_counter()
    fit(
        m,
        lambda step: m.training_losses(data, target, teacher, optical, sar, gaps(2, 10, (0.0, 0.8), step))["total"],
        lambda: held_out_accuracy() > 0.97,
    )
    assert held_out_accuracy() > 0.97
    assert time.perf_counter() - start < 60


def test_same_seed_same_output() -> None:
    data = batch(2, 5, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(model(1).eval()(**data.inputs()), model(1).eval()(**data.inputs()))
        assert not torch.equal(model(1).eval()(**data.inputs()), model(2).eval()(**data.inputs()))


def test_state_dict_round_trip(tmp_path) -> None:
    m = model().eval()
    path = tmp_path / "model.pt"
    torch.save({"model_name": "modality_distillation", "model_config": CONFIG, "state_dict": m.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    restored = build_model(ckpt["model_name"], **ckpt["model_config"])
    restored.load_state_dict(ckpt["state_dict"])
    data = batch(2, 5, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(restored.eval()(**data.inputs()), m(**data.inputs()))


def test_bfloat16_autocast(stages) -> None:
    data, target, teacher, optical, sar = stages
    m = model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = m.training_losses(data, target, teacher, optical, sar, gaps(2, 10, 0.5, 0))
        logits = m.eval()(**data.inputs())
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses.values())
    losses["total"].backward()
    with torch.no_grad():
        assert torch.allclose(logits.float(), m(**data.inputs()), atol=0.2)


def test_torch_compile() -> None:
    m = model().eval()
    data = batch(2, 6, 4, 7, 7)
    with torch.no_grad():
        assert torch.allclose(torch.compile(m)(**data.inputs()), m(**data.inputs()), atol=1e-4)


def test_real_backbones(stages) -> None:
    """L-TAE on the optical series and STCLN on the SAR series: shapes, masking and gradients."""
    data, target, teacher, optical, sar = stages
    ltae = {"embed_dims": (8, 16), "d_model": 16, "n_head": 4, "d_k": 4, "mlp_dims": (16,), "decoder_dims": (8,)}
    stcln = {"hidden": 8, "d_model": 16, "num_layers": 1, "num_heads": 2, "window": 4, "dropout": 0.0}
    torch.manual_seed(0)
    m = model(optical_backbone="ltae", optical_config=ltae | {"dropout": 0.0}, sar_backbone="stcln", sar_config=stcln)
    with torch.no_grad():
        m.sar.gamma.fill_(0.5)  # STCLN's STA starts switched off (gamma = 0): its query and key would get no gradient
        small = batch(2, 5, 3, 9, 7)
        out = m.eval()(**small.inputs())
        assert out.shape == (2, K, 9, 7)
        changed = dataclasses.replace(
            small,
            x=torch.where(small.valid.unsqueeze(2), small.x, 100 * torch.randn_like(small.x)),
            x_sar=torch.where(small.valid_sar.unsqueeze(2), small.x_sar, 100 * torch.randn_like(small.x_sar)),
        )
        assert torch.allclose(m(**changed.inputs()), out, atol=1e-5)
    # STCLN's mask token stands in for unobserved pixel-dates: it learns only where some SAR dates are missing
    patchy_sar = dataclasses.replace(data, valid_sar=torch.rand(data.valid_sar.shape) > 0.2)
    losses = m.train().training_losses(patchy_sar, target, teacher, optical, sar, gaps(2, 10, 0.5, 0))
    losses["total"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 1e-7, name


def test_describe_counts_flops_with_the_sar_series():
    from models.registry import build_model, describe

    line = describe(build_model("modality_distillation", in_channels=4, num_classes=3), (1, 5, 4, 16, 16))
    assert "ModalityDistillation" in line and "GFLOP" in line
