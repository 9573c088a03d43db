"""Retry policy for Prefect tasks: retry what can succeed on retry, never a user's mistake."""

from __future__ import annotations

from typing import Any

from infra.errors import CropflowError


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn`: False when the task failed with a `CropflowError` (bad input), True otherwise."""
    try:
        state.result()
    except CropflowError:
        return False
    except Exception:
        return True
    return False
