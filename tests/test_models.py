"""3D-FCN, soft IoU loss and model registry (fast, CPU only)."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import inputs
from torch.utils.flop_counter import FlopCounterMode

from infra.errors import CropflowError
from models.fcn3d import FCN3D
from models.losses import IoULoss
from models.registry import MODELS, build_model, describe

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = (8, 16, 32, 64)


@pytest.mark.parametrize(("t", "h", "w"), [(1, 37, 45), (7, 37, 45), (25, 16, 16), (4, 5, 70)])
def test_output_shape_any_size_and_date_count(t: int, h: int, w: int) -> None:
    model = FCN3D(in_channels=3, num_classes=5, widths=SMALL)
    logits = model(*inputs(2, t, 3, h, w))
    assert logits.shape == (2, 5, h, w)
    assert torch.isfinite(logits).all()


def test_valid_mask_is_an_input_only_when_configured() -> None:
    x, doy, valid = inputs(1, 5, 3, 16, 16)
    torch.manual_seed(0)
    model = FCN3D(3, 4, widths=SMALL).eval()
    assert model.encoder[0][0].in_channels == 4
    assert not torch.equal(model(x, doy, valid), model(x, doy, ~valid))
    assert torch.equal(model(x, doy, None), model(x, doy, torch.ones_like(valid)))
    blind = FCN3D(3, 4, widths=SMALL, use_valid_channel=False).eval()
    assert blind.encoder[0][0].in_channels == 3
    assert torch.equal(blind(x, doy, valid), blind(x, doy, ~valid))


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = FCN3D(in_channels=3, num_classes=4, widths=SMALL)
    x, doy, valid = inputs(2, 6, 3, 20, 18)
    target = torch.randint(0, 4, (2, 20, 18))
    IoULoss(ce_weight=1.0)(model(x, doy, valid), target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 1e-6, name  # not just rounding noise


def test_parameter_count_near_paper() -> None:
    model = build_model("fcn3d", in_channels=10, num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 4.9e6) / 4.9e6 < 0.10, n


def test_same_seed_same_output_different_seed_different_output() -> None:
    x, doy, valid = inputs(2, 5, 3, 16, 16)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return FCN3D(3, 4, widths=SMALL).eval()(x, doy, valid)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_state_dict_round_trip(tmp_path) -> None:
    config = {"in_channels": 3, "num_classes": 4, "widths": SMALL}
    torch.manual_seed(0)
    model = build_model("fcn3d", **config)
    x, doy, valid = inputs(2, 5, 3, 16, 16)
    model(x, doy, valid)  # one training-mode pass moves the BatchNorm running statistics
    model.eval()
    path = tmp_path / "model.pt"
    torch.save({"model_name": "fcn3d", "model_config": config, "state_dict": model.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    torch.manual_seed(1)
    restored = build_model(ckpt["model_name"], **ckpt["model_config"])
    restored.load_state_dict(ckpt["state_dict"])
    assert torch.equal(restored.eval()(x, doy, valid), model(x, doy, valid))


def tiny_logits() -> torch.Tensor:
    """Two classes, three pixels with probabilities (0.75, 0.25), (0.5, 0.5), (0.25, 0.75)."""
    third = math.log(3.0)
    return torch.tensor([[third, 0.0, 0.0], [0.0, 0.0, third]]).reshape(1, 2, 1, 3)


def test_iou_loss_hand_computed() -> None:
    # class 0: I = 0.75, U = 1.5 + 1 - 0.75 = 1.75; class 1: I = 1.25, U = 1.5 + 2 - 1.25 = 2.25
    loss = IoULoss()(tiny_logits(), torch.tensor([[[0, 1, 1]]]))
    assert loss.item() == pytest.approx(((1 - 0.75 / 1.75) + (1 - 1.25 / 2.25)) / 2, abs=1e-5)
    # only class 1 present: the mean runs over present classes
    loss = IoULoss()(tiny_logits(), torch.tensor([[[1, 1, 1]]]))
    assert loss.item() == pytest.approx(1 - 1.5 / 3.0, abs=1e-5)


def test_iou_loss_ignores_pixels_completely() -> None:
    target = torch.tensor([[[0, 1, -1]]])
    logits = tiny_logits().requires_grad_()
    loss = IoULoss()(logits, target)
    # class 0: I = 0.75, U = 1.25 + 1 - 0.75 = 1.5; class 1: I = 0.5, U = 0.75 + 1 - 0.5 = 1.25
    assert loss.item() == pytest.approx(((1 - 0.75 / 1.5) + (1 - 0.5 / 1.25)) / 2, abs=1e-5)
    loss.backward()
    assert torch.all(logits.grad[..., 2] == 0)
    changed = tiny_logits()
    changed[..., 2] = torch.tensor([5.0, -5.0]).reshape(1, 2, 1)
    assert IoULoss()(changed, target).item() == pytest.approx(loss.item(), abs=1e-7)
    with_ce = IoULoss(ce_weight=0.5)(changed, target).item()
    assert with_ce == pytest.approx(loss.item() - 0.5 * (math.log(0.75) + math.log(0.5)) / 2, abs=1e-5)
    assert IoULoss(ce_weight=1.0)(changed, torch.full_like(target, -1)).item() == 0.0


def test_iou_loss_perfect_prediction_is_zero() -> None:
    target = torch.randint(0, 4, (2, 9, 7))
    target[0, 0, :3] = -1
    logits = 30.0 * torch.nn.functional.one_hot(target.clamp(min=0), 6).movedim(-1, 1).float()
    assert IoULoss()(logits, target).item() < 1e-5
    assert IoULoss()(-logits, target).item() > 0.99


def test_iou_loss_float32_under_autocast() -> None:
    logits = torch.randn(2, 5, 8, 8)
    target = torch.randint(-1, 5, (2, 8, 8))
    loss_fn = IoULoss(ce_weight=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = loss_fn(logits.bfloat16(), target.to(torch.int16))
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(loss_fn(logits.bfloat16().float(), target).item(), abs=1e-6)


def test_tiny_batch_is_overfit() -> None:
    """Classes differ only by the phase of their temporal profile, so the time axis must be used."""
    torch.manual_seed(0)
    b, t, c, size, k = 2, 8, 2, 16, 3
    blocks = torch.randint(0, k, (b, size // 4, size // 4))
    target = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)
    phase = 2 * math.pi * target / k  # (B, H, W)
    dates = torch.arange(t).float().reshape(1, t, 1, 1)
    profile = torch.sin(2 * math.pi * dates / t + phase.unsqueeze(1))  # (B, T, H, W)
    x = profile.unsqueeze(2).repeat(1, 1, c, 1, 1) + 0.3 * torch.randn(b, t, c, size, size)
    target[:, :2, :2] = -1
    doy, valid = torch.zeros(b, t, dtype=torch.long), torch.ones(b, t, size, size, dtype=torch.bool)
    model = FCN3D(c, k, widths=SMALL)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = IoULoss(ce_weight=1.0)
    labelled = target >= 0

    def accuracy() -> float:
        with torch.no_grad():
            pred = model.eval()(x, doy, valid).argmax(1)
        model.train()
        return (pred == target)[labelled].float().mean().item()

    assert accuracy() < 0.8
    for step in range(100):  # about 30 steps (1 to 3 s on 2 CPU cores) are enough with this seed
        opt.zero_grad()
        loss_fn(model(x, doy, valid), target).backward()
        opt.step()
        if step % 5 == 4 and accuracy() > 0.95:
            break
    assert accuracy() > 0.95


def test_registry() -> None:
    assert MODELS["fcn3d"] is FCN3D
    assert isinstance(build_model("fcn3d", in_channels=4, num_classes=3, widths=SMALL), FCN3D)
    with pytest.raises(CropflowError, match=r"'unet'.*valid names: fcn3d"):
        build_model("unet", in_channels=4, num_classes=3)


def test_describe_counts_parameters_and_flops() -> None:
    model = build_model("fcn3d", in_channels=4, num_classes=3, widths=SMALL)
    n = sum(p.numel() for p in model.parameters())
    text = describe(model, (2, 6, 4, 30, 30))
    assert f"{n:,} parameters" in text
    x, doy, valid = inputs(2, 6, 4, 30, 30)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x, doy, valid)
    assert f"{counter.get_total_flops() / 1e9:.4g} GFLOP" in text
    assert next(model.parameters()).device.type == "cpu"
