"""STCLN: shapes, validity masking, windowed STA, training, masked pre-training and fine-tuning (CPU)."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from model_helpers import inputs

from models.base import TemporalEncoderModel
from models.masking import pretraining_mask
from models.registry import build_model
from models.stcln import ENCODER_PREFIXES, STCLN, window_attention

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"hidden": 8, "d_model": 32, "num_layers": 2, "num_heads": 4}


def small(seed: int = 0, **config: object) -> STCLN:
    torch.manual_seed(seed)
    return STCLN(3, 4, **{**SMALL, "window": 8, **config})


@pytest.mark.parametrize(("t", "h", "w", "window"), [(1, 9, 11, None), (7, 13, 21, 8), (3, 5, 70, 16), (25, 16, 16, 4)])
def test_output_shape_any_size_date_count_and_window(t: int, h: int, w: int, window: int | None) -> None:
    model = small(window=window)
    x, doy, valid = inputs(2, t, 3, h, w)
    logits = model(x, doy, valid)
    assert logits.shape == (2, 4, h, w)
    assert torch.isfinite(logits).all()
    features = model.encode(x, doy, valid)
    assert features.shape == (2, t, model.feature_dim, h, w) and model.feature_dim == 64


def test_forward_is_classify_of_encode() -> None:
    model = small().eval()
    assert isinstance(model, TemporalEncoderModel)
    x, doy, valid = inputs(2, 5, 3, 12, 10)
    with torch.no_grad():
        model.gamma.fill_(0.7)  # the STA branch takes part
        assert torch.equal(model(x, doy, valid), model.classify(model.encode(x, doy, valid), doy, valid))
        # without `valid`, no attention mask is built: other kernels, same result up to rounding
        assert torch.allclose(model(x, doy, None), model(x, doy, torch.ones_like(valid)), atol=1e-5)


def test_window_attention_is_attention_inside_each_tile() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 13, 21, 6, generator=g), torch.randn(2, 13, 21, 6, generator=g), torch.randn(2, 13, 21, 5)
    out = window_attention(q, k, v, window=8, scale=0.3)
    for rows in (slice(0, 8), slice(8, 13)):
        for cols in (slice(0, 8), slice(8, 16), slice(16, 21)):
            qt, kt, vt = (a[:, rows, cols].flatten(1, 2) for a in (q, k, v))
            expected = torch.softmax(qt @ kt.transpose(1, 2) * 0.3, dim=-1) @ vt
            assert torch.allclose(out[:, rows, cols].flatten(1, 2), expected, atol=1e-5)
    assert torch.allclose(window_attention(q, k, v, None, 0.3), window_attention(q, k, v, 21, 0.3), atol=1e-6)


def test_invalid_dates_do_not_change_the_output() -> None:
    model = small().eval()
    x, doy, valid = inputs(2, 6, 3, 11, 13)
    valid[0, :, 2, 3] = False  # a pixel without any valid date
    valid[1, 4] = False  # a whole cloudy date
    with torch.no_grad():
        model.gamma.fill_(0.7)
        reference = model(x, doy, valid)
        assert torch.isfinite(reference).all()
        changed = torch.where(valid.unsqueeze(2), x, 100 * torch.randn_like(x))
        assert torch.equal(model(changed, doy, valid), reference)
        # padding the series with invalid dates changes nothing either
        x_pad = torch.cat([x, torch.randn(2, 3, 3, 11, 13)], dim=1)
        doy_pad = torch.cat([doy, torch.full((2, 3), 366)], dim=1)
        valid_pad = torch.cat([valid, torch.zeros(2, 3, 11, 13, dtype=torch.bool)], dim=1)
        assert torch.allclose(model(x_pad, doy_pad, valid_pad), reference, atol=1e-5)
        # while valid dates matter
        assert not torch.allclose(model(torch.where(valid.unsqueeze(2), 2 * x, x), doy, valid), reference)


def test_day_of_year_matters() -> None:
    model = small().eval()
    x, doy, valid = inputs(1, 5, 3, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(model(x, doy, valid), model(x, doy + 30, valid))


def test_gradients_reach_every_parameter() -> None:
    """gamma starts at 0, so the STA's query and key get no gradient until gamma moves (checked first); with
    gamma != 0, every parameter learns (the classification loss plus the pre-training loss for its head)."""
    model = small(reconstruction_head=True)
    x, doy, valid = inputs(2, 6, 3, 10, 9)
    target = torch.randint(0, 4, (2, 10, 9))
    F.cross_entropy(model(x, doy, valid), target).backward()
    assert torch.all(model.query.weight.grad == 0) and torch.all(model.key.weight.grad == 0)
    assert model.gamma.grad.abs().item() > 1e-6

    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.gamma.fill_(0.5)
    mask = pretraining_mask((2, 6, 10, 9), torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(x, doy, valid), target) + model.pretrain_loss(x, doy, valid, mask)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 1e-6, name  # not just rounding noise


def test_parameter_count_at_paper_size() -> None:
    def count(c: int, k: int, **config: object) -> int:
        return sum(p.numel() for p in build_model("stcln", in_channels=c, num_classes=k, **config).parameters())

    assert count(10, 20) == 3_248_351  # stated in the module docstring
    assert count(4, 7) == 3_240_321 + 289 * 4 + 257 * 7
    assert count(10, 20, reconstruction_head=True) == 3_248_351 + 257 * 10


def test_same_seed_same_output_different_seed_different_output() -> None:
    x, doy, valid = inputs(2, 5, 3, 12, 12)

    def run(seed: int) -> torch.Tensor:
        model = small(seed)
        torch.manual_seed(seed)
        return model(x, doy, valid)  # training mode: dropout draws from the seeded generator

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_state_dict_round_trip(tmp_path) -> None:
    config = {"in_channels": 3, "num_classes": 4, **SMALL, "window": 8}
    torch.manual_seed(0)
    model = build_model("stcln", **config)
    x, doy, valid = inputs(2, 5, 3, 12, 12)
    model(x, doy, valid)  # one training-mode pass moves the BatchNorm running statistics
    with torch.no_grad():
        model.gamma.fill_(0.3)
    model.eval()
    path = tmp_path / "model.pt"
    torch.save({"model_name": "stcln", "model_config": config, "state_dict": model.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    torch.manual_seed(1)
    restored = build_model(ckpt["model_name"], **ckpt["model_config"])
    restored.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        assert torch.equal(restored.eval()(x, doy, valid), model(x, doy, valid))


def test_autocast_bfloat16() -> None:
    model = small().eval()
    x, doy, valid = inputs(2, 5, 3, 12, 12)
    with torch.no_grad():
        model.gamma.fill_(0.5)
        full = model(x, doy, valid)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x, doy, valid)
            loss = STCLN.pretrain_loss(small(reconstruction_head=True), x, doy, valid, ~valid)
    assert half.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.isfinite(half).all() and torch.isfinite(loss)
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()


def phase_batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Classes (in 4x4 blocks) differ only by the phase of their temporal profile: the time axis must be used."""
    torch.manual_seed(seed)
    b, t, c, size, k = 2, 8, 2, 16, 3
    target = torch.randint(0, k, (b, size // 4, size // 4)).repeat_interleave(4, 1).repeat_interleave(4, 2)
    phase = 2 * math.pi * target / k
    doy = torch.arange(t).repeat(b, 1) * 30 + 60
    dates = (doy.float() / 240).view(b, t, 1, 1)
    profile = torch.sin(2 * math.pi * dates + phase.unsqueeze(1))  # (B, T, H, W)
    x = profile.unsqueeze(2).repeat(1, 1, c, 1, 1) + 0.3 * torch.randn(b, t, c, size, size)
    valid = torch.rand(b, t, size, size) > 0.2
    return x, doy, valid, target


def test_tiny_batch_is_overfit() -> None:
    x, doy, valid, target = phase_batch()
    model = STCLN(2, 3, **SMALL, dropout=0.0, window=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def accuracy() -> float:
        with torch.no_grad():
            pred = model.eval()(x, doy, valid).argmax(1)
        model.train()
        return (pred == target).float().mean().item()

    assert accuracy() < 0.8
    start = time.perf_counter()
    for step in range(150):  # about 20 steps are enough with this seed
        opt.zero_grad()
        F.cross_entropy(model(x, doy, valid), target).backward()
        opt.step()
        if step % 5 == 4 and accuracy() > 0.98:
            break
    assert accuracy() > 0.98
    assert time.perf_counter() - start < 60


def unlabelled_batch() -> tuple[torch.Tensor, ...]:
    """Smooth seasonal profiles whose amplitude and phase vary by 4x4 parcel, plus noise: learnable to impute."""
    torch.manual_seed(0)
    b, t, c, size = 4, 10, 3, 12
    amplitude = (1 + torch.rand(b, 1, c, size // 4, size // 4)).repeat_interleave(4, 3).repeat_interleave(4, 4)
    phase = (2 * math.pi * torch.rand(b, 1, 1, size // 4, size // 4)).repeat_interleave(4, 3).repeat_interleave(4, 4)
    doy = torch.arange(t).repeat(b, 1) * 25 + 80
    dates = (doy.float() / 250).view(b, t, 1, 1, 1)
    x = amplitude * torch.sin(2 * math.pi * dates + phase) + 0.1 * torch.randn(b, t, c, size, size)
    valid = torch.rand(b, t, size, size) > 0.1
    return x, doy, valid


def test_pretraining_reduces_masked_mse_and_fine_tuning_starts_from_it() -> None:
    x, doy, valid = unlabelled_batch()
    torch.manual_seed(0)
    pretrained = STCLN(3, 1, **SMALL, dropout=0.0, reconstruction_head=True)
    held_out = pretraining_mask(valid.shape, torch.Generator().manual_seed(123))

    def held_out_loss() -> float:
        with torch.no_grad():
            loss = pretrained.eval().pretrain_loss(x, doy, valid, held_out).item()
        pretrained.train()
        return loss

    before = held_out_loss()
    opt = torch.optim.Adam(pretrained.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        opt.zero_grad()
        pretrained.pretrain_loss(x, doy, valid, pretraining_mask(valid.shape, g)).backward()
        opt.step()
    assert held_out_loss() < 0.3 * before

    torch.manual_seed(1)
    model = STCLN(3, 5, **SMALL)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_encoder(pretrained.state_dict())
    source = pretrained.state_dict()
    for name, value in model.state_dict().items():
        if name.startswith(ENCODER_PREFIXES):
            assert torch.equal(value, source[name]), name
        else:  # STA and classifier: fine-tuning's own initialisation
            assert torch.equal(value, fresh[name]), name
    assert not any(k.startswith("reconstruction") for k in model.state_dict())
    # the plain equivalent: strict=False, the pre-training head is the only unexpected key, nothing is missing
    twin = STCLN(3, 1, **SMALL)
    missing, unexpected = twin.load_state_dict(pretrained.state_dict(), strict=False)
    assert missing == [] and unexpected == ["reconstruction.weight", "reconstruction.bias"]
    # an encoder weight missing from the source is an error, not a silent fresh start
    partial = {k: v for k, v in source.items() if not k.startswith("cnn.")}
    with pytest.raises(KeyError, match="cnn"):
        model.load_encoder(partial)


def test_reconstruction_head_can_be_dropped() -> None:
    model = small(reconstruction_head=True)
    x, doy, valid = inputs(1, 4, 3, 8, 8)
    mask = torch.rand(1, 4, 8, 8) > 0.5
    assert model.reconstruct(x, doy, valid, mask).shape == x.shape
    model.drop_reconstruction_head()
    assert not any(k.startswith("reconstruction") for k in model.state_dict())
    with pytest.raises(RuntimeError, match="no reconstruction head"):
        model.pretrain_loss(x, doy, valid, mask)


def test_hidden_inputs_do_not_reach_the_reconstruction() -> None:
    model = small(reconstruction_head=True).eval()
    x, doy, valid = inputs(2, 5, 3, 9, 9)
    mask = pretraining_mask(valid.shape, torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.reconstruct(x, doy, valid, mask)
        changed = torch.where((valid & ~mask).unsqueeze(2), x, -50 * torch.randn_like(x))
        assert torch.equal(model.reconstruct(changed, doy, valid, mask), reference)


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    """Inductor compiles C++ kernels on CPU: 20 to 45 s on a busy 2-core machine, hence `slow`."""
    model = small().eval()
    x, doy, valid = inputs(2, 5, 3, 12, 12)
    with torch.no_grad():
        model.gamma.fill_(0.5)
        eager = model(x, doy, valid)
        compiled = torch.compile(model)(x, doy, valid)
    assert torch.allclose(compiled, eager, atol=1e-4)
