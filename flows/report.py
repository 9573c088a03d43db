"""What a run leaves for operators in the Prefect UI and for automations: artifacts and events.

Artifacts of a crop map (keys end with the region, so the UI keeps one history per region): `crop-map-report-*`
(markdown: region, season, items per sensor, cloud statistics, model, metrics, links to the outputs),
`crop-map-classes-*` (table: per-class metrics and areas), `crop-map-preview-*` and `confusion-matrix-*` (images,
embedded as data URLs so the UI shows them without serving files). Events: `cropflow.cube.ready` and
`cropflow.map.published`, their resource `cropflow.cube.<region>.<season>` / `cropflow.map.<region>.<season>`.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from pydantic import BaseModel
from upath import UPath

from flows.params import ModelSpec, Run
from infra.storage import location
from tasks.evaluate import HEADLINE, headline, metrics_markdown


class CubeInfo(BaseModel):
    """A built cube and what went into it: items per sensor, their mean `eo:cloud_cover`, the clear-sky fraction."""

    path: Path | UPath  # a local path or an object-store URL (infra.storage.location)
    items: dict[str, int]
    cloud_cover: dict[str, float | None]
    clear_fraction: float
    fingerprint: str


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _resource(kind: str, run: Run) -> dict[str, str]:
    return {
        "prefect.resource.id": f"cropflow.{kind}.{run.region.name}.{run.season}",
        "prefect.resource.name": f"{kind} of {run.region.name}, {run.start} to {run.end}",
        "cropflow.region": run.region.name,
        "cropflow.season": run.season,
    }


def emit_cube_ready(run: Run, cube: CubeInfo) -> None:
    """`cropflow.cube.ready`: the cube of a region and season is complete (path, items, fingerprint)."""
    emit_event(
        "cropflow.cube.ready",
        resource=_resource("cube", run),
        payload={"path": str(cube.path), "items": cube.items, "fingerprint": cube.fingerprint},
    )


def emit_map_published(run: Run, outputs: dict[str, str], metrics: dict) -> None:
    """`cropflow.map.published`: the crop map, its STAC item and headline metrics are written."""
    summary = {k: metrics.get(k) for k in HEADLINE}
    emit_event(
        "cropflow.map.published",
        resource=_resource("map", run),
        payload={"crop_map": outputs["crop_map"], "stac_item": outputs["stac_item"], "metrics": summary},
    )


def data_url(png: Path) -> str:
    """A PNG file as a `data:` URL."""
    return "data:image/png;base64," + base64.b64encode(location(png).read_bytes()).decode()


def report_markdown(run: Run, cube: CubeInfo, model: ModelSpec, metrics: dict, outputs: dict[str, str]) -> str:
    """The run report: where and when, the data, the model, the accuracy and where every output is."""
    m = metrics
    lines = [
        f"# Crop map of {run.region.name}, {run.start} to {run.end}",
        "",
        f"Region `{run.region.name}`: EPSG:{run.region.epsg}, bounds {list(run.region.bounds)} m, "
        f"lon/lat {list(run.region.bbox)}.",
        "",
        "## Data",
        "",
        "| sensor | items | mean cloud cover (%) |",
        "| --- | --- | --- |",
        *(
            f"| {s} | {n} | {'-' if cube.cloud_cover.get(s) is None else f'{cube.cloud_cover[s]:.1f}'} |"
            for s, n in cube.items.items()
        ),
        "",
        f"Clear-sky fraction of the Sentinel-2 time bins: {cube.clear_fraction:.1%}. Cube fingerprint "
        f"`{cube.fingerprint}`.",
        "",
        "## Model",
        "",
        f"`{model.name}` {model.params or {}}, at most {model.epochs} epochs"
        + (f" or {model.time_budget_s:.0f} s" if model.time_budget_s else "")
        + f", seed {model.seed}"
        + (f", after {model.pretrain_epochs} epochs of masked pre-training" if model.pretrain_epochs else "")
        + (f", distilled from `{model.teacher}`" if model.teacher else "")
        + ".",
        "",
        f"On held-out parcels: {headline(m)}.",
        "",
        metrics_markdown(metrics),
        "## Outputs",
        "",
        "| output | path |",
        "| --- | --- |",
        *(f"| {k} | [{v}]({location(v).absolute().as_uri()}) |" for k, v in outputs.items()),
    ]
    return "\n".join(lines) + "\n"


def class_rows(metrics: dict) -> list[dict]:
    """One row per class: accuracy on the test split, mapped and estimated areas (ha)."""
    areas = metrics.get("area_adjusted", {}).get("per_class", {})
    rows = []
    for name, c in metrics["per_class"].items():
        a = areas.get(name, {})
        rows.append(
            {"class": name, **{k: c[k] for k in ("support", "precision", "recall", "f1", "iou")}}
            | {k: a.get(k) for k in ("mapped_area_ha", "area_ha", "area_ci95_ha")}
        )
    return rows


def publish_report(run: Run, cube: CubeInfo, model: ModelSpec, metrics: dict, outputs: dict[str, str]) -> None:
    """The artifacts of one crop map run (call inside the run)."""
    slug = _slug(run.region.name)
    where = f"{run.region.name}, {run.start} to {run.end}"
    create_markdown_artifact(
        report_markdown(run, cube, model, metrics, outputs), key=f"crop-map-report-{slug}", description=where
    )
    create_table_artifact(class_rows(metrics), key=f"crop-map-classes-{slug}", description=f"classes of {where}")
    create_image_artifact(data_url(outputs["preview"]), key=f"crop-map-preview-{slug}", description=where)
    create_image_artifact(
        data_url(outputs["confusion_matrix"]), key=f"confusion-matrix-{slug}", description=f"test split, {where}"
    )
