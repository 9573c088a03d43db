"""`cropflow bench reliability`: run the fault-injection, bad-input and safety tests, print their matrices with the
measured outcomes, and write them to docs/reliability.md (issue 9).

Each row names the tests that inject the fault (or feed the input) and check the outcome; a row passes when all its
tests pass. Rows of tests/test_bad_input.py come from the test table itself (pytest `record_property`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, NamedTuple

import typer
from rich.console import Console
from rich.table import Table

from infra.atomic import atomic_path
from infra.errors import CropflowError
from infra.settings import REPO_ROOT

console = Console()
REPORT = REPO_ROOT / "docs" / "reliability.md"
BAD_INPUT_TEST = "tests/test_bad_input.py::test_bad_input_is_refused"
MODEL_PARAMS_BAD = "tests/test_model_params.py::test_bad_params_on_the_command_line"
COMMANDS = ("train", "crop-map")


class Row(NamedTuple):
    """One line of a matrix: what happens, what must follow, and the tests that check it."""

    case: str
    expected: str
    tests: tuple[str, ...]


FAULTS = [
    Row(
        "STAC API answers 429 / 5xx / stalls past the timeout (first page)",
        "retried with backoff and jitter; the same items; after the retries a CropflowError naming catalog and query",
        (
            "tests/test_catalog.py::test_retries_429_5xx_and_timeouts_then_succeeds",
            "tests/test_catalog.py::test_backoff_grows_and_last_error_names_catalog_and_query",
        ),
    ),
    Row(
        "429, 5xx, a stall and a dropped connection on pages 2-5 of a paginated search (proxy before the local API)",
        "every page retried; the same item ids as a clean run, one extra request per fault",
        ("tests/test_faults.py::test_stac_faults_mid_pagination_are_retried_to_the_clean_result",),
    ),
    Row(
        "STAC API goes down in the middle of a paginated search",
        "a CropflowError naming the catalog, the query and the retries; never a shorter list",
        (
            "tests/test_faults.py::test_stac_down_mid_pagination_is_a_clear_failure_not_a_shorter_list",
            "tests/test_catalog.py::test_unreachable_or_wrong_catalog_is_explained",
        ),
    ),
    Row(
        "PostgreSQL of the local STAC API stopped and restarted under 3 threads of searches",
        "every search returns the full item set (5xx retried); the API and database run afterwards",
        ("tests/test_faults.py::test_searches_recover_from_a_database_restart_under_load",),
    ),
    Row(
        "COG over HTTP: a 404, a truncated file, a read that times out once",
        "the timed-out read succeeds on retry (GDAL's cache forgets that file only); the others are retried, then "
        "recorded (bad_assets, counts), warned, counted as no-data; the build finishes",
        (
            "tests/test_faults.py::test_asset_404_truncated_and_timed_out_reads",
            "tests/test_faults.py::test_a_retried_read_forgets_only_its_own_file_in_gdals_cache",
        ),
    ),
    Row(
        "local COG missing or with a corrupt tile",
        "recorded in bad_assets, the scene counts as an acquisition without valid pixels",
        ("tests/test_cube.py::test_missing_and_corrupt_assets_count_as_no_data",),
    ),
    Row(
        "cube build SIGKILLed in the middle of writing a block's Zarr chunks",
        "the rerun builds only the unrecorded blocks; sha256 of every file equals an uninterrupted build's",
        ("tests/test_faults.py::test_build_killed_while_writing_a_zarr_region_resumes_to_identical_checksums",),
    ),
    Row(
        "cube build interrupted between blocks; tiles on 2 Dask workers",
        "resumed build identical to a whole one; the published cube untouched until the new one is complete",
        (
            "tests/test_cube.py::test_interrupted_build_resumes_only_missing_blocks_and_publishes_atomically",
            "tests/test_cube_dask.py::test_two_dask_workers_build_the_same_cube_bit_for_bit",
        ),
    ),
    Row(
        "backfill process group SIGKILLed in its second season, then rerun",
        "each step computed once per season (cached), none missing; a third run rewrites nothing",
        ("tests/test_orchestration.py::test_backfill_killed_midway_resumes_then_recomputes_nothing",),
    ),
    Row(
        "backfill submitted to a deployment whose work pool has no worker, or whose worker takes no run",
        "no worker: nothing submitted; runs not started within start_timeout_s: cancelled; a CropflowError saying "
        "to start a worker (prefect worker start --pool ...) or to run here",
        ("tests/test_orchestration.py::test_backfill_without_a_worker_fails_and_says_how_to_start_one",),
    ),
    Row(
        "transient errors inside flow tasks; bad parameters",
        "transient ones retried by Prefect, CropflowError never",
        ("tests/test_orchestration.py::test_transient_errors_are_retried_and_bad_parameters_are_not",),
    ),
    Row(
        "disk full at the write (RLIMIT_FSIZE: EFBIG) while regenerating a region",
        "'error: cannot write ...: File too large', exit 2, no traceback; the region published before intact",
        ("tests/test_faults.py::test_full_disk_fails_at_the_write_and_keeps_the_published_output",),
    ),
    Row(
        "read-only output folder",
        "refused before any work: 'output folder ... is not writable', exit 2, nothing written",
        ("tests/test_faults.py::test_unwritable_output_folder_is_refused_before_any_work",),
    ),
    Row(
        "object store down during an upload",
        "upload retried with backoff until the store is back",
        ("tests/test_storage.py::test_upload_survives_a_server_restart",),
    ),
    Row(
        "object store refuses (403) or cannot serve (503) the server-side copies that publish a Zarr store",
        "403 final, not retried: the scratch store and the copies made so far deleted, the old store intact; 503 "
        "retried with backoff, the store published whole",
        ("tests/test_storage.py::test_failed_publish_on_s3_leaves_no_scratch_objects",),
    ),
    Row(
        "object store stopped while a Zarr store is published over an older one",
        "readers open the old store with its old values during the publish and after it fails; the publish retried "
        "leaves the new store and no object of the old",
        ("tests/test_storage.py::test_s3_publish_keeps_the_old_store_until_the_new_one_is_complete",),
    ),
    Row(
        "a local folder swap failing halfway (the new folder on another file system)",
        "the old folder renamed back, intact; no scratch left beside it",
        ("tests/test_storage.py::test_failed_local_swap_puts_the_old_folder_back",),
    ),
    Row(
        "which errors are retried: 429/5xx, timeouts, dropped connections (HTTP, S3) vs 4xx, permissions, full disk",
        "one predicate (infra.retry.is_retryable) and one backoff for STAC, object-store and Prefect task retries",
        ("tests/test_retry.py::test_transient_errors", "tests/test_retry.py::test_call_retries_transient_errors_only"),
    ),
    Row(
        "inference out of memory (torch.OutOfMemoryError above 2 windows per batch)",
        "batch 8 -> 4 -> 2, logged; the map equals the one of an unconstrained run; 1 window failing is an error",
        ("tests/test_faults.py::test_inference_out_of_memory_halves_the_batch_and_continues",),
    ),
]

CROP_MAP_BAD = "tests/test_crop_map.py::test_bad_input_is_refused_cleanly"
BAD_INPUT = [  # covered by other tests; the rows of tests/test_bad_input.py are read from its results
    Row(
        "--season 2024-13-01..2024-10-31",
        "is not a date",
        (f"{CROP_MAP_BAD}[--region-sample-tiny---season-2024-13-01..2024-10-31]",),
    ),
    Row(
        "--season 2024-08-01..2024-05-01",
        "ends before it starts",
        (f"{CROP_MAP_BAD}[--region-sample-tiny---season-2024-08-01..2024-05-01]",),
    ),
    Row("--season summer", "is not a season", (f"{CROP_MAP_BAD}[--region-sample-tiny---season-summer]",)),
    Row("--season 2019 (no scenes)", "no Sentinel-2 items", (f"{CROP_MAP_BAD}[--region-sample-tiny---season-2019]",)),
    Row("labels far from the region", "do not overlap the cube extent", (f"{CROP_MAP_BAD}[--region-far-away]",)),
    Row("--region atlantis", "unknown region 'atlantis'", (f"{CROP_MAP_BAD}[--region-atlantis]",)),
    Row("--sensors s2,modis", "unknown sensor 'modis'", (f"{CROP_MAP_BAD}[--region-sample-tiny---sensors-s2,modis]",)),
    Row("label file missing", "missing.parquet", (f"{CROP_MAP_BAD}[--region-no-labels]",)),
    Row("region entry without season", "season.start and season.end", (f"{CROP_MAP_BAD}[--region-no-season]",)),
    Row("region entry with inverted bbox", "inverted", (f"{CROP_MAP_BAD}[--region-inverted]",)),
    Row(
        "unknown collection",
        "is not in catalog ...; available: ...",
        ("tests/test_catalog.py::test_unknown_collection_lists_available",),
    ),
    Row(
        "checkpoint of other bands / classes",
        "names the difference",
        ("tests/test_train.py::test_load_checkpoint_refuses_mismatches",),
    ),
    Row(
        "flow parameters: unknown key, unknown model",
        "Extra inputs are not permitted; model ... is unknown",
        ("tests/test_bad_input.py::test_flow_parameters_with_unknown_keys_or_names_are_refused",),
    ),
    *(
        Row(f"train / crop-map --params {given}", expected, tuple(f"{MODEL_PARAMS_BAD}[{case}-{c}]" for c in COMMANDS))
        for case, given, expected in [
            (
                "unknown-key",
                "'{\"width\": [8, 16]}'",
                "params: 'width' of model 'fcn3d' is unknown; accepted keys (default): ...",
            ),
            ("wrong-type", "'{\"widths\": 8}'", "params: widths=8: input should be a valid array (model 'fcn3d')"),
            ("file-missing", "none.yaml", "--params file none.yaml cannot be read (No such file or directory)"),
            ("invalid-json", "'{\"widths\": [8, 16}'", "is not valid JSON (Expecting ',' delimiter ...)"),
            ("not-a-mapping", "list.yaml (a YAML list)", "is not a mapping of setting names to values"),
        ]
    ),
    Row(
        "flow parameter model.params: unknown key, wrong type, out of range (zero width, dropout 1), a data size, "
        "a value the model refuses",
        "names the key, the model and the accepted keys with their defaults",
        ("tests/test_model_params.py::test_bad_params_are_refused_naming_key_model_and_accepted_keys",),
    ),
    Row(
        "region schedule: unknown field, bad cron, unknown time zone, twice the same slug, a parameter crop_map "
        "refuses",
        "region ...: schedule N ... names the field and what is valid; nothing deployed",
        ("tests/test_orchestration.py::test_region_schedules_are_checked_before_anything_is_deployed",),
    ),
    Row(
        "malformed options", "usage message, exit 2", ("tests/test_cli.py::test_usage_errors_exit_2_without_traceback",)
    ),
]

SAFETY = [
    Row(
        "STAC API and PostgreSQL listen on 127.0.0.1 only",
        "/proc/net/tcp: 127.0.0.1, no IPv6",
        ("tests/test_stac_api.py::test_services_listen_on_loopback_only",),
    ),
    Row(
        "Prefect server listens on 127.0.0.1 only",
        "psutil: LISTEN on 127.0.0.1 only",
        ("tests/test_safety.py::test_prefect_server_listens_on_loopback_only",),
    ),
    Row(
        "Prefect server pid file left stale (the pid reused by another process)",
        "not taken for the server (command line and port checked): `server down` signals nothing",
        ("tests/test_safety.py::test_prefect_server_trusts_no_stale_pid_file",),
    ),
    Row(
        "Prefect server fails to start with the password in its log",
        "the log tail quoted in the error has the password replaced by ***",
        ("tests/test_safety.py::test_prefect_server_start_failure_quotes_its_log_without_the_password",),
    ),
    Row(
        "proxy variables set (HTTP_PROXY, ALL_PROXY)",
        "health checks of the local services still reach 127.0.0.1 directly",
        ("tests/test_safety.py::test_local_health_checks_ignore_proxy_settings",),
    ),
    Row(
        "PostgreSQL asks a password (no trust)",
        "pg_hba rules all scram-sha-256; wrong or no password refused",
        (
            "tests/test_safety.py::test_postgres_has_no_trust_rule",
            "tests/test_stac_api.py::test_postgres_requires_password",
            "tests/test_stac_api.py::test_password_not_in_argv_or_logs",
        ),
    ),
    Row(
        "secrets only from the environment, never written",
        "PG password, AWS_SECRET_ACCESS_KEY, PC_SDK_SUBSCRIPTION_KEY in no log, output file or STAC item",
        ("tests/test_safety.py::test_secrets_never_reach_logs_outputs_or_stac_items",),
    ),
    Row(
        "object-store URL with no usable credentials (s3://, gs://, az://), or a key without its account or secret",
        "refused before any work, naming the variables to set; no key or secret quoted",
        (
            "tests/test_storage.py::test_missing_s3_credentials_name_the_variables_to_set",
            "tests/test_storage.py::test_missing_cloud_credentials_name_the_variables_to_set",
        ),
    ),
    Row(
        "Azure connection string in the environment (Azurite on 127.0.0.1); then a wrong key",
        "stores, rasters and files round-trip; the wrong key refused; no key in any message or log record",
        ("tests/test_storage.py::test_zarr_stores_files_and_rasters_on_azurite",),
    ),
    Row(
        "YAML loaded safely",
        "no yaml.load without SafeLoader in the code base",
        ("tests/test_safety.py::test_yaml_is_loaded_safely",),
    ),
    Row(
        "checkpoints",
        "every torch.load has weights_only=True",
        ("tests/test_safety.py::test_checkpoints_load_with_weights_only",),
    ),
    Row(
        "user paths cannot escape the output root",
        "relative --outputs with '..' and region names with '/' refused; absolute paths are explicit choices",
        (
            "tests/test_safety.py::test_run_folders_stay_inside_the_output_root",
            f"{BAD_INPUT_TEST}[outputs-escape]",
            f"{BAD_INPUT_TEST}[region-name-escapes]",
        ),
    ),
]

POLICY = """## Decisions

- **Output root.** Run folders are `<outputs>/<region>/<start>_<end>`, `outputs` defaulting to
  `$CROPFLOW_HOME/outputs`. A relative `--outputs` is taken below the working folder and refused when it holds `..`;
  an absolute path or an object-store URL is an explicit choice of the user and allowed. Region names that would
  leave the root (`/`, `\\`, `..`) are refused.
- **Checked before long work** (`flows.crop_map.check_request`): region, season, catalog and sensors, model name,
  labels (readable, with a CRS, classes of the class map, on the region), and a writable output folder with at least
  100 MiB free (`flows.params.check_writable`, probing without creating anything). A disk that fills up later fails
  at the write: one message (`cannot write <file>: <reason>`), exit 2, and the atomic outputs published before stay.
- **Unreadable assets** are retried (`READ_RETRIES`, backoff; GDAL's cache of failed remote reads is emptied
  first), then recorded and counted as no-data; the build goes on.
- **Out of memory in inference**: the batch is halved and retried, down to one window.
"""


def _outcomes(junit: Path) -> dict[str, dict]:
    """Outcome, seconds and recorded properties of each test of a junit XML report, by pytest node id."""
    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):  # noqa: S314 (written by our own pytest run)
        module, name = case.get("classname", ""), case.get("name", "")
        node = f"{module.replace('.', '/')}.py::{name}"
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                found_message = element.get("message", "")
                break
        else:
            found_message = ""
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        found[node] = {"outcome": outcome, "seconds": float(case.get("time", 0)), "props": props, "why": found_message}
    return found


def _verdict(tests: tuple[str, ...], results: dict[str, dict]) -> tuple[str, float]:
    """A row's outcome (passed only if all its tests passed) and the seconds its tests took."""
    runs = [[r for n, r in results.items() if n == t or n.startswith(t + "[")] for t in tests]  # all parameters
    outcomes = [r["outcome"] for found in runs for r in found] + ["not run"] * sum(not found for found in runs)
    seconds = sum(r["seconds"] for found in runs for r in found)
    for worst in ("failed", "error", "not run", "skipped"):
        if worst in outcomes:
            return worst, seconds
    return "passed", seconds


def _bad_input_rows(results: dict[str, dict]) -> list[Row]:
    table = [(n, r) for n, r in results.items() if n.startswith(BAD_INPUT_TEST + "[")]
    return [Row(r["props"].get("input", n), r["props"].get("message", ""), (n,)) for n, r in table]


def _markdown(title: str, head: tuple[str, str], rows: list[Row], results: dict[str, dict]) -> list[str]:
    lines = [f"## {title}", "", f"| {head[0]} | {head[1]} | tests | outcome | s |", "| --- | --- | --- | --- | ---: |"]
    for row in rows:
        outcome, seconds = _verdict(row.tests, results)
        tests = "<br>".join(f"`{t.split('/', 1)[1]}`" for t in row.tests)
        case, expected = (text.replace("|", "\\|") for text in (row.case, row.expected))
        lines.append(f"| {case} | {expected} | {tests} | {outcome} | {seconds:.1f} |")
    return [*lines, ""]


def _print(title: str, head: tuple[str, str], rows: list[Row], results: dict[str, dict]) -> None:
    table = Table(title=title, show_lines=True)
    for col in (*head, "outcome", "s"):
        table.add_column(col, overflow="fold")
    for row in rows:
        outcome, seconds = _verdict(row.tests, results)
        colour = "green" if outcome == "passed" else "red"
        table.add_row(row.case, row.expected, f"[{colour}]{outcome}[/]", f"{seconds:.1f}")
    console.print(table)


def bench_reliability(
    slow: Annotated[
        bool, typer.Option(help="also run the slow end-to-end tests (backfill killed, Prefect server)")
    ] = True,
    out: Annotated[Path, typer.Option(help="the markdown report to write")] = REPORT,
) -> None:
    """Run the fault-injection, bad-input and safety suites; print the matrices and write docs/reliability.md."""
    rows = [*FAULTS, *BAD_INPUT, *SAFETY]
    tests = sorted(
        {t for row in rows for t in row.tests}
        | {"tests/test_bad_input.py", "tests/test_faults.py", "tests/test_safety.py"}
    )
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cropflow-reliability-") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests]
        cmd += [] if slow else ["-m", "not slow"]
        console.print(f"running {len(tests)} test selections (load average {load[0]:.2f}) ...")
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO_ROOT, check=False)
        seconds = time.perf_counter() - t0
        if not junit.exists():
            raise CropflowError(f"pytest wrote no report ({' '.join(cmd)}); run it by hand to see why.")
        results = _outcomes(junit)
    matrices = [
        ("Fault matrix", ("fault injected", "expected outcome"), FAULTS),
        ("Bad-input matrix", ("input", "message (fragment)"), [*_bad_input_rows(results), *BAD_INPUT]),
        ("Safety", ("property", "checked by"), SAFETY),
    ]
    for title, head, table_rows in matrices:
        _print(title, head, table_rows, results)
    counts = {k: sum(r["outcome"] == k for r in results.values()) for k in ("passed", "failed", "error", "skipped")}
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    console.print(f"{len(results)} tests: {summary} in {seconds:.0f} s")
    lines = [
        "# Reliability and safety",
        "",
        "Written by `cropflow bench reliability` from its own run of the tests below (do not edit by hand).",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPUs, load average {load[0]:.2f} at start, "
        f"{seconds:.0f} s: {len(results)} tests, {summary}{'' if slow else ' (slow tests not run)'}.",
        "",
    ]
    for title, head, table_rows in matrices:
        lines += _markdown(title, head, table_rows, results)
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join([*lines, POLICY]))
    console.print(f"report written to {out}")
    if counts["failed"] or counts["error"]:
        raise CropflowError(f"{counts['failed'] + counts['error']} test(s) failed; the matrices above name them.")
