"""`cropflow bench models` on a tiny model and size (not a timing test: only that it runs and reports)."""

from __future__ import annotations

from rich.console import Console

from flows.bench_models import BenchSize, bench_models, table


def test_bench_runs_on_a_tiny_size() -> None:
    size = BenchSize(batch=1, t=3, c=2, size=8, k=3)
    rows = bench_models(["tempcnn", "random_forest", "no_such_model"], size, ["cpu"], steps=1, warmup=1, threads=1)
    tempcnn, forest, unknown = rows
    assert tempcnn["model"] == "tempcnn" and tempcnn["device"] == "cpu"
    assert tempcnn["parameters"] > 0
    assert tempcnn["seconds_per_sample"] > 0
    assert tempcnn["peak_memory_mb"] >= 0
    assert forest["error"] == "not trained by gradient descent"
    assert "no_such_model" in unknown["error"]  # the child's error, not a crash of the bench
    console = Console(width=200, record=True)
    console.print(table(rows, size))
    text = console.export_text()
    assert "tempcnn" in text and f"{tempcnn['parameters']:,}" in text and "T=3" in text
