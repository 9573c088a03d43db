"""Figures for people: a matplotlib figure that is written as a PNG atomically and always closed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from infra.storage import output_file


@contextmanager
def png_figure(out_png: str | os.PathLike, savefig: dict | None = None, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """`(fig, axes)` of `plt.subplots(**subplots)` (Agg backend); when the block ends without error the figure is
    written to `out_png` atomically (`savefig` are extra `Figure.savefig` arguments); it is closed in any case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        with output_file(out_png) as tmp:
            fig.savefig(tmp, format="png", **(savefig or {}))
    finally:
        plt.close(fig)
