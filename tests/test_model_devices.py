"""Every gradient-trained model of the registry on every available device: CPU always, CUDA when present."""

from __future__ import annotations

import pytest
import torch

from models.registry import MODELS, build_model, example_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
NEURAL = sorted(name for name in MODELS if name != "random_forest")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NEURAL)
def test_forward_backward_on_device_and_under_autocast(name: str, device: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_channels=4, num_classes=3).to(device).eval()
    inputs = example_inputs(model, (2, 5, 4, 17, 19), device)
    with torch.no_grad():
        logits = model(**inputs)
    assert logits.shape == (2, 3, 17, 19) and logits.device.type == device
    assert torch.isfinite(logits).all()
    if device == "cuda":  # same weights, same inputs: the GPU agrees with the CPU
        reference = model.to("cpu")(**{k: v.cpu() for k, v in inputs.items()})
        torch.testing.assert_close(logits.cpu(), reference, atol=1e-3, rtol=1e-3)
        model.to(device)
    model.train()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(**inputs)
    out.float().logsumexp(1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
