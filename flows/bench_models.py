"""`cropflow bench models`: parameters, training-step time and peak memory of the registered models.

Every (model, device) pair runs in a fresh Python process (`python -m flows.bench_models ...`), which builds the
model at its default configuration and random inputs of the standard size (T=24 dates, C=10 bands, 64 x 64
pixels, batch 4, 10 classes; `modality_distillation` also gets a 2-band SAR series at the same dates), then times
forward + cross-entropy + backward steps after warm-up steps.

Peak memory of a step:
- CUDA: `torch.cuda.max_memory_allocated()` over the timed steps (tensors only, weights and inputs included).
- CPU: the growth of the resident set size during the steps, i.e. the process's peak RSS (`ru_maxrss`) minus its
  RSS just before the first step (weights, inputs and the loaded libraries excluded). A fresh process per model
  keeps one model's peak from hiding another's; RSS also counts allocator caches, so it is an upper bound.

The random forest is not trained by gradient descent: it is left out (its `fit` is not a training step).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from rich.table import Table

from flows.bench_common import ChildFailed, run_child
from models.registry import MODELS, build_model, example_inputs

NOT_GRADIENT_TRAINED = ("random_forest",)


@dataclass(frozen=True)
class BenchSize:
    """Input of one step: batch, dates, bands, side in pixels, classes."""

    batch: int = 4
    t: int = 24
    c: int = 10
    size: int = 64
    k: int = 10


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(name: str, size: BenchSize, device: str, steps: int, warmup: int, threads: int) -> dict:
    """Time forward + backward of model `name` in this process; parameters, seconds per sample, peak memory."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(name, in_channels=size.c, num_classes=size.k).to(device).train()
    inputs = example_inputs(model, (size.batch, size.t, size.c, size.size, size.size), device)
    target = torch.randint(0, size.k, (size.batch, size.size, size.size), device=device)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(**inputs), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    cuda = device.startswith("cuda")
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_bytes()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before  # ru_maxrss: kB on Linux
    return {
        "model": name,
        "device": device,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds_per_sample": statistics.median(times) / size.batch,
        "peak_memory_mb": max(peak, 0) / 2**20,
    }


def bench_models(
    names: list[str] | None = None,
    size: BenchSize | None = None,
    devices: list[str] | None = None,
    steps: int = 5,
    warmup: int = 2,
    threads: int | None = None,
) -> list[dict]:
    """Measure every model of `names` (default: the registered gradient-trained ones) on every device.

    Default devices: CPU, and CUDA when available; default threads: torch's. A model that fails, or that is not
    trained by gradient descent, gets a row with an `error` (for a failure, the last line of the child's stderr).
    """
    size = size or BenchSize()
    names = names or [name for name in sorted(MODELS) if name not in NOT_GRADIENT_TRAINED]
    devices = devices or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    threads = threads or torch.get_num_threads()
    rows = []
    for device in devices:
        for name in names:
            if name in NOT_GRADIENT_TRAINED:
                rows.append({"model": name, "device": device, "error": "not trained by gradient descent"})
                continue
            args = [name, device, str(steps), str(warmup), str(threads), json.dumps(size.__dict__)]
            try:
                rows.append(run_child("flows.bench_models", args))
            except ChildFailed as exc:
                rows.append({"model": name, "device": device, "error": str(exc)})
    return rows


def table(rows: list[dict], size: BenchSize) -> Table:
    """The rows as a rich table."""
    title = f"forward + backward, batch {size.batch}, T={size.t}, C={size.c}, {size.size}x{size.size}, K={size.k}"
    out = Table(title=title)
    for column in ("model", "device", "parameters", "ms / sample", "peak memory (MiB)"):
        out.add_column(column, justify="left" if column in ("model", "device") else "right")
    for row in rows:
        if "error" in row:
            out.add_row(row["model"], row["device"], "", "", f"[red]{row['error']}[/]")
        else:
            ms, mb = 1000 * row["seconds_per_sample"], row["peak_memory_mb"]
            out.add_row(row["model"], row["device"], f"{row['parameters']:,}", f"{ms:.1f}", f"{mb:.0f}")
    return out


if __name__ == "__main__":
    name_arg, device_arg, steps_arg, warmup_arg, threads_arg, size_arg = sys.argv[1:]
    result = measure(
        name_arg, BenchSize(**json.loads(size_arg)), device_arg, int(steps_arg), int(warmup_arg), int(threads_arg)
    )
    print(json.dumps(result))
