"""Joint feature reconstruction and prediction (models/joint_reconstruction.py), around a small temporal encoder."""

from __future__ import annotations

import math
import time

import pytest
import torch
from model_helpers import TinyTemporalEncoder, inputs

from infra.errors import CropflowError
from models.joint_reconstruction import JointReconstruction
from models.masking import cloud_gap_mask
from models.registry import build_model

pytestmark = pytest.mark.usefixtures("one_thread", "tiny_backbone")

CONFIG = {"in_channels": 3, "num_classes": 4, "backbone": "tiny", "backbone_config": {"feature_dim": 16}}
CONFIG |= {"hidden_dim": 16, "heads": 2, "layers": 1}


def model(seed: int = 0, **overrides: object) -> JointReconstruction:
    torch.manual_seed(seed)
    return build_model("joint_reconstruction", **(CONFIG | overrides))


def phase_task(b: int = 2, t: int = 10, c: int = 3, size: int = 12, k: int = 4, seed: int = 0):
    """Classes in 3x3 blocks that differ only by the phase of their temporal profile; a labelled border is -1."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, (b, size // 3, size // 3), generator=g).repeat_interleave(3, 1).repeat_interleave(3, 2)
    doy = torch.linspace(30, 330, t).round().long().repeat(b, 1)
    phase = 2 * math.pi * target / k
    profile = torch.sin(2 * math.pi * doy.float()[:, :, None, None] / 365 + phase.unsqueeze(1))
    x = profile.unsqueeze(2).repeat(1, 1, c, 1, 1) + 0.2 * torch.randn(b, t, c, size, size, generator=g)
    valid = torch.rand(b, t, size, size, generator=g) > 0.1
    target[:, 0, :] = -1
    return x, doy, valid, target


def gaps(b: int, t: int, rate: float | tuple[float, float], seed: int) -> torch.Tensor:
    """Simulated cloud gaps (B, T), random or contiguous."""
    return cloud_gap_mask(b, t, torch.Generator().manual_seed(seed), rate)


def pixel_accuracy(m: torch.nn.Module, x, doy, valid, target) -> float:
    with torch.no_grad():
        pred = m.eval()(x, doy, valid).argmax(1)
    m.train()
    return (pred == target)[target >= 0].float().mean().item()


def trained_teacher(x, doy, valid, target) -> TinyTemporalEncoder:
    torch.manual_seed(1)
    teacher = TinyTemporalEncoder(3, 4, feature_dim=16)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for step in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(teacher(x, doy, valid), target, ignore_index=-1).backward()
        opt.step()
        if step % 10 == 9 and pixel_accuracy(teacher, x, doy, valid, target) > 0.98:
            break
    assert pixel_accuracy(teacher, x, doy, valid, target) > 0.95
    return teacher.eval()


@pytest.fixture(scope="module")
def task_and_teacher():
    x, doy, valid, target = phase_task()
    return (x, doy, valid, target), trained_teacher(x, doy, valid, target)


@pytest.mark.parametrize(("t", "h", "w"), [(1, 7, 5), (6, 13, 9), (11, 4, 17)])
def test_output_shape_any_size_and_date_count(t: int, h: int, w: int) -> None:
    logits = model()(*inputs(2, t, 3, h, w))
    assert logits.shape == (2, 4, h, w)
    assert torch.isfinite(logits).all()


def test_unobserved_dates_do_not_change_the_output() -> None:
    m = model().eval()
    x, doy, valid = inputs(2, 6, 3, 9, 7)
    valid[0, 2] = False  # a whole date
    valid[1, :, 4, 4] = False  # a pixel never observed
    changed = torch.where(valid.unsqueeze(2), x, 100 * torch.randn_like(x))
    with torch.no_grad():
        out = m(x, doy, valid)
        assert torch.isfinite(out).all()
        assert torch.allclose(m(changed, doy, valid), out, atol=1e-5)
        assert not torch.allclose(m(x, doy, torch.ones_like(valid)), out, atol=1e-3)
        assert torch.equal(m(x, doy, None), m(x, doy, torch.ones_like(valid)))


def test_reconstruction_fills_only_unobserved_dates() -> None:
    m = model().eval()
    x, doy, valid = inputs(1, 5, 3, 6, 6)
    with torch.no_grad():
        own = m.student.encode(x * valid.unsqueeze(2), doy, valid)
        rebuilt = m.features(x, doy, valid)
    rebuilt, own = rebuilt.movedim(2, -1), own.movedim(2, -1)  # (B, T, H, W, D)
    assert torch.equal(rebuilt[valid], own[valid])
    assert not torch.allclose(rebuilt[~valid], own[~valid], atol=0.1)


def test_gradients_reach_every_parameter() -> None:
    m = model()
    x, doy, valid = inputs(2, 6, 3, 8, 7)
    target = torch.randint(-1, 4, (2, 8, 7))
    teacher = TinyTemporalEncoder(3, 4, feature_dim=16)
    losses = m.training_losses(x, doy, valid, target, teacher, gaps(2, 6, 0.5, 0))
    assert set(losses) == {"ce", "distill", "align", "total"}
    assert all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses.values())
    assert losses["align"] > 0
    losses["total"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 1e-7, name
    assert all(p.grad is None for p in teacher.parameters())


def test_total_loss_is_the_weighted_sum() -> None:
    x, doy, valid = inputs(2, 6, 3, 8, 7)
    target = torch.randint(-1, 4, (2, 8, 7))
    teacher = TinyTemporalEncoder(3, 4, feature_dim=16)
    gap = gaps(2, 6, 0.5, 0).unsqueeze(-1).unsqueeze(-1).expand(2, 6, 8, 7)  # per-pixel gap masks work too
    m = model(ce_weight=0.5, distill_weight=2.0, align_weight=3.0)
    with torch.no_grad():
        losses = m.training_losses(x, doy, valid, target, teacher, gap)
    expected = 0.5 * losses["ce"] + 2.0 * losses["distill"] + 3.0 * losses["align"]
    assert losses["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    no_gap = m.training_losses(x, doy, valid, target, teacher, torch.zeros(2, 6, dtype=torch.bool))
    assert no_gap["align"].item() == 0.0


def test_backbone_and_teacher_must_fit() -> None:
    with pytest.raises(CropflowError, match="fcn3d"):
        build_model("joint_reconstruction", in_channels=3, num_classes=4, backbone="fcn3d")
    x, doy, valid = inputs(1, 4, 3, 5, 5)
    target = torch.zeros(1, 5, 5, dtype=torch.long)
    with pytest.raises(CropflowError, match="8 channels"):
        model().training_losses(x, doy, valid, target, TinyTemporalEncoder(3, 4, feature_dim=8), gaps(1, 4, 0.5, 0))


def test_tiny_batch_is_overfit_under_cloud_gaps(task_and_teacher) -> None:
    (x, doy, valid, target), teacher = task_and_teacher
    m = model(3)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    test_gap = gaps(2, 10, 0.4, 99).unsqueeze(-1).unsqueeze(-1)
    start = time.perf_counter()
    for step in range(300):
        opt.zero_grad()
        m.training_losses(x, doy, valid, target, teacher, gaps(2, 10, (0.0, 0.8), step))["total"].backward()
        opt.step()
        if step % 10 == 9 and pixel_accuracy(m, x, doy, valid & ~test_gap, target) > 0.97:
            break
    assert pixel_accuracy(m, x, doy, valid & ~test_gap, target) > 0.97
    assert time.perf_counter() - start < 60


def test_training_aligns_reconstructed_with_teacher_features(task_and_teacher) -> None:
    (x, doy, valid, target), teacher = task_and_teacher
    m = model(4)
    m.student.load_state_dict(teacher.state_dict())  # the student starts from the teacher, as in practice
    held_out = gaps(2, 10, 0.5, 1234)

    def align() -> float:
        with torch.no_grad():
            return m.training_losses(x, doy, valid, target, teacher, held_out)["align"].item()

    before = align()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for step in range(100):  # about 0.3 x the initial error after 100 steps
        opt.zero_grad()
        m.training_losses(x, doy, valid, target, teacher, gaps(2, 10, (0.0, 0.8), step))["total"].backward()
        opt.step()
    assert align() < 0.5 * before


def test_same_seed_same_output() -> None:
    x, doy, valid = inputs(2, 5, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(model(1).eval()(x, doy, valid), model(1).eval()(x, doy, valid))
        assert not torch.equal(model(1).eval()(x, doy, valid), model(2).eval()(x, doy, valid))


def test_state_dict_round_trip(tmp_path) -> None:
    m = model().eval()
    path = tmp_path / "model.pt"
    torch.save({"model_name": "joint_reconstruction", "model_config": CONFIG, "state_dict": m.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    restored = model(7)
    restored.load_state_dict(ckpt["state_dict"])
    x, doy, valid = inputs(2, 5, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(restored.eval()(x, doy, valid), m(x, doy, valid))


def test_bfloat16_autocast() -> None:
    m = model()
    x, doy, valid = inputs(2, 6, 3, 7, 7)
    target = torch.randint(-1, 4, (2, 7, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = m.training_losses(x, doy, valid, target, TinyTemporalEncoder(3, 4, 16), gaps(2, 6, 0.5, 0))
        logits = m.eval()(x, doy, valid)
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses.values())
    losses["total"].backward()
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        assert torch.allclose(logits.float(), m(x, doy, valid), atol=0.2)


def test_torch_compile() -> None:
    m = model().eval()
    x, doy, valid = inputs(2, 6, 3, 7, 7)
    with torch.no_grad():
        assert torch.allclose(torch.compile(m)(x, doy, valid), m(x, doy, valid), atol=1e-4)


REAL_BACKBONES = {
    "ltae": {"embed_dims": (8, 16), "d_model": 16, "n_head": 4, "d_k": 4, "mlp_dims": (16,), "decoder_dims": (8,)},
    "stcln": {"hidden": 8, "d_model": 16, "num_layers": 1, "num_heads": 2, "window": 4},
}


@pytest.mark.parametrize("backbone", sorted(REAL_BACKBONES))
def test_real_backbones(backbone: str) -> None:
    """Shapes, masking and gradients with the project's temporal encoders (the teacher: the same backbone)."""
    config = CONFIG | {"backbone": backbone, "backbone_config": REAL_BACKBONES[backbone] | {"dropout": 0.0}}
    torch.manual_seed(0)
    m = build_model("joint_reconstruction", **config)
    teacher = build_model(backbone, in_channels=3, num_classes=4, **config["backbone_config"])
    if backbone == "stcln":  # its STA starts switched off (gamma = 0): its query and key would get no gradient
        with torch.no_grad():
            m.student.gamma.fill_(0.5)
    x, doy, valid = inputs(2, 5, 3, 9, 7)
    m.eval()
    with torch.no_grad():
        out = m(x, doy, valid)
        assert out.shape == (2, 4, 9, 7)
        assert m(x[:, :1], doy[:, :1], valid[:, :1]).shape == (2, 4, 9, 7)
        changed = torch.where(valid.unsqueeze(2), x, 100 * torch.randn_like(x))
        assert torch.allclose(m(changed, doy, valid), out, atol=1e-5)
    m.train()
    target = torch.randint(-1, 4, (2, 9, 7))
    losses = m.training_losses(x, doy, valid, target, teacher, gaps(2, 5, 0.5, 0))
    assert all(torch.isfinite(loss) for loss in losses.values())
    losses["total"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 1e-7, name
