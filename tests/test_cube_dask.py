"""The cube step on a Dask cluster (flows/cube.py) builds the same store as the single-process build."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from region_helpers import file_bytes, region_items, region_season

from flows.cube import build_cube_tiles
from infra.dask_cluster import DaskSettings
from tasks.cube import build_cube


def test_two_dask_workers_build_the_same_cube_bit_for_bit(
    prefect_server: None, tiny_region: Path, tmp_path: Path
) -> None:
    meta, start, end = region_season(tiny_region)
    items, epsg, bounds = {"s2": region_items(tiny_region)}, meta["epsg"], tuple(meta["bounds"])
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
    expected, got = file_bytes(single), file_bytes(on_dask_store)
    assert sorted(got) == sorted(expected)
    assert len([name for name in got if "/c/" in name]) >= 2 * 16  # s2 and s2_valid chunks
    assert [name for name in expected if got[name] != expected[name]] == []
    assert not (tmp_path / "dask.zarr.partial").exists()
