"""Model registry: build a model from its name and a config dict (as stored in checkpoints)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from infra.errors import CropflowError
from models.fcn3d import FCN3D
from models.joint_reconstruction import JointReconstruction
from models.ltae import PixelLTAE
from models.modality_distillation import ModalityDistillation
from models.random_forest import RandomForest
from models.stcln import STCLN
from models.tempcnn import TempCNN
from models.utae import UTAE

MODELS: dict[str, type[nn.Module]] = {
    "fcn3d": FCN3D,
    "joint_reconstruction": JointReconstruction,
    "ltae": PixelLTAE,
    "modality_distillation": ModalityDistillation,
    "random_forest": RandomForest,
    "stcln": STCLN,
    "tempcnn": TempCNN,
    "utae": UTAE,
}


def build_model(name: str, **config: object) -> nn.Module:
    """Instantiate the model registered as `name` with keyword arguments `config`."""
    if name not in MODELS:
        raise CropflowError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[name](**config)


def example_inputs(
    model: nn.Module, input_shape: tuple[int, int, int, int, int], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Keyword inputs of `model.forward` for an optical series of shape (B, T, C, H, W): random values, dates
    spread over the season, 80 % valid pixel-dates; multi-modal models also get a SAR series at the same dates."""
    b, t, _, h, w = input_shape
    meta = torch.device(device).type == "meta"
    x = torch.zeros(input_shape, device=device) if meta else torch.randn(input_shape, device=device)
    doy = torch.linspace(60, 300, t, device=device).round().long().repeat(b, 1)
    valid = torch.ones((b, t, h, w), dtype=torch.bool, device=device)
    if not meta:
        valid = torch.rand((b, t, h, w), device=device) > 0.2
    inputs = {"x": x, "doy": doy, "valid": valid}
    sar_channels = getattr(model, "sar_channels", None)
    if sar_channels:
        sar_shape = (b, t, sar_channels, h, w)
        x_sar = torch.zeros(sar_shape, device=device) if meta else torch.randn(sar_shape, device=device)
        inputs |= {"x_sar": x_sar, "doy_sar": doy, "valid_sar": torch.ones_like(valid)}
    return inputs


def describe(model: nn.Module, input_shape: tuple[int, int, int, int, int]) -> str:
    """One line with the parameter count and forward FLOPs of `model` for an input of shape (B, T, C, H, W).

    FLOPs are counted by `FlopCounterMode` on a copy of the model on the meta device: no real computation runs.
    A random forest has no parameters and no FLOPs (it compares, it does not multiply): its nodes are given instead.
    """
    params = sum(p.numel() for p in model.parameters())
    if isinstance(model, RandomForest):
        trees = model.left.shape[0]
        return f"RandomForest: {params} parameters, {trees} trees with {model.num_nodes:,} nodes; no FLOP count"
    meta = copy.deepcopy(model).to("meta").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(**example_inputs(model, input_shape, "meta"))
    gflop = counter.get_total_flops() / 1e9
    return f"{type(model).__name__}: {params:,} parameters, {gflop:.4g} GFLOP forward for input {tuple(input_shape)}"
