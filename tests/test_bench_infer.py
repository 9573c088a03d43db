"""`cropflow bench infer`, `bench scale` and `bench train` helpers on tiny inputs (not timing tests)."""

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


def test_bench_scale_cube_on_dask_workers_prints_its_table(tmp_path: Path) -> None:
    """Two tiny regions (4x the area apart) built on a 1-worker LocalCluster: one row each, relative to the first."""
    args = ["bench", "scale", "--sizes", "64,128", "--workers", "1", "--steps", "cube", "--cache", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if re.match(r"\W*cube\W", line) and "│" in line]
    cells = [[c.strip() for c in re.split(r"[│┃|]", row) if c.strip()] for row in rows]
    assert [(c[1], c[2], c[3]) for c in cells] == [("1", "64", "0.4"), ("1", "128", "1.6")]
    assert cells[0][6] == "1.00x" and cells[1][7] == "1.00x" and cells[1][8].endswith("Mpx-dates/s")
    assert all(float(c[9]) > 0 and float(c[10]) > 0 and float(c[11]) > 0 for c in cells)  # CPU s, cores, RSS


def test_bench_scale_inference_on_dask_workers_prints_its_table(tmp_path: Path) -> None:
    """A tiny region predicted in parts on a 1-worker LocalCluster: its row, with the windows run, and no Dask INFO
    logs in the output."""
    args = ["bench", "scale", "--sizes", "64", "--workers", "1", "--steps", "infer", "--cache", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if re.match(r"\W*infer\W", line) and "│" in line]
    cells = [[c.strip() for c in re.split(r"[│┃|]", row) if c.strip()] for row in rows]
    assert [(c[1], c[2], c[3]) for c in cells] == [("1", "64", "0.4")]
    # 64 px, window 64, overlap 16: 2 x 2 windows
    assert cells[0][8].endswith("kpx/s") and float(cells[0][9]) > 0 and float(cells[0][11]) > 0
    assert cells[0][13] == "4"
    assert "distributed." not in result.output and "INFO" not in result.output
