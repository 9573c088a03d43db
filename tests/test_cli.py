"""The command line refuses malformed arguments with a usage message and exit code 2, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["crop-map", "--epochs", "abc"], "Invalid value for '--epochs'"),
        (["bench", "models", "--model", "stcln"], "No such option: --model"),
        (["no-such-command"], "No such command"),
    ],
)
def test_usage_errors_exit_2_without_traceback(args: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
