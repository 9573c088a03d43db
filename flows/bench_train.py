"""`cropflow bench train`: training throughput and time to the demo's accuracy.

Runs `tasks.train.train_model` as the demo does (fcn3d at the device's default widths, patch 32, batch 8, 128
patches per epoch, at most 40 epochs within a time budget that also sets the learning-rate schedule) on the sample
region of `size` px, whose Sentinel-2 cube is built once into the cache. From the per-epoch history it prints the
training samples per second (patches / epoch time; an epoch's time includes scoring the validation parcels) and
the first epoch, and the seconds since the call started, at which validation mIoU reaches the target.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flows.bench_common import CacheOption, bench_cache

console = Console(width=160)


def time_to_target(history: list[dict], setup_s: float, target: float) -> tuple[int, float] | None:
    """First epoch whose validation mIoU reaches `target` and the seconds to its end (setup included); None if none."""
    elapsed = setup_s
    for row in history:
        elapsed += row["seconds"]
        if row["val_miou"] >= target:
            return int(row["epoch"]), elapsed
    return None


def bench_train(
    size: Annotated[int, typer.Option(help="side of the sample region in pixels")] = 512,
    budget: Annotated[float, typer.Option(help="training time budget in seconds (the demo's: 480)")] = 480.0,
    epochs: Annotated[int, typer.Option(help="maximum epochs (the demo's: 40)")] = 40,
    target: Annotated[float, typer.Option(help="validation mIoU to reach")] = 0.80,
    device: Annotated[str, typer.Option(help="auto (CUDA, else CPU), cpu or cuda")] = "auto",
    cache: CacheOption = None,
) -> None:
    """Train the demo's model on the sample region: samples per second and time to the target validation mIoU."""
    from flows.bench_infer import ensure_bench_cube
    from tasks.train import resolve_device, train_model

    cache = bench_cache(cache)
    region, cube = ensure_bench_cube(size, cache)
    patches, patch, batch = 128, 32, 8
    with tempfile.TemporaryDirectory(prefix="cropflow-bench-train-", dir=cache) as out:
        t0 = time.perf_counter()
        result = train_model(
            cube,
            region / "labels.parquet",
            region / "classes.json",
            Path(out),
            epochs=epochs,
            patches_per_epoch=patches,
            patch_size=patch,
            batch_size=batch,
            device=device,
            time_budget_s=budget,
            progress=False,
        )
        wall = time.perf_counter() - t0
    history = result.history
    epoch_s = sum(row["seconds"] for row in history)
    reached = time_to_target(history, wall - epoch_s, target)
    table = Table(
        title=f"training fcn3d (demo defaults) on the {size} px sample region, {resolve_device(device)}, "
        f"patch {patch}, batch {batch}, {patches} patches/epoch, budget {budget:.0f} s"
    )
    columns = ("epochs", "stop", "s/epoch", "samples/s", "best val mIoU", f"epoch at mIoU>={target}", "seconds to it")
    for col in columns:
        table.add_column(col, justify="right")
    table.add_row(
        str(result.epochs_run),
        result.stop_reason,
        f"{epoch_s / len(history):.1f}",
        f"{patches * len(history) / epoch_s:.1f}",
        f"{result.best_val_miou:.3f} (epoch {result.best_epoch})",
        str(reached[0]) if reached else "not reached",
        f"{reached[1]:.0f}" if reached else "",
    )
    console.print(table)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    console.print(f"setup (data loading, statistics) {wall - epoch_s:.1f} s; load average: {load}")
    console.print("val mIoU per epoch: " + " ".join(f"{row['val_miou']:.2f}" for row in history))
