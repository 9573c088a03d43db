"""`cropflow bench infer` and `cropflow bench train` helpers on tiny inputs (not timing tests)."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from flows.bench_train import time_to_target
from flows.cli import app


def test_bench_infer_runs_on_a_tiny_region(tmp_path: Path) -> None:
    args = ["bench", "infer", "--sizes", "64", "--window", "32", "--batch", "4", "--bare-batches", "1"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--cache", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = result.output
    for column in ("px/s", "km²/h", "overlap factor", "bare ms/window", "overhead (wall)", "overhead (CPU)"):
        assert column in out
    assert "peak RSS MB" in out and "load average" in out and "random weights" in out
    # 64 px, window 32, overlap 8: 3 x 3 windows where a plain tiling needs 2 x 2
    row = next(line for line in out.splitlines() if re.match(r"\W*64\W", line))
    cells = [c.strip() for c in re.split(r"[│┃|]", row) if c.strip()]
    assert cells[4:6] == ["9", "2.25"]
    assert float(cells[2].replace(",", "")) > 0 and cells[7].endswith("%") and int(cells[9]) > 0
    assert (tmp_path / "cube-s2-64.zarr").is_dir()  # built once, reused by the next run


def test_time_to_target_counts_setup_and_epochs() -> None:
    history = [{"epoch": 1, "seconds": 10.0, "val_miou": 0.5}, {"epoch": 2, "seconds": 12.0, "val_miou": 0.81}]
    assert time_to_target(history, 3.0, 0.8) == (2, 25.0)
    assert time_to_target(history, 3.0, 0.9) is None
