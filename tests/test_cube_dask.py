"""The cube step on a Dask cluster (flows/cube.py) builds the same store as the single-process build."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from prefect import flow

from flows.cube import build_cube_tiles
from infra.dask_cluster import DaskSettings
from tasks.cube import build_cube


def _inputs(region_dir: Path) -> tuple[dict, tuple, date, date]:
    meta = json.loads((region_dir / "region.json").read_text())
    lines = (region_dir / "items" / "sentinel-2-l2a.ndjson").read_text().splitlines()
    items = {"s2": [json.loads(line) for line in lines if line.strip()]}
    start, end = (date.fromisoformat(d) for d in meta["season"])
    return items, (meta["epsg"], tuple(meta["bounds"])), start, end


def _files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def test_two_dask_workers_build_the_same_cube_bit_for_bit(
    prefect_server: None, tiny_region: Path, tmp_path: Path
) -> None:
    items, (epsg, bounds), start, end = _inputs(tiny_region)
    layout = {"chunk": 16, "block": 16}  # 16 blocks: 8 tiles over 2 workers
    single = build_cube(items, epsg, bounds, start, end, tmp_path / "single.zarr", **layout)

    @flow(name="cube-on-dask-test")
    def on_dask() -> Path:
        return build_cube_tiles(
            items,
            epsg,
            bounds,
            start,
            end,
            tmp_path / "dask.zarr",
            dask=DaskSettings("local", workers=2, threads=1),
            **layout,
        )

    on_dask_store = on_dask()
    expected, got = _files(single), _files(on_dask_store)
    assert sorted(got) == sorted(expected)
    assert len([name for name in got if "/c/" in name]) >= 2 * 16  # s2 and s2_valid chunks
    assert [name for name in expected if got[name] != expected[name]] == []
    assert not (tmp_path / "dask.zarr.partial").exists()
