"""Model registry: build a model from its name and a config dict (as stored in checkpoints)."""

from __future__ import annotations

import copy
import inspect
import json
import typing
from collections.abc import Mapping

import torch
from pydantic import TypeAdapter, ValidationError
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
DATA_SIZES = ("in_channels", "num_classes", "sar_channels")  # set by training from the cube and the class map


def build_model(name: str, **config: object) -> nn.Module:
    """Instantiate the model registered as `name` with keyword arguments `config`."""
    if name not in MODELS:
        raise CropflowError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[name](**config)


def model_settings(name: str) -> dict[str, object]:
    """The settings a user may give model `name`, with their defaults: its constructor's arguments but `DATA_SIZES`."""
    parameters = inspect.signature(MODELS[name]).parameters
    return {key: p.default for key, p in parameters.items() if key not in DATA_SIZES}


def check_settings(name: str, settings: Mapping[str, object], where: str = "params") -> None:
    """Refuse settings of model `name` that its constructor does not take, that do not fit its annotation (JSON's
    types, strictly: no "8" for an int; the ranges of `models.base`), or whose values it rejects (built once on the
    meta device): a `CropflowError` naming the key, the model and the accepted keys with their defaults.

    The settings of a wrapped model (`backbone_config` of `backbone`, `optical_config` of `optical_backbone`, ...)
    are checked the same way against that model, as `where.<key>`."""
    if name not in MODELS:
        raise CropflowError(f"{where}: model {name!r} is unknown; valid names: {', '.join(sorted(MODELS))}.")
    cls = MODELS[name]
    parameters = inspect.signature(cls).parameters
    accepted = model_settings(name)
    listing = f"accepted keys (default): {', '.join(f'{k}={v!r}' for k, v in accepted.items())}"
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    for key, value in settings.items():
        if key not in accepted:
            what = "is set from the cube and the class map" if key in DATA_SIZES else "is unknown"
            raise CropflowError(f"{where}: {key!r} of model {name!r} {what}; {listing}.")
        try:
            TypeAdapter(hints[key]).validate_json(json.dumps(value, allow_nan=False), strict=True)
        except ValidationError as exc:
            error = exc.errors()[0]
            item = "".join(f" at item {i}" for i in error["loc"] if isinstance(i, int))
            wanted = f"{key}={value!r}{item}: {error['msg'][0].lower()}{error['msg'][1:]}"
            raise CropflowError(f"{where}: {wanted} (model {name!r}); {listing}.") from None
        except (TypeError, ValueError):  # not JSON
            raise CropflowError(f"{where}: {key}={value!r} is not a JSON value (model {name!r}); {listing}.") from None
        wrapped = "backbone" if key == "backbone_config" else key.replace("_config", "_backbone")
        if key.endswith("_config") and wrapped in accepted:
            check_settings(str(settings.get(wrapped, accepted[wrapped])), value or {}, f"{where}.{key}")
    sizes = {key: 2 for key in DATA_SIZES if key in parameters}
    try:
        with torch.device("meta"):
            cls(**sizes, **settings)
    except (ValueError, TypeError, IndexError, ZeroDivisionError, RuntimeError, AssertionError) as exc:
        raise CropflowError(f"{where} {dict(settings)} do not make a {name} model: {exc}; {listing}.") from None


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
