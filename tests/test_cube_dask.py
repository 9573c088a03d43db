"""The cube step on a Dask cluster (flows/cube.py) builds the same store as the single-process build."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from region_helpers import file_bytes, region_items, region_season

from flows.cube import TILES_PER_WORKER, build_cube_tiles, tiles_by_worker
from infra.dask_cluster import DaskSettings
from tasks.cube import CubeJob, blocks_of, build_cube


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


def test_each_worker_gets_a_compact_run_of_tiles(tmp_path: Path) -> None:
    """Neighbouring blocks go to one worker, so the source tiles their margins share are decoded once."""
    blocks = blocks_of((1024, 1024), 128)  # 64 blocks in Z order
    done = frozenset(b.name for b in blocks[:8])  # an interrupted build: 56 blocks left
    job = CubeJob(tmp_path / "cube.zarr", None, {}, blocks, done, {})
    tiles = tiles_by_worker(job, {"tcp://b:1": 1, "tcp://a:1": 1})
    assert len(tiles) == 2 * TILES_PER_WORKER and sum(len(tile) for _, tile in tiles) == 56
    assert [address for address, _ in tiles] == ["tcp://a:1"] * TILES_PER_WORKER + ["tcp://b:1"] * TILES_PER_WORKER
    rows_b = {b.r0 for address, tile in tiles if address == "tcp://b:1" for b in tile}
    assert rows_b == set(range(512, 1024, 128))  # the lower half of the region: Z order keeps a run compact

    weighted = tiles_by_worker(job, {"tcp://a:1": 3, "tcp://b:1": 1})  # in proportion to the workers' threads
    assert abs([address for address, _ in weighted].count("tcp://a:1") - 0.75 * len(weighted)) <= 1


def test_cube_warnings_reach_the_runs_logs_in_prefect(prefect_server: None, tiny_region: Path, tmp_path: Path) -> None:
    """An asset that cannot be read is warned about in the flow run's logs that the UI shows, not only on the
    console of the process that ran it (`infra.runs.send_logs_to_prefect`)."""
    import json

    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.context import get_run_context
    from prefect.logging.handlers import APILogHandler

    meta, start, end = region_season(tiny_region)
    items = json.loads(json.dumps(region_items(tiny_region)))
    items[7]["assets"]["B04"]["href"] = (tmp_path / "gone" / "B04.tif").as_uri()  # a clear scene: read

    @flow(name="cube-warnings-test")
    def with_a_missing_asset() -> str:
        build_cube(
            {"s2": items}, meta["epsg"], tuple(meta["bounds"]), start, end, tmp_path / "c.zarr", bands={"s2": ["B04"]}
        )
        return str(get_run_context().flow_run.id)

    run_id = with_a_missing_asset()
    APILogHandler().flush()  # what the handlers queued, sent
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    warned = [log for log in logs if "unreadable asset" in log.message]
    assert len(warned) == 1 and warned[0].name == "tasks.cube" and items[7]["id"] in warned[0].message
