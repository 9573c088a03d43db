"""Typed parameters shared by the flows (Prefect validates them with pydantic and shows them as forms in the UI),
and their resolution into one run's region, season and output folder."""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_validator,
)
from upath import UPath

from flows.regions import Region, parse_season, resolve_region
from infra.errors import CropflowError
from infra.settings import get_settings
from infra.storage import is_local, location

DEFAULT_SENSORS = ("s2", "s1", "landsat")
MIN_FREE_BYTES = 100 * 2**20  # a run folder of the smallest region takes tens of MB
START_TIMEOUT_S = 600.0  # a backfill's wait for a worker: one polls every 10-15 s, a busy pool can take minutes
# Models that distill a teacher (`ModelSpec.teacher`), and how.
DISTILLED = {
    "joint_reconstruction": "incomplete-series distillation",
    "modality_distillation": "optical + SAR distillation",
}


def check_season(value: int | str | None) -> int | str | None:
    """A season as written by a user (`flows.regions.parse_season`), as a parameter: a year, `START..END`,
    `current`, `last` or None (the region's)."""
    parsed = parse_season(value)
    if isinstance(parsed, tuple):
        return f"{parsed[0]}..{parsed[1]}"
    return parsed


def listed(text: str) -> list[str]:
    """The items of a comma-separated option (sensors, sizes, names), stripped, empty ones dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


Season = Annotated[int | str | None, AfterValidator(check_season)]


def parse_seasons(value: str | list[int | str]) -> list[int | str]:
    """Seasons of a backfill: `2019..2024` (every year), a comma-separated list of seasons, or a list."""
    parts = listed(value) if isinstance(value, str) else list(value)
    seasons: list[int | str] = []
    for part in parts:
        years = re.fullmatch(r"(\d{4})\.\.(\d{4})", str(part))
        if years:
            first, last = int(years[1]), int(years[2])
            if last < first:
                raise CropflowError(f"seasons {part!r} run backwards; give FIRST..LAST, e.g. 2019..2024.")
            seasons.extend(range(first, last + 1))
        elif str(part):
            seasons.append(check_season(part))
    if not seasons:
        raise CropflowError(f"no season in {value!r}; give e.g. 2019..2024 or 2023,2024.")
    return seasons


def check_model_name(name: str) -> str:
    """`name` if `models/registry.py` has such a model, else a message listing those it has."""
    from models.registry import MODELS

    if name not in MODELS:
        raise CropflowError(f"model {name!r} is unknown; valid model names: {', '.join(sorted(MODELS))}.")
    return name


class ModelSpec(BaseModel):
    """The model a run trains: a name of `models/registry.py`, its settings and the training budget."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, AfterValidator(check_model_name)] = "fcn3d"
    params: dict[str, Any] | None = Field(
        default=None,
        description="the model's settings (arguments of its class in models/), merged over its defaults, e.g. "
        "{'widths': [16, 32, 64, 128]} for fcn3d",
    )
    epochs: PositiveInt = 40
    time_budget_s: PositiveFloat | None = Field(default=480.0, description="stop training after this many seconds")
    seed: int = 0
    pretrain_epochs: NonNegativeInt = Field(
        default=0, description="stcln: epochs of masked pre-training on every cube pixel before fine-tuning"
    )
    teacher: str | None = Field(
        default=None,
        description="the optical model.pt to distill: joint_reconstruction (incomplete series, required) or "
        "modality_distillation (optical + SAR; without a teacher it is trained on the labels alone)",
    )

    @model_validator(mode="after")
    def _method_fits_model(self) -> ModelSpec:
        from models.registry import check_settings

        if self.params:
            check_settings(self.name, self.params)
        if self.pretrain_epochs and self.name != "stcln":
            raise CropflowError(f"pretrain_epochs applies to stcln (masked pre-training), not to {self.name!r}.")
        if self.name == "joint_reconstruction" and self.teacher is None:
            raise CropflowError(
                "joint_reconstruction learns from a teacher: give teacher (--teacher) = the model.pt of a trained "
                "ltae or stcln run on the same cube."
            )
        if self.teacher is not None and self.name not in DISTILLED:
            raise CropflowError(
                f"teacher applies to {' and '.join(f'{k} ({v})' for k, v in DISTILLED.items())}, not to {self.name!r}."
            )
        return self


@dataclass(frozen=True)
class Run:
    """One run resolved: where, when, and the folder of its outputs (`<outputs>/<region>/<start>_<end>`)."""

    region: Region
    start: date
    end: date
    out: UPath  # a local folder or an object-store URL (infra.storage.location)

    @property
    def season(self) -> str:
        return f"{self.start}_{self.end}"


def resolve_run(
    region: str,
    season: int | str | None,
    outputs: str | Path | None = None,
    labels: Path | None = None,
    classes: Path | None = None,
) -> Run:
    """The region, season dates and output folder of a run (`outputs` defaults to `$CROPFLOW_HOME/outputs`)."""
    return resolve_runs(region, [season], outputs, labels, classes)[0]


def resolve_runs(
    region: str,
    seasons: list[int | str | None],
    outputs: str | Path | None = None,
    labels: Path | None = None,
    classes: Path | None = None,
) -> list[Run]:
    """`resolve_run` for each of `seasons`, the region resolved once."""
    settings = get_settings()
    reg = resolve_region(region, settings, labels=labels, classes=classes)
    dates = [reg.season_dates(season) for season in seasons]
    if reg.name in ("", ".", "..") or any(c in reg.name for c in "/\\\0"):
        raise CropflowError(f"region name {reg.name!r} cannot name a run folder; give one without '/', '\\' or '..'.")
    if outputs and is_local(outputs) and not Path(outputs).is_absolute() and ".." in Path(outputs).parts:
        raise CropflowError(
            f"outputs {str(outputs)!r} climbs out of the working folder with '..'; give a folder below it, an absolute "
            f"path or an object-store URL (default: {settings.outputs_dir})."
        )
    root = location(outputs or settings.outputs_dir)
    return [Run(reg, start, end, root / reg.name / f"{start}_{end}") for start, end in dates]


def check_writable(folder: str | Path, min_free: int = MIN_FREE_BYTES) -> None:
    """Refuse a local output folder that cannot be written or whose disk is nearly full, before any long work.

    Probes the nearest existing folder on the way to `folder` (nothing is created); object stores are not probed.
    """
    if not is_local(folder):
        return
    probe = Path(folder).absolute()
    while not probe.exists():
        probe = probe.parent
    hint = "choose another --outputs or make it writable"
    if not probe.is_dir():
        raise CropflowError(f"output folder {folder} cannot be created: {probe} is a file; {hint}.")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise CropflowError(f"output folder {folder} is not writable ({probe}: {exc.strerror}); {hint}.") from None
    free = shutil.disk_usage(probe).free
    if free < min_free:
        raise CropflowError(
            f"output folder {folder}: only {free / 2**20:.0f} MiB free on its disk, a run needs at least "
            f"{min_free / 2**20:.0f} MiB; free space or choose another --outputs."
        )


def labelled(run: Run) -> tuple[Path, Path]:
    """The labels and class map of a run's region, or a message asking for them."""
    if run.region.labels is None or run.region.classes is None:
        raise CropflowError(
            f"region {run.region.name!r} is not in the region catalog: give its labels and classes "
            "(--labels FILE --classes FILE)."
        )
    return run.region.labels, run.region.classes
