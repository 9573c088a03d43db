"""Faults of the outside world injected for real, and what cropflow does about them (issue 9; docs/reliability.md).

- the local STAC API behind a proxy on 127.0.0.1 that answers 429/5xx, stalls past the timeout, drops connections
  or goes down in the middle of a paginated search; its PostgreSQL restarted while searches run;
- COGs served over HTTP on 127.0.0.1: a 404, a truncated file, a read that times out once;
- a cube build SIGKILLed in the middle of writing a Zarr region, then resumed;
- a full disk (a file size limit, `RLIMIT_FSIZE`) and a read-only output folder;
- inference running out of memory.

Faults covered elsewhere are listed in `flows/reliability.py` (FAULTS) with the tests that cover them.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import rasterio
import torch
import xarray as xr
from region_helpers import file_bytes, region_items, region_season
from torch import nn

from infra.errors import CropflowError
from infra.gdal import gdal_name
from infra.retry import HttpRetry
from infra.settings import Settings
from infra.storage import open_zarr
from tasks.catalog import search_items
from tasks.cube import build_cube, partial_path

FAST = HttpRetry(retries=4, backoff=0.05, jitter=0.0, timeout=4.0)  # a loaded 2-core machine answers in 1-2 s


class Quiet(BaseHTTPRequestHandler):
    """A request handler that logs nothing and replies with `reply`, even to a client that gave up."""

    def log_message(self, *args: object) -> None:
        pass

    def reply(self, status: int, data: bytes, headers: dict[str, str], body: bool = True) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(data)


class _Server:
    """A threaded HTTP server on 127.0.0.1 (free port) running `handler`; `stop()` closes its socket."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------------------------------------
# The STAC API: 429, 5xx, stalls, dropped connections and an outage in the middle of a paginated search


class FaultyProxy(_Server):
    """Forwards requests to the STAC API at `upstream`, with `page_size` items per search page.

    Each entry of `script` handles one POST /search: None forwards it, an int answers that HTTP status, a float
    stalls that many seconds first, "drop" closes the connection without an answer, "down" stops the proxy (its
    port then refuses connections). `searches` counts the POST /search requests received.
    """

    def __init__(self, upstream: str, page_size: int) -> None:
        self.upstream, self.page_size = upstream, page_size
        self.script: list[int | float | str | None] = []
        self.searches = 0
        self.client = httpx.Client(timeout=30, trust_env=False)
        super().__init__(self._handler())

    def forward(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        response = self.client.request(
            method, self.upstream + path, content=body, headers={"Content-Type": "application/json"}
        )
        return response.status_code, response.content.replace(self.upstream.encode(), self.url.encode())

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(Quiet):
            def _send(self, status: int, data: bytes) -> None:
                self.reply(status, data, {"Content-Type": "application/json"})

            def do_GET(self) -> None:
                self._send(*proxy.forward("GET", self.path, None))

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                proxy.searches += 1
                step = proxy.script.pop(0) if proxy.script else None
                if step in ("drop", "down"):
                    self.close_connection = True
                    if step == "down":
                        threading.Thread(target=proxy.stop, daemon=True).start()
                    return
                if isinstance(step, int):
                    self._send(step, json.dumps({"code": "Injected", "description": f"HTTP {step}"}).encode())
                    return
                if isinstance(step, float):
                    time.sleep(step)
                body["limit"] = proxy.page_size  # small pages: the search paginates
                self._send(*proxy.forward("POST", self.path, json.dumps(body).encode()))

        return Handler


@pytest.fixture(scope="module")
def loaded(stac_api: Settings, tiny_region: Path) -> tuple[Settings, Path]:
    """The tiny region loaded into the session's STAC API."""
    from infra import stac_api as stac

    stac.load(stac_api, tiny_region)
    return stac_api, tiny_region


@pytest.fixture
def proxy(loaded: tuple[Settings, Path]) -> Iterator[FaultyProxy]:
    srv = FaultyProxy(loaded[0].stac_url, page_size=5)
    yield srv
    with contextlib.suppress(OSError):
        srv.stop()


def _search(url: str, region_dir: Path, retry: HttpRetry = FAST) -> list[str]:
    meta, start, end = region_season(region_dir)
    return [i["id"] for i in search_items(url, "s2", start, end, bbox=tuple(meta["bbox"]), retry=retry)]


def test_stac_faults_mid_pagination_are_retried_to_the_clean_result(proxy, loaded) -> None:
    settings, region = loaded
    clean = _search(proxy.url, region)
    pages = proxy.searches
    assert clean == _search(settings.stac_url, region)  # the proxy itself changes nothing
    assert pages >= 4 and len(clean) == len(region_items(region))
    proxy.searches = 0
    proxy.script = [None, 429, None, 503, 500, 6.0, None, "drop", None]  # faults on pages 2, 3, 4 and 5 (6 s: a stall)
    assert _search(proxy.url, region) == clean
    assert proxy.searches == pages + 5  # each fault cost one more request, no page was skipped


def test_stac_down_mid_pagination_is_a_clear_failure_not_a_shorter_list(proxy, loaded) -> None:
    proxy.script = [None, None, "down"]
    with pytest.raises(CropflowError) as info:
        _search(proxy.url, loaded[1])
    message = str(info.value)
    assert proxy.url in message and "did not answer the query" in message and "after 4 retries" in message
    assert "collection 'sentinel-2-l2a'" in message


def test_searches_recover_from_a_database_restart_under_load(loaded) -> None:
    from infra import stac_api as stac

    settings, region = loaded
    clean = _search(settings.stac_url, region)
    patient = HttpRetry(retries=8, backoff=0.2, backoff_max=2.0, jitter=0.1, timeout=10.0)  # ~10 s of retries
    results: list[list[str] | BaseException] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                results.append(_search(settings.stac_url, region, patient))
            except BaseException as exc:  # collected, then asserted on
                results.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        before = len(results)
        bindir, _ = stac._pg_bindir(settings)
        stac._stop_pg(settings)
        time.sleep(1.0)  # searches now meet a dead database
        stac._start_pg(settings, bindir)
        stac._wait_pg_ready(settings, bindir)
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert len(results) > before and all(r == clean for r in results)
    assert stac.status(settings)["postgres"] and stac.status(settings)["api"]  # left running for other tests


# ---------------------------------------------------------------------------------------------------------------------
# Asset reads over HTTP: a 404, a truncated COG, a read that times out once


class CogServer(_Server):
    """Serves the files under `root` with HTTP range requests; `missing` paths answer 404, the first request for
    a path in `stall_once` waits `stall` seconds. `requests` counts requests per path."""

    def __init__(self, root: Path, stall: float) -> None:
        self.root, self.stall = root, stall
        self.missing: set[str] = set()
        self.stall_once: set[str] = set()
        self.requests: dict[str, int] = {}
        super().__init__(self._handler())

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        srv = self

        class Handler(Quiet):
            def do_HEAD(self) -> None:
                self.do_GET(body=False)

            def do_GET(self, body: bool = True) -> None:
                path = self.path.split("?")[0]
                srv.requests[path] = srv.requests.get(path, 0) + 1
                if path in srv.stall_once:
                    srv.stall_once.discard(path)
                    time.sleep(srv.stall)
                file = srv.root / path.lstrip("/")
                if path in srv.missing or not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                status, first, last = 200, 0, len(data) - 1
                if "Range" in self.headers:
                    lo, _, hi = self.headers["Range"].removeprefix("bytes=").partition("-")
                    status, first, last = 206, int(lo), min(int(hi or last), last)
                headers = {"Accept-Ranges": "bytes"}
                if status == 206:
                    headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
                self.reply(status, data[first : last + 1], headers, body)

        return Handler


def test_asset_404_truncated_and_timed_out_reads(tiny_region: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "1")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")  # cropflow's own retries, not GDAL's
    monkeypatch.setenv("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    root = tmp_path / "www"
    shutil.copytree(tiny_region / "cogs", root / "cogs")
    srv = CogServer(root, stall=3.0)
    s2 = region_items(tiny_region)
    served = json.loads(json.dumps(s2).replace((tiny_region / "cogs").as_uri(), f"{srv.url}/cogs"))
    # scenes 7 and 9 are clear everywhere, so their B04 is read (an overcast scene's bands are not); SCL always is
    path = {
        (i, key): served[i]["assets"][key]["href"].removeprefix(srv.url) for i in (2, 7, 9) for key in ("B04", "SCL")
    }
    srv.missing.add(path[7, "B04"])
    truncated = root / path[2, "SCL"].lstrip("/")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 3])
    srv.stall_once.add(path[9, "B04"])
    meta, start, end = region_season(tiny_region)
    args = (meta["epsg"], tuple(meta["bounds"]), start, end)
    try:
        with caplog.at_level("WARNING"):
            out = build_cube({"s2": served}, *args, tmp_path / "cube.zarr", bands={"s2": ["B04"]})
    finally:
        srv.stop()
    ds = open_zarr(out).load()
    recorded = {(r["item"], r["asset"]) for r in json.loads(ds.attrs["bad_assets"])}
    assert recorded == {(s2[7]["id"], "B04"), (s2[2]["id"], "SCL")}  # the stalled read succeeded on retry
    assert ds.attrs["bad_asset_count"] == 2 and ds.attrs["bad_scene_count"] == 2
    assert srv.requests[path[7, "B04"]] >= 3 and srv.requests[path[9, "B04"]] >= 2  # retried
    assert caplog.text.count("the scene counts as no-data") == 2  # one warning per bad asset
    others = [it for i, it in enumerate(s2) if i not in (2, 7)]
    ref = open_zarr(build_cube({"s2": others}, *args, tmp_path / "ref.zarr", bands={"s2": ["B04"]})).load()
    xr.testing.assert_equal(ds["s2"], ref["s2"])  # the bad scenes are no-data, the stalled one is in


def test_a_retried_read_forgets_only_its_own_file_in_gdals_cache(tiny_region, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "1")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")
    monkeypatch.setenv("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    srv = CogServer(tiny_region / "cogs", stall=3.0)
    s2 = region_items(tiny_region)
    served = json.loads(json.dumps(s2[:1]).replace((tiny_region / "cogs").as_uri(), srv.url))
    failing = served[0]["assets"]["B04"]["href"]  # read by the build, times out once
    other = f"{srv.url}/{Path(s2[1]['assets']['B08']['href']).relative_to((tiny_region / 'cogs').as_uri())}"
    failing_path, other_path = failing.removeprefix(srv.url), other.removeprefix(srv.url)
    assert gdal_name(failing) == f"/vsicurl/{failing}" and gdal_name("s3://b/k.tif") == "/vsis3/b/k.tif"

    def read_other() -> np.ndarray:
        with rasterio.open(other) as src:
            return src.read(1)

    pixels = read_other()
    fetched = srv.requests[other_path]
    assert (read_other() == pixels).all() and srv.requests[other_path] == fetched  # reopened from GDAL's cache
    srv.stall_once.add(failing_path)
    meta, start, end = region_season(tiny_region)
    args = (meta["epsg"], tuple(meta["bounds"]), start, end)
    try:
        out = build_cube({"s2": served}, *args, tmp_path / "cube.zarr", bands={"s2": ["B04"]})
        assert (read_other() == pixels).all()
    finally:
        srv.stop()
    assert srv.requests[failing_path] >= 2  # timed out, forgotten, read again after the server recovered
    assert srv.requests[other_path] == fetched  # the other file's cached header and tiles survived the retry
    ds = open_zarr(out).load()
    assert ds.attrs["bad_asset_count"] == 0
    ref = open_zarr(build_cube({"s2": s2[:1]}, *args, tmp_path / "ref.zarr", bands={"s2": ["B04"]})).load()
    xr.testing.assert_equal(ds["s2"], ref["s2"])


# ---------------------------------------------------------------------------------------------------------------------
# A worker killed while writing a Zarr region; a full disk; a read-only output folder

KILLED_BUILD = """
import json, os, signal, sys
from datetime import date
from pathlib import Path
from infra.chunks import DirectChunks
from tasks.cube import build_cube

region, out, kill_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
meta = json.loads((region / "region.json").read_text())
items = {s: [json.loads(l) for l in (region / "items" / f"{c}.ndjson").read_text().splitlines()]
         for s, c in (("s2", "sentinel-2-l2a"), ("s1", "sentinel-1-rtc"))}
written = []
put = DirectChunks._put

def put_or_die(self, path, size):  # SIGKILL in the middle of a block's chunks, one in its scratch file
    put(self, path, size)
    written.append(path)
    if len(written) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

DirectChunks._put = put_or_die
start, end = (date.fromisoformat(d) for d in meta["season"])
build_cube(items, meta["epsg"], tuple(meta["bounds"]), start, end, out, chunk=16, block=32,
           bands={"s2": ["B04", "B08"]}, threads=2)
"""


def test_build_killed_while_writing_a_zarr_region_resumes_to_identical_checksums(tiny_region, tmp_path) -> None:
    meta, start, end = region_season(tiny_region)
    items = {"s2": region_items(tiny_region), "s1": region_items(tiny_region, "sentinel-1-rtc")}
    opts = {"chunk": 16, "block": 32, "bands": {"s2": ["B04", "B08"]}, "threads": 2}
    args = (items, meta["epsg"], tuple(meta["bounds"]), start, end)
    reference = build_cube(*args, tmp_path / "reference.zarr", **opts)

    out = tmp_path / "cube.zarr"
    chunks_per_block = 4 * 4  # 2 x 2 chunks of 16 px, in each of s2, s2_valid, s1, s1_valid
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BUILD, str(tiny_region), str(out), str(chunks_per_block + 6)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    done = list((partial_path(out) / "blocks").glob("*.json"))
    assert len(done) == 1  # the first block recorded, the second one half-written
    assert len(list((partial_path(out) / "cube.zarr").rglob("*.partial"))) == 1  # a chunk not yet in place

    resumed: list = []
    build_cube(*args, out, **opts, on_block=resumed.append)
    assert len(resumed) == 3 and done[0].stem not in {b.name for b in resumed}
    assert not partial_path(out).exists()
    assert file_bytes(out) == file_bytes(reference)  # no chunk missing, none extra, every byte the same


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Files of this process cannot grow past `limit` bytes (writes fail with EFBIG, as on a full disk)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_full_disk_fails_at_the_write_and_keeps_the_published_output(
    tiny_region, tmp_path, monkeypatch, capsys
) -> None:
    from flows.cli import main

    home = tmp_path / "home"
    published = home / "regions" / "sample-tiny"
    shutil.copytree(tiny_region, published)
    before = file_bytes(published)
    monkeypatch.setenv("CROPFLOW_HOME", str(home))
    monkeypatch.delenv("CROPFLOW_REGIONS", raising=False)
    monkeypatch.setattr(sys, "argv", ["cropflow", "sample", "sample-tiny", "--size", "32", "--force"])
    with file_size_limit(16 * 1024), pytest.raises(SystemExit) as exit_info:
        main()
    output = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 2, output
    assert "error: cannot write" in output and "File too large" in output
    assert file_bytes(published) == before  # the region published before is intact
    assert [p.name for p in published.parent.iterdir()] == ["sample-tiny"]  # no half-written copy left


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` cannot be written, even by root (immutable attribute), for the duration."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot make a folder read-only here (chattr +i refused, and root ignores permissions)")
    try:
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_unwritable_output_folder_is_refused_before_any_work(tiny_region, tmp_path, monkeypatch, capsys) -> None:
    from flows.cli import main

    monkeypatch.setenv("CROPFLOW_HOME", str(tmp_path / "home"))
    meta = json.loads((tiny_region / "region.json").read_text())
    bbox = ",".join(str(v) for v in meta["bbox"])
    outputs = tmp_path / "maps"
    args = ["crop-map", "--region", bbox, "--season", "2024-03-01..2024-10-31", "--outputs", str(outputs)]
    args += ["--labels", str(tiny_region / "labels.parquet"), "--classes", str(tiny_region / "classes.json")]
    monkeypatch.setattr(sys, "argv", ["cropflow", *args])
    with read_only(outputs), pytest.raises(SystemExit) as exit_info:
        main()
    message = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 2
    assert f"output folder {outputs}" in message and "is not writable" in message and "--outputs" in message
    assert list(outputs.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# Inference out of memory: the batch is halved and the run continues


class MemoryCap(nn.Module):
    """A real model that fails like a GPU out of memory when given more than `cap` windows at once."""

    def __init__(self, model: nn.Module, cap: int) -> None:
        super().__init__()
        self.model, self.cap = model, cap
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        if x.shape[0] > self.cap:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.numel() * 64} bytes")
        return self.model(x, doy, valid)


def test_inference_out_of_memory_halves_the_batch_and_continues(tiny_region, tmp_path, caplog) -> None:
    from models.registry import build_model
    from tasks.predict import predict_region

    meta, start, end = region_season(tiny_region)
    args = ({"s2": region_items(tiny_region)}, meta["epsg"], tuple(meta["bounds"]), start, end, tmp_path / "cube.zarr")
    cube = build_cube(*args, bands={"s2": ["B04", "B08"]}, chunk=32)
    torch.manual_seed(0)
    model = build_model("tempcnn", in_channels=2, num_classes=3, widths=(8, 8), hidden=16).eval()
    classes = [{"id": i, "name": f"c{i}", "color": "#000000"} for i in range(3)]
    ckpt = {"sensor": "s2", "bands": ["B04", "B08"], "classes": classes, "norm": {"mean": [0.1, 0.3], "std": [0.1] * 2}}
    opts = {"window": 16, "overlap": 0.25, "progress": False}
    whole = predict_region(cube, model, ckpt, tmp_path / "whole.zarr", batch_size=8, **opts)
    capped = MemoryCap(model, cap=2)
    with caplog.at_level("WARNING"):
        halved = predict_region(cube, capped, ckpt, tmp_path / "halved.zarr", batch_size=8, **opts)
    assert capped.batches[:3] == [8, 4, 2] and max(capped.batches[3:]) == 2
    assert "out of memory with 8 windows per batch; retrying with 4" in caplog.text
    assert "retrying with 2" in caplog.text
    a, b = open_zarr(whole).load(), open_zarr(halved).load()
    np.testing.assert_allclose(a["probabilities"].values, b["probabilities"].values, atol=1e-5)
    assert (a["class"].values == b["class"].values).all()

    with pytest.raises(torch.OutOfMemoryError):  # one window that does not fit is a real failure
        predict_region(cube, MemoryCap(model, cap=0), ckpt, tmp_path / "none.zarr", batch_size=8, **opts)
    assert not (tmp_path / "none.zarr").exists()
