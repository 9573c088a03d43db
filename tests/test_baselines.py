"""Baselines of issue 4: U-TAE, pixel-wise L-TAE, TempCNN, Random Forest; registry and describe (fast, CPU)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from model_helpers import inputs
from sklearn.ensemble import RandomForestClassifier
from torch import nn

from models.base import TemporalEncoderModel
from models.losses import IoULoss
from models.ltae import PixelLTAE, doy_encoding
from models.random_forest import RandomForest, temporal_features
from models.registry import MODELS, build_model, describe
from models.tempcnn import TempCNN
from models.utae import UTAE

pytestmark = pytest.mark.usefixtures("one_thread")

C, K = 3, 4

SMALL: dict[str, Callable[[int, int], nn.Module]] = {
    "ltae": lambda c, k: PixelLTAE(
        c, k, embed_dims=(16, 32), d_model=32, n_head=4, d_k=4, mlp_dims=(32,), dropout=0.0, decoder_dims=(16,)
    ),
    "tempcnn": lambda c, k: TempCNN(c, k, widths=(16, 16, 16), hidden=32, dropout=0.0),
    "utae": lambda c, k: UTAE(
        c, k, encoder_widths=(8, 8, 16), decoder_widths=(8, 8, 16), out_widths=(8,), n_head=4, d_model=16, dropout=0.0
    ),
}
NEURAL = sorted(SMALL)


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SMALL[name](C, K)


def phase_dataset(b: int, t: int, c: int, size: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Blocks of 4x4 pixels whose classes differ only by the phase of their temporal profile (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, k, (b, size // 4, size // 4), generator=g)
    target = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)
    phase = 2 * math.pi * target / k
    doy = torch.linspace(60, 300, t).round().long().repeat(b, 1)
    season = 2 * math.pi * (doy.float() - 60) / 240
    profile = torch.sin(season.reshape(b, t, 1, 1) + phase.unsqueeze(1))  # (B, T, H, W)
    x = profile.unsqueeze(2).repeat(1, 1, c, 1, 1) + 0.3 * torch.randn(b, t, c, size, size, generator=g)
    valid = torch.rand(b, t, size, size, generator=g) > 0.2
    return x, doy, valid, target


@pytest.mark.parametrize("name", NEURAL)
@pytest.mark.parametrize(("t", "h", "w"), [(1, 37, 45), (7, 13, 9), (25, 16, 16), (4, 5, 70)])
def test_output_shape_any_size_and_date_count(name: str, t: int, h: int, w: int) -> None:
    logits = build(name)(*inputs(2, t, C, h, w))
    assert logits.shape == (2, K, h, w)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NEURAL)
def test_invalid_dates_do_not_change_the_output(name: str) -> None:
    x, doy, valid = inputs(2, 6, C, 19, 21)
    valid[:, 2] = False  # a padded date
    valid[0, :, 3, 4] = False  # a pixel never observed
    model = build(name).eval()
    with torch.no_grad():
        reference = model(x, doy, valid)
        changed = torch.where(valid.unsqueeze(2), x, 100 * torch.randn_like(x))
        assert torch.equal(model(changed, doy, valid), reference)
        assert torch.isfinite(reference).all()
        assert not torch.allclose(model(changed, doy, torch.ones_like(valid)), reference)  # the mask does matter


@pytest.mark.parametrize("name", NEURAL)
def test_gradients_reach_every_parameter(name: str) -> None:
    model = build(name)
    x, doy, valid = inputs(2, 6, C, 20, 18)
    target = torch.randint(0, K, (2, 20, 18))
    IoULoss(ce_weight=1.0)(model(x, doy, valid), target).backward()
    for param_name, p in model.named_parameters():
        assert p.grad is not None, param_name
        assert p.grad.abs().max() > 1e-7, param_name


@pytest.mark.parametrize("name", NEURAL)
def test_tiny_batch_is_overfit(name: str) -> None:
    """Classes differ only by the phase of their temporal profile, so the time axis must be used."""
    x, doy, valid, target = phase_dataset(2, 12, C, 16, K)
    model = build(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = IoULoss(ce_weight=1.0)

    def accuracy() -> float:
        with torch.no_grad():
            pred = model.eval()(x, doy, valid).argmax(1)
        model.train()
        return (pred == target).float().mean().item()

    assert accuracy() < 0.8
    for step in range(150):
        opt.zero_grad()
        loss_fn(model(x, doy, valid), target).backward()
        opt.step()
        if step % 5 == 4 and accuracy() > 0.98:
            break
    assert accuracy() > 0.98


@pytest.mark.parametrize("name", NEURAL)
def test_same_seed_same_output_different_seed_different_output(name: str) -> None:
    x, doy, valid = inputs(2, 5, C, 16, 16)

    def run(seed: int) -> torch.Tensor:
        with torch.no_grad():
            return build(name, seed).eval()(x, doy, valid)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("name", NEURAL)
def test_state_dict_round_trip(name: str, tmp_path) -> None:
    model = build(name)
    x, doy, valid = inputs(2, 5, C, 16, 16)
    model(x, doy, valid)  # one training-mode pass moves the BatchNorm running statistics
    model.eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "model.pt")
    restored = build(name, seed=1)
    restored.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"])
    with torch.no_grad():
        assert torch.equal(restored.eval()(x, doy, valid), model(x, doy, valid))


@pytest.mark.parametrize("name", NEURAL)
def test_bfloat16_autocast(name: str) -> None:
    model = build(name).eval()
    x, doy, valid = inputs(2, 5, C, 12, 12)
    with torch.no_grad():
        reference = model(x, doy, valid)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x, doy, valid)
    assert torch.isfinite(half).all()
    assert torch.allclose(half.float(), reference, atol=0.1 * reference.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("name", NEURAL)
def test_torch_compile(name: str) -> None:
    model = build(name).eval()
    x, doy, valid = inputs(2, 5, C, 16, 16)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model)(x, doy, valid), model(x, doy, valid), atol=1e-4)


def test_ltae_follows_the_temporal_encoder_protocol() -> None:
    model = build("ltae").eval()
    assert isinstance(model, TemporalEncoderModel)
    x, doy, valid = inputs(2, 5, C, 7, 9)
    with torch.no_grad():
        features = model.encode(x, doy, valid)
        assert features.shape == (2, 5, model.feature_dim, 7, 9)
        assert torch.equal(model.classify(features, doy, valid), model(x, doy, valid))
        # per-date features depend on their own date only
        x2 = x.clone()
        x2[:, 3] += 1.0
        assert torch.equal(model.encode(x2, doy, valid)[:, :3], features[:, :3])


def test_ltae_uses_the_day_of_year() -> None:
    model = build("ltae").eval()
    x, doy, valid = inputs(1, 5, C, 4, 4)
    with torch.no_grad():
        assert not torch.allclose(model(x, doy, valid), model(x, doy + 30, valid))
    pe = doy_encoding(torch.tensor([0, 100]), 8)
    assert pe.shape == (2, 8)
    assert torch.equal(pe[0], torch.tensor([0.0, 1.0] * 4))


def test_ltae_parameter_count() -> None:
    """Not given by the paper for this pixel-wise variant: the figure pins the default configuration."""
    n = sum(p.numel() for p in PixelLTAE(10, 10).parameters())
    assert n == 69_962


def test_utae_parameter_count_near_paper() -> None:
    """Garnot & Landrieu (2021) give about 1.1 M parameters (PASTIS: 10 bands, 20 classes)."""
    n = sum(p.numel() for p in UTAE(10, 20).parameters())
    assert abs(n - 1.1e6) / 1.1e6 < 0.10, n


def test_tempcnn_parameter_count() -> None:
    """The paper's layers, with pooling instead of flattening: the dense layer no longer grows with T."""
    assert sum(p.numel() for p in TempCNN(10, 10).parameters()) == 64_970


def test_registered_and_described() -> None:
    for name, cls in [("ltae", PixelLTAE), ("tempcnn", TempCNN), ("utae", UTAE), ("random_forest", RandomForest)]:
        assert MODELS[name] is cls
    for name in ("ltae", "tempcnn", "utae"):
        model = build_model(name, in_channels=C, num_classes=K)
        text = describe(model, (1, 6, C, 19, 17))
        n = sum(p.numel() for p in model.parameters())
        assert f"{n:,} parameters" in text
        assert float(text.split(" GFLOP")[0].split()[-1]) > 0, text


# ---------------------------------------------------------------------------------------------------------------------
# Random Forest


def rf_config() -> dict[str, int]:
    return {"in_channels": C, "num_classes": K, "n_estimators": 20, "n_grid": 8}


@pytest.fixture(scope="module")
def fitted_forest() -> RandomForest:
    x, doy, valid, target = phase_dataset(2, 12, C, 16, K, seed=1)
    target[:, :2] = -1  # unlabelled rows are left out of the fit
    return RandomForest(**rf_config()).fit(x, doy, valid, target)


def test_forest_classifies_temporal_profiles(fitted_forest: RandomForest) -> None:
    x, doy, valid, target = phase_dataset(2, 12, C, 32, K, seed=2)  # new pixels, new noise, new gaps
    logits = fitted_forest(x, doy, valid)
    assert logits.shape == (2, K, 32, 32)
    assert torch.allclose(logits.exp().sum(1), torch.ones(2, 32, 32), atol=1e-4)
    assert (logits.argmax(1) == target).float().mean() > 0.95


def test_forest_predicts_as_scikit_learn(fitted_forest: RandomForest) -> None:
    """The exported trees give scikit-learn's probabilities (same data, same seed, same forest)."""
    x, doy, valid, target = phase_dataset(2, 12, C, 16, K, seed=1)
    target[:, :2] = -1
    labelled = target.flatten() >= 0
    features = temporal_features(x, doy, valid, fitted_forest.grid)
    forest = RandomForestClassifier(n_estimators=20, random_state=0, n_jobs=1)
    forest.fit(features[labelled].numpy(), target.flatten()[labelled].numpy())
    x2, doy2, valid2, _ = phase_dataset(1, 9, C, 8, K, seed=3)
    expected = forest.predict_proba(temporal_features(x2, doy2, valid2, fitted_forest.grid).numpy())
    proba = fitted_forest(x2, doy2, valid2).exp().permute(0, 2, 3, 1).reshape(-1, K)
    assert torch.allclose(proba, torch.from_numpy(expected).float(), atol=2e-6)


def test_forest_checkpoint_round_trip(fitted_forest: RandomForest, tmp_path) -> None:
    torch.save({"model_config": rf_config(), "state_dict": fitted_forest.state_dict()}, tmp_path / "rf.pt")
    ckpt = torch.load(tmp_path / "rf.pt", weights_only=True)
    restored = build_model("random_forest", **ckpt["model_config"])
    with pytest.raises(RuntimeError, match="not fitted"):
        restored(*inputs(1, 4, C, 5, 5))
    restored.load_state_dict(ckpt["state_dict"])
    x, doy, valid = inputs(2, 7, C, 9, 11)
    assert torch.equal(restored(x, doy, valid), fitted_forest(x, doy, valid))
    assert list(restored.parameters()) == []
    assert "20 trees with" in describe(restored, (1, 7, C, 9, 11))


def test_forest_ignores_invalid_dates_and_takes_any_size(fitted_forest: RandomForest) -> None:
    x, doy, valid = inputs(2, 5, C, 7, 13)
    valid[:, 1] = False
    valid[0, :, 2, 3] = False  # never observed: zero features, still a prediction
    reference = fitted_forest(x, doy, valid)
    assert reference.shape == (2, K, 7, 13)
    assert torch.isfinite(reference).all()
    changed = torch.where(valid.unsqueeze(2), x, 100 * torch.randn_like(x))
    assert torch.equal(fitted_forest(changed, doy, valid), reference)


def test_temporal_features_hand_computed() -> None:
    """One pixel, one band, observed on days 10, 30 and (invalid) 40: grid days before, between and after."""
    x = torch.tensor([0.0, 2.0, 50.0]).reshape(1, 3, 1, 1, 1)
    doy = torch.tensor([[10, 30, 40]])
    valid = torch.tensor([True, True, False]).reshape(1, 3, 1, 1)
    features = temporal_features(x, doy, valid, torch.tensor([5.0, 15.0, 30.0, 45.0]))
    interp, (mean, std, p10, p50, p90, fraction) = features[0, :4], features[0, 4:]
    assert torch.allclose(interp, torch.tensor([0.0, 0.5, 2.0, 2.0]))
    assert torch.allclose(torch.stack([mean, std, p10, p50, p90]), torch.tensor([1.0, 1.0, 0.2, 1.0, 1.8]))
    assert fraction.item() == pytest.approx(2 / 3)
