"""Locations through fsspec: local paths unchanged, Zarr stores, files and rasters on a real S3-compatible server."""

from __future__ import annotations

import base64
import errno
import gc
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import rasterio
import xarray as xr
from affine import Affine
from upath import UPath

from infra import atomic, storage
from infra.errors import CropflowError
from infra.processes import log_tail, port_free
from infra.retry import HttpRetry


def test_locations_local_and_remote(s3_server, tmp_path: Path):
    """(In the S3 server's environment: an `s3://` location's client, cached, looks its credentials up when made.)"""
    local = storage.location(tmp_path / "out")
    assert isinstance(local, Path) and storage.is_local(local) and local == tmp_path / "out"
    assert storage.location(f"file://{tmp_path}/out") == local
    remote = storage.location("s3://bucket/runs/cube.zarr")
    assert not storage.is_local(remote)
    assert (str(remote / "x"), remote.name, remote.protocol) == ("s3://bucket/runs/cube.zarr/x", "cube.zarr", "s3")
    with pytest.raises(CropflowError, match=r"unknown protocol 'ftp'.*s3://"):
        storage.location("ftp://host/x")


def test_missing_filesystem_package_is_named():
    """In a fresh interpreter where gcsfs cannot be imported (as when the `cloud` extra is not installed)."""
    code = (
        "import sys; sys.modules['gcsfs'] = None\n"  # `import gcsfs` raises ImportError
        "from infra import storage\n"
        "from infra.errors import CropflowError\n"
        "try:\n    storage.location('gs://bucket/x')\nexcept CropflowError as exc:\n    print(exc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "needs the Python package gcsfs; install it (pip install gcsfs, or cropflow[cloud])" in done.stdout


@pytest.fixture
def no_cloud_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment without AWS, Google Cloud or Azure credentials (nor an AWS profile, a gcloud sign-in or an
    instance's role), and no cached Google Cloud or Azure clients."""
    import adlfs
    import gcsfs

    for name in [n for n in os.environ if n.startswith(("AWS_", "GOOGLE_", "AZURE_", "STORAGE_EMULATOR"))]:
        monkeypatch.delenv(name)
    (tmp_path / "aws").write_text("")
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):  # instead of ~/.aws/credentials and config
        monkeypatch.setenv(name, str(tmp_path / "aws"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance's role
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # where a gcloud sign-in would be
    gcsfs.GCSFileSystem.clear_instance_cache()
    adlfs.AzureBlobFileSystem.clear_instance_cache()
    yield monkeypatch
    gcsfs.GCSFileSystem.clear_instance_cache()
    adlfs.AzureBlobFileSystem.clear_instance_cache()


def test_gs_and_az_locations_use_the_environments_credentials(no_cloud_credentials, tmp_path: Path):
    import gcsfs
    from adlfs import AzureBlobFileSystem
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    account = {
        "type": "service_account",
        "project_id": "cropflow-test",
        "private_key_id": "0",
        "private_key": pem.decode(),
        "client_email": "maps@cropflow-test.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    (tmp_path / "key.json").write_text(json.dumps(account))
    no_cloud_credentials.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "key.json"))
    gs = storage.location("gs://maps-bucket/runs/cube.zarr")
    assert isinstance(gs.fs, gcsfs.GCSFileSystem) and gs.path == "maps-bucket/runs/cube.zarr"
    assert gs.fs.credentials.credentials.service_account_email == account["client_email"]

    no_cloud_credentials.setenv("AZURE_STORAGE_ACCOUNT_NAME", "cropflowmaps")
    no_cloud_credentials.setenv("AZURE_STORAGE_ACCOUNT_KEY", base64.b64encode(b"azure-key-3c9e").decode())
    az = storage.location("az://maps/runs/cube.zarr")
    assert isinstance(az.fs, AzureBlobFileSystem) and az.path == "maps/runs/cube.zarr"
    assert az.fs.account_url == "https://cropflowmaps.blob.core.windows.net"
    assert az.fs.service_client.credential.account_name == "cropflowmaps"


def test_missing_cloud_credentials_name_the_variables_to_set(no_cloud_credentials, tmp_path: Path):
    with pytest.raises(
        CropflowError, match=r"gs://maps-bucket/x': no usable credentials.*GOOGLE_APPLICATION_CREDENTIALS"
    ):
        storage.location("gs://maps-bucket/x")
    no_cloud_credentials.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    with pytest.raises(CropflowError, match="set GOOGLE_APPLICATION_CREDENTIALS"):
        storage.location("gs://maps-bucket/y")

    secret = base64.b64encode(b"azure-key-5d1f").decode()
    no_cloud_credentials.setenv("AZURE_STORAGE_ACCOUNT_KEY", secret)  # a key, but no account to use it with
    with pytest.raises(CropflowError, match=r"maps/x': no usable credentials.*AZURE_STORAGE_ACCOUNT_NAME") as refused:
        storage.location("az://maps/x")
    no_cloud_credentials.setenv("AZURE_STORAGE_CONNECTION_STRING", f"AccountKey={secret}")  # names no account
    with pytest.raises(CropflowError, match="Connection string missing required") as malformed:
        storage.location("az://maps/y")
    assert secret not in str(refused.value) + str(malformed.value)


def test_missing_s3_credentials_name_the_variables_to_set(no_cloud_credentials):
    """No credentials, a secret without its key id, a key id without its secret, an unknown profile: each refused
    naming the variables to set, with no value quoted; a profile that exists is used."""
    import s3fs
    from fsspec.asyn import sync

    secret, key_id = "aws-secret-7b2e", "AKIACROPFLOW"
    needed = (
        r"^location 's3://maps-bucket/x': no usable credentials .*; set AWS_ACCESS_KEY_ID with AWS_SECRET_ACCESS_KEY "
        r"\(or AWS_PROFILE .*\), and AWS_ENDPOINT_URL for an S3-compatible server other than AWS"
    )
    cases = [
        ({}, r"\.$"),
        ({"AWS_SECRET_ACCESS_KEY": secret}, r"\.$"),  # botocore takes no secret without its key id
        ({"AWS_ACCESS_KEY_ID": key_id}, r" \(Partial credentials found in env, missing: AWS_SECRET_ACCESS_KEY\)\.$"),
        ({"AWS_PROFILE": "maps"}, r" \(The config profile \(maps\) could not be found\)\.$"),
    ]
    s3fs.S3FileSystem.clear_instance_cache()  # clients keep the credentials they were created with
    gc.collect()  # the dropped ones close their connections now, while fsspec's event loop runs (not at exit)
    try:
        for env, reason in cases:
            with pytest.MonkeyPatch.context() as mp:
                for name, value in env.items():
                    mp.setenv(name, value)
                s3fs.S3FileSystem.clear_instance_cache()
                with pytest.raises(CropflowError, match=needed + reason) as refused:
                    storage.location("s3://maps-bucket/x")
                assert secret not in str(refused.value) and key_id not in str(refused.value)

        profiles = os.environ["AWS_SHARED_CREDENTIALS_FILE"]
        Path(profiles).write_text(f"[maps]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")
        no_cloud_credentials.setenv("AWS_PROFILE", "maps")
        s3fs.S3FileSystem.clear_instance_cache()
        fs = storage.location("s3://maps-bucket/x").fs
        assert sync(fs.loop, fs.session.get_credentials).access_key == key_id
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # none of these clients for the tests on the S3 server


def _dataset() -> xr.Dataset:
    values = np.arange(2 * 6 * 5, dtype=np.float32).reshape(2, 6, 5)
    return xr.Dataset({"v": (("t", "y", "x"), values)}, attrs={"crs": "EPSG:32631"})


def test_zarr_store_on_s3_published_whole(bucket: str):
    url = f"{bucket}/run/probabilities.zarr"
    with storage.output_store(url) as store:
        _dataset().to_zarr(store, zarr_format=3, mode="w", consolidated=False)
        assert not storage.location(url).exists(), "readers must not see a store before it is complete"
    back = storage.open_zarr(url, consolidated=False)
    np.testing.assert_array_equal(back["v"].values, _dataset()["v"].values)
    assert back.attrs["crs"] == "EPSG:32631"
    assert [p.name for p in storage.location(f"{bucket}/run").iterdir()] == ["probabilities.zarr"]

    with pytest.raises(RuntimeError, match="model crashed"), storage.output_store(url) as store:
        (_dataset() * 2).to_zarr(store, zarr_format=3, mode="w", consolidated=False)
        raise RuntimeError("model crashed")
    np.testing.assert_array_equal(storage.open_zarr(url, consolidated=False)["v"].values, _dataset()["v"].values)
    assert [p.name for p in storage.location(f"{bucket}/run").iterdir()] == ["probabilities.zarr"]


def _raster_round_trip(url: str) -> None:
    """A GeoTIFF written to `url` (`storage.output_file`) reads back with its grid and values (`open_raster`)."""
    data = np.arange(64, dtype=np.uint8).reshape(8, 8)
    with storage.output_file(url) as tmp:
        profile = {"driver": "GTiff", "width": 8, "height": 8, "count": 1, "dtype": "uint8", "crs": "EPSG:32631"}
        with rasterio.open(tmp, "w", transform=Affine(10, 0, 600000, 0, -10, 5650000), **profile) as dst:
            dst.write(data, 1)
    with storage.open_raster(url) as src:
        assert src.crs.to_epsg() == 32631 and src.transform.c == 600000
        np.testing.assert_array_equal(src.read(1), data)


def test_files_and_rasters_on_s3(bucket: str, tmp_path: Path):
    _raster_round_trip(f"{bucket}/maps/crop_map.tif")
    local = tmp_path / "model.pt"
    local.write_bytes(b"weights")
    assert storage.upload(local, f"{bucket}/maps/model.pt").read_bytes() == b"weights"

    atomic.remove(storage.location(f"{bucket}/maps"))
    assert not storage.location(f"{bucket}/maps/crop_map.tif").exists()
    with pytest.raises(CropflowError, match=r"could not upload model\.pt to s3://no-such-bucket"):
        storage.upload(local, "s3://no-such-bucket/model.pt")


def test_upload_survives_a_server_restart(bucket: str, s3_server, tmp_path: Path, caplog):
    """The store goes away after the first objects and comes back: the upload resumes, nothing is lost."""
    import fsspec

    rng = np.random.default_rng(0)
    src = tmp_path / "stac"
    for i in range(40):
        path = src / ("items" if i % 2 else "collections") / f"part-{i:02d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.bytes(64 * 1024))
    dst = f"{bucket}/outputs/stac"
    watcher = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)

    def stop_midway_then_restart() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(watcher.find(dst.removeprefix("s3://"))) >= 5:
                break
            time.sleep(0.01)
        s3_server.stop()
        time.sleep(4)
        s3_server.start()

    thread = threading.Thread(target=stop_midway_then_restart)
    thread.start()
    with caplog.at_level(logging.WARNING, logger="infra.retry"):
        storage.upload(src, dst, retry=HttpRetry(retries=10, backoff=0.5, backoff_max=2.0, jitter=0.1))
    thread.join()
    assert any("retry" in r.getMessage() for r in caplog.records), "the outage must have been retried by cropflow"
    uploaded = sorted(watcher.find(dst.removeprefix("s3://")))
    expected = sorted(f"{dst.removeprefix('s3://')}/{p.relative_to(src).as_posix()}" for p in src.rglob("*.bin"))
    assert uploaded == expected
    for path in src.rglob("*.bin"):
        assert watcher.cat_file(f"{dst.removeprefix('s3://')}/{path.relative_to(src).as_posix()}") == path.read_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# Publishing (infra.atomic): one mechanism for local folders and object-store prefixes


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _folder(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_local_publish_swaps_folders_and_replaces_files(tmp_path: Path):
    out = _folder(tmp_path / "region", {"region.json": b"old", "cogs/a.tif": b"old a"})
    with atomic.atomic_path(out) as tmp:
        _folder(tmp, {"region.json": b"new", "cogs/b.tif": b"new b"})
        assert _tree(out) == {"region.json": b"old", "cogs/a.tif": b"old a"}, "the old folder stays until the end"
    assert _tree(out) == {"region.json": b"new", "cogs/b.tif": b"new b"}  # no file of the old folder is left
    with atomic.atomic_path(tmp_path / "map.json") as tmp:
        tmp.write_text("{}")
    with pytest.raises(RuntimeError, match="crashed"), atomic.atomic_path(tmp_path / "map.json") as tmp:
        tmp.write_text('{"half":')
        raise RuntimeError("crashed")
    assert (tmp_path / "map.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.json", "region"]  # no scratch left


def test_failed_local_swap_puts_the_old_folder_back(tmp_path: Path):
    """The new folder cannot be renamed in (it lies on another file system): the old one is renamed back."""
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the test folder")
    out = _folder(tmp_path / "region", {"region.json": b"old"})
    new = _folder(Path(atomic.scratch(other / "region")), {"region.json": b"new"})
    try:
        with pytest.raises(OSError, match="cross-device"):
            atomic.publish(new, out)
        assert _tree(out) == {"region.json": b"old"}
        assert [p.name for p in tmp_path.iterdir()] == ["region"]
        assert _tree(new) == {"region.json": b"new"}, "the source is left to the caller"
    finally:
        shutil.rmtree(new)


S3_ERRORS = {403: "AccessDenied", 503: "ServiceUnavailable"}


class CopyRefusingProxy:
    """An HTTP proxy in front of the S3 server that answers the next copy requests (a PUT with `x-amz-copy-source`)
    with the HTTP statuses in `refusals`, as a store that denies or cannot serve them, and forwards the rest (503
    while the server is stopped)."""

    def __init__(self, upstream: str) -> None:
        self.refusals: list[int] = []
        self.copies = 0
        self.on_copy: Callable[[int], None] | None = None  # called with each copy's number before it is served
        client = httpx.Client(base_url=upstream, timeout=30, trust_env=False)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's `Expect: 100-continue`; keeps connections open

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.command == "PUT" and "x-amz-copy-source" in self.headers:
                    proxy.copies += 1
                    if proxy.on_copy:
                        proxy.on_copy(proxy.copies)
                    if proxy.refusals:
                        return self._error(proxy.refusals.pop(0))
                skip = {"host", "content-length", "connection", "accept-encoding"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                try:
                    response = client.request(self.command, self.path, headers=headers, content=body)
                except httpx.TransportError:  # the server is stopped: unavailable, as a gateway without a backend says
                    return self._error(503)
                skip |= {"transfer-encoding", "content-encoding", "date", "server"}
                kept = {k: v for k, v in response.headers.items() if k.lower() not in skip}
                if self.command == "HEAD":  # no body, but the object's size
                    kept["Content-Length"] = response.headers.get("content-length", "0")
                    return self._reply(response.status_code, kept, b"", length=False)
                self._reply(response.status_code, kept, response.content)

            def _error(self, status: int) -> None:
                error = f"<Error><Code>{S3_ERRORS[status]}</Code><Message>refused</Message></Error>"
                data = b"" if self.command == "HEAD" else error.encode()  # an answer to HEAD has no body
                self._reply(status, {"Content-Type": "application/xml"}, data)

            def _reply(self, status: int, headers: dict[str, str], data: bytes, length: bool = True) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if length:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def location(self, url: str, **options: object) -> UPath:
        """`url` reached through this proxy (`options`: more of s3fs's)."""
        return UPath(url, endpoint_url=self.url, use_listings_cache=False, skip_instance_cache=True, **options)


@pytest.fixture
def s3_proxy(s3_server) -> CopyRefusingProxy:
    proxy = CopyRefusingProxy(os.environ["AWS_ENDPOINT_URL"])
    yield proxy
    proxy.httpd.shutdown()
    proxy.httpd.server_close()


def test_failed_publish_on_s3_leaves_no_scratch_objects(bucket: str, s3_proxy: CopyRefusingProxy, caplog):
    """The store refuses the server-side copies that publish a Zarr store: no scratch object and no half store is
    left; copies it fails to serve for a while are retried and the store is published whole."""
    url = f"{bucket}/run/probabilities.zarr"
    with storage.output_store(url) as store:
        _dataset().to_zarr(store, zarr_format=3, mode="w", consolidated=False)
    run = storage.location(f"{bucket}/run")
    objects = run.fs.find(f"{run.path}/probabilities.zarr")

    s3_proxy.refusals = [403]
    with pytest.raises(PermissionError, match="refused"), storage.output_store(s3_proxy.location(url)) as store:
        (_dataset() * 2).to_zarr(store, zarr_format=3, mode="w", consolidated=False)
    assert s3_proxy.copies < len(objects), "access denied is final: no copy retried"
    assert run.fs.find(run.path) == objects, "no scratch object, no copied chunk left; the old store stays"
    np.testing.assert_array_equal(storage.open_zarr(url, consolidated=False)["v"].values, _dataset()["v"].values)

    s3_proxy.refusals = [503] * 3  # more than botocore's own attempts (AWS_MAX_ATTEMPTS=2): cropflow retries
    tmp = atomic.scratch(s3_proxy.location(url))
    (_dataset() * 3).to_zarr(storage.zarr_store(tmp), zarr_format=3, mode="w", consolidated=False)
    with caplog.at_level(logging.WARNING, logger="infra.retry"):
        atomic.publish(tmp, s3_proxy.location(url), HttpRetry(retries=3, backoff=0.05, jitter=0.0))
    assert any(r.getMessage().startswith("copying") and "retry" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(storage.open_zarr(url, consolidated=False)["v"].values, _dataset()["v"].values * 3)
    assert [p.name for p in run.iterdir()] == ["probabilities.zarr"]


def _store(scale: int, extra: bool) -> xr.Dataset:
    """A store of 4 chunks of `v` (times `scale`), with the variable `old_only` when `extra`."""
    ds = (_dataset() * scale).chunk({"t": 1, "y": 3})
    return ds.assign(old_only=ds["v"] + 1) if extra else ds


def test_s3_publish_keeps_the_old_store_until_the_new_one_is_complete(bucket: str, s3_server, s3_proxy, caplog):
    """Readers find the old store, whole, while a new one is published over it and after the server stopped midway;
    the publish retried once the server is back leaves the new store and no object of the old."""
    url = f"{bucket}/run/cube.zarr"
    with storage.output_store(url) as store:
        _store(1, extra=True).to_zarr(store, zarr_format=3, mode="w", consolidated=True)
    fs, path = storage.location(url).fs, storage.location(url).path
    old = {f: fs.cat_file(f) for f in fs.find(path)}
    proxied = s3_proxy.location(url, config_kwargs={"retries": {"max_attempts": 1}})  # cropflow's retries only
    tmp = atomic.scratch(proxied)
    _store(2, extra=False).to_zarr(storage.zarr_store(tmp), zarr_format=3, mode="w", consolidated=True)
    new = {f.removeprefix(tmp.path + "/") for f in fs.find(tmp.path)}
    seen, read = [], threading.Event()

    def read_then_stop(copy: int) -> None:  # in the proxy's threads, while the publish copies chunks concurrently
        if copy == 3:
            deadline = time.monotonic() + 10
            while len(set(fs.find(path)) - set(old)) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)  # until copies 1 and 2 have landed
            seen.append((len(set(fs.find(path)) - set(old)), storage.open_zarr(url).load()))
            read.set()
        if copy == 4 and read.wait(20):
            s3_server.stop()

    s3_proxy.on_copy = read_then_stop
    with pytest.raises(OSError) as failed, caplog.at_level(logging.WARNING, logger="infra.atomic"):
        atomic.publish(tmp, proxied, HttpRetry(retries=1, backoff=0.05, jitter=0.0))
    assert failed.value.errno == errno.EBUSY, "S3's 503, as s3fs raises it"
    s3_server.start()
    s3_proxy.on_copy = None
    (copied, during), after = seen[0], storage.open_zarr(url)
    assert copied >= 2, "new chunks had landed beside the old store"
    for ds in (during, after, storage.open_zarr(url, consolidated=False)):
        xr.testing.assert_identical(ds.load(), _store(1, extra=True).load())
    assert all(fs.cat_file(f) == data for f, data in old.items()), "no object of the old store was overwritten"
    assert any("could not remove the objects copied" in r.getMessage() for r in caplog.records)

    atomic.publish(tmp, storage.location(url), HttpRetry(retries=1, backoff=0.05, jitter=0.0))
    for consolidated in (True, False):
        xr.testing.assert_identical(storage.open_zarr(url, consolidated=consolidated).load(), _store(2, False).load())
    v2_keys = {re.sub(r"(^|/)c/([\d/]+)$", lambda m: m[1] + m[2].replace("/", "."), n) for n in new}
    assert {f.removeprefix(path + "/") for f in fs.find(path)} == v2_keys, "the new store's objects, no old one"
    assert [p.name for p in storage.location(f"{bucket}/run").iterdir()] == ["cube.zarr"]


@pytest.fixture
def gcs_bucket(no_cloud_credentials) -> str:
    """A bucket on Google Cloud Storage's emulator (gcp-storage-emulator, in memory) on 127.0.0.1; its `gs://` URL."""
    from conftest import free_port
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="cropflow-maps")
    server.start()
    no_cloud_credentials.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")  # gcsfs needs no credentials
    yield "gs://cropflow-maps"
    server.stop()


def _publish_stores_in_turn(url: str) -> None:
    """Zarr stores published at `url` over older ones (chunk keys `c/0/0/0`, then `0.0.0`, then `c/0/0/0` again),
    each read back whole with exactly its own objects, none of the old."""
    cube = storage.location(url)
    for scale, extra, objects in ((1, True, 11), (2, False, 6), (3, True, 11)):  # 2 metadata (+1) and 4 (+4) chunks
        with storage.output_store(url) as store:
            _store(scale, extra).to_zarr(store, zarr_format=3, mode="w", consolidated=True)
        xr.testing.assert_identical(storage.open_zarr(url).load(), _store(scale, extra).load())
        assert len(cube.fs.find(cube.path)) == objects, "the new store's objects, none of the old"


def test_zarr_stores_and_files_on_a_gcs_emulator(gcs_bucket: str):
    """`gs://` end to end: Zarr stores published over older ones read back whole with no old object left, and a file
    is uploaded whole."""
    _publish_stores_in_turn(f"{gcs_bucket}/run/cube.zarr")
    with storage.output_file(f"{gcs_bucket}/run/metrics.json") as tmp:
        tmp.write_text('{"miou": 0.5}')
    assert storage.location(f"{gcs_bucket}/run/metrics.json").read_text() == '{"miou": 0.5}'
    assert sorted(p.name for p in storage.location(f"{gcs_bucket}/run").iterdir()) == ["cube.zarr", "metrics.json"]


# Azurite's account and key: public data of the emulator, the same in every copy of it
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Azurite's Blob service (Azure Storage's emulator, in memory) on a free port of 127.0.0.1 for the module; its
    endpoint. Skips when Azurite is not installed (`infra/setup.sh` installs it with npm in .venv/azurite)."""
    from conftest import free_port

    program = shutil.which("azurite-blob") or str(Path(sys.prefix) / "azurite/node_modules/.bin/azurite-blob")
    if not (Path(program).is_file() and shutil.which("node")):
        pytest.skip(f"Azurite is not installed ({program}, with node): run infra/setup.sh, which installs it with npm")
    folder = tmp_path_factory.mktemp("azurite")
    port = free_port()
    options = ["--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence", "--silent"]
    options += ["--skipApiVersionCheck", "--disableTelemetry"]  # Azure's SDK may be newer than Azurite; no reports
    with (folder / "azurite.log").open("w") as log:
        server = subprocess.Popen([program, *options], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    try:
        deadline = time.monotonic() + 60
        while port_free(port):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Azurite did not start on 127.0.0.1:{port}: {log_tail(folder / 'azurite.log')}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def azure_container(azurite: str, no_cloud_credentials: pytest.MonkeyPatch) -> str:
    """A container on Azurite, reached with a connection string in the environment as a user sets it; its URL."""
    no_cloud_credentials.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};BlobEndpoint={azurite};",
    )
    storage.location("az://cropflow-maps").fs.mkdir("cropflow-maps")
    return "az://cropflow-maps"


def test_zarr_stores_files_and_rasters_on_azurite(
    azure_container: str, azurite: str, no_cloud_credentials: pytest.MonkeyPatch, tmp_path: Path, caplog
):
    """`az://` end to end with a connection string: Zarr stores published in turn, a raster and a file uploaded
    whole, listed and read back; a missing container and a wrong key are named, but no key in a message nor log."""
    from adlfs import AzureBlobFileSystem

    caplog.set_level(logging.DEBUG)
    _publish_stores_in_turn(f"{azure_container}/run/cube.zarr")
    _raster_round_trip(f"{azure_container}/run/crop_map.tif")
    local = tmp_path / "model.pt"
    local.write_bytes(b"weights")
    assert storage.upload(local, f"{azure_container}/run/model.pt").read_bytes() == b"weights"
    run = storage.location(f"{azure_container}/run")
    assert sorted(p.name for p in run.iterdir()) == ["crop_map.tif", "cube.zarr", "model.pt"]
    assert str(next(run.glob("*.pt"))) == f"{azure_container}/run/model.pt"

    missing = r"could not upload model\.pt to az://no-such-container/model\.pt: .*No such container"
    with pytest.raises(CropflowError, match=missing) as lost:
        storage.upload(local, "az://no-such-container/model.pt")
    wrong = base64.b64encode(b"not-the-key").decode()
    no_cloud_credentials.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", f"AccountName={AZURITE_ACCOUNT};AccountKey={wrong};BlobEndpoint={azurite};"
    )
    AzureBlobFileSystem.clear_instance_cache()  # clients are cached with the credentials they were created with
    denied = r"could not upload model\.pt to az://cropflow-maps/run/x\.pt: Server failed to authenticate"
    with pytest.raises(CropflowError, match=denied) as refused:
        storage.upload(local, f"{azure_container}/run/x.pt")
    assert any(r.name.startswith("azure.core") for r in caplog.records), "Azure's SDK logged its requests"
    said = str(lost.value) + str(refused.value) + caplog.text
    assert AZURITE_KEY not in said and wrong not in said
