"""Bad input refused through the real command line (`flows.cli.main`, in this process): one message naming the field
and what would be valid, exit status 2, no traceback, nothing written (issue 9; docs/reliability.md).

Cases covered elsewhere (dates in the wrong order or format, a season with no scenes, an unknown sensor, a missing
label file, a region without a season, an unknown collection, a checkpoint that does not match the cube) are listed
with their tests in `flows/reliability.py` (BAD_INPUT).
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import pytest
import yaml
from pydantic import ValidationError

from infra.errors import CropflowError

SEASON = "2024-03-01..2024-10-31"


@pytest.fixture(scope="module")
def inputs(tiny_region: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Files of the bad inputs, beside good labels, classes and region entries of the tiny region."""
    folder = tmp_path_factory.mktemp("bad-input")
    meta = json.loads((tiny_region / "region.json").read_text())
    labels = gpd.read_parquet(tiny_region / "labels.parquet")
    w, s, e, n = meta["bbox"]
    bowtie = {"type": "Polygon", "coordinates": [[[w, s], [e, n], [e, s], [w, n], [w, s]]]}
    (folder / "bowtie.geojson").write_text(json.dumps({"type": "Feature", "geometry": bowtie, "properties": {}}))
    (folder / "empty.parquet").write_bytes(b"")
    labels.iloc[:0].to_parquet(folder / "no-rows.parquet")
    labels.set_crs("EPSG:4326", allow_override=True).to_parquet(folder / "wrong-crs.parquet")
    labels.assign(class_id=labels["class_id"].where(labels.index % 2 == 0, 42)).to_parquet(folder / "c42.parquet")
    good = {
        "bbox": meta["bbox"],
        "labels": str(tiny_region / "labels.parquet"),
        "classes": str(tiny_region / "classes.json"),
        "season": {"start": "2024-03-01", "end": "2024-10-31"},
    }
    regions = {
        "good": good,
        "no-labels-field": {k: v for k, v in good.items() if k != "labels"},
        "typo": {**good, "bbx": good["bbox"]},
        "leap-day": {**good, "calendar": {"start": "02-29", "end": "10-31"}},
        "resolution-text": {**good, "resolution": "10m"},
        "epsg-text": {**good, "epsg": "utm"},
        "../escape": good,
    }
    (folder / "regions.yaml").write_text(yaml.safe_dump({"regions": regions}))
    catalogs = {  # each in its own file: a broken entry stops every catalog of its file
        "typo": {"urll": "local", "sensors": {"s2": "sentinel-2-l2a"}},
        "bands": {"url": "local", "sensors": {"s2": {"collection": "sentinel-2-l2a", "assets": {"b4": "B99"}}}},
    }
    for name, entry in catalogs.items():
        (folder / f"catalogs-{name}.yaml").write_text(yaml.safe_dump({"catalogs": {name: entry}}))
    return {
        "folder": str(folder),
        "bbox": ",".join(str(v) for v in meta["bbox"]),
        "labels": good["labels"],
        "classes": good["classes"],
    }


def _bbox_run(region: str, labels: str = "{labels}", *more: str) -> list[str]:
    return ["crop-map", "--region", region, "--season", SEASON, "--labels", labels, "--classes", "{classes}", *more]


# (id, command line, expected fragment); {folder}, {bbox}, {labels}, {classes} come from `inputs`
CASES = [
    ("bbox-out-of-range", _bbox_run("200,10,201,11"), "is outside longitude -180..180 / latitude -90..90"),
    ("bbox-inverted", _bbox_run("4.5,50.9,4.4,51.0"), "is inverted or empty; need west < east, south < north"),
    ("bbox-malformed-number", _bbox_run("4..4,50.9,4.5,51.0"), "must be four numbers [west, south, east, north]"),
    ("geometry-self-intersecting", _bbox_run("{folder}/bowtie.geojson"), "geometry 0 is not valid (Self-intersection"),
    ("catalog-unknown", [*_bbox_run("{bbox}"), "--catalog", "nowhere"], "unknown catalog 'nowhere'; known catalogs:"),
    ("catalog-unknown-field", [*_bbox_run("{bbox}"), "--catalog", "typo"], "unknown field(s) urll; valid fields: url"),
    ("band-unknown", [*_bbox_run("{bbox}"), "--catalog", "bands"], "unknown bands: B99, missing bands: B02"),
    ("model-unknown", [*_bbox_run("{bbox}"), "--model", "resnet"], "model 'resnet' is unknown; valid model names:"),
    (
        "teacher-for-another-model",
        [*_bbox_run("{bbox}"), "--model", "ltae", "--teacher", "{labels}"],
        "teacher applies to joint_reconstruction (incomplete-series distillation) and modality_distillation",
    ),
    (
        "teacher-missing",
        [*_bbox_run("{bbox}"), "--model", "joint_reconstruction", "--teacher", "{folder}/none.pt"],
        "none.pt not found; give the model.pt of a trained optical run",
    ),
    (
        "s2-s1-model-without-s1",
        [*_bbox_run("{bbox}"), "--model", "modality_distillation", "--sensors", "s2,landsat"],
        "takes the S2 and S1 series: add s1 to the sensors",
    ),
    (
        "pretraining-for-another-model",
        [*_bbox_run("{bbox}"), "--model", "fcn3d", "--pretrain-epochs", "5"],
        "pretrain_epochs applies to stcln (masked pre-training), not to 'fcn3d'",
    ),
    ("labels-not-a-file-format", _bbox_run("{bbox}", "{folder}/empty.parquet"), "could not be read"),
    ("labels-empty", _bbox_run("{bbox}", "{folder}/no-rows.parquet"), "hold no parcel geometry"),
    ("labels-other-crs", _bbox_run("{bbox}", "{folder}/wrong-crs.parquet"), "is their CRS (EPSG:4326) wrong?"),
    ("labels-class-absent", _bbox_run("{bbox}", "{folder}/c42.parquet"), "class ids [42] are not in the class map "),
    ("region-missing-field", ["crop-map", "--region", "no-labels-field"], "is missing field(s): labels"),
    ("region-unknown-field", ["crop-map", "--region", "typo"], "unknown field(s) bbx; valid fields: description"),
    (
        "region-calendar-leap-day",
        ["crop-map", "--region", "leap-day", "--season", "2023"],
        "calendar.start='02-29' is not a day of every year; use MM-DD from 01-01 to 12-31",
    ),
    ("region-resolution-not-a-number", ["crop-map", "--region", "resolution-text"], "resolution='10m' is not a number"),
    ("region-epsg-not-a-number", ["crop-map", "--region", "epsg-text"], "epsg='utm' is not an integer EPSG code"),
    (
        "season-not-a-date",
        ["crop-map", "--region", "good", "--season", "2024-02-30..2024-10-31"],
        "start='2024-02-30' is not a date; use YYYY-MM-DD",
    ),
    (
        "backfill-cloud-mask-unknown",
        ["backfill", "--seasons", "2023,2024", "--region", "good", "--s2-cloud-mask", "fmask"],
        "s2_cloud_mask='fmask'; choose one of auto, scl, spectral",
    ),
    (
        "backfill-teacher-for-another-model",
        ["backfill", "--seasons", "2023,2024", "--region", "good", "--model", "ltae", "--teacher", "{labels}"],
        "teacher applies to joint_reconstruction (incomplete-series distillation) and modality_distillation",
    ),
    (
        "backfill-labels-class-absent",
        [
            "backfill",
            "--seasons",
            "2023,2024",
            "--region",
            "{bbox}",
            "--labels",
            "{folder}/c42.parquet",
            "--classes",
            "{classes}",
        ],
        "class ids [42] are not in the class map ",
    ),
    ("region-name-escapes", ["crop-map", "--region", "../escape"], "cannot name a run folder"),
    ("outputs-escape", ["crop-map", "--region", "good", "--outputs", "../../etc"], "climbs out of the working folder"),
]


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize(("args", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused(args, fragment, inputs, tmp_path, monkeypatch, refused_cli, record_property) -> None:
    record_property("input", " ".join(a.replace("{folder}/", "") for a in args[1:]))  # rows of docs/reliability.md
    record_property("message", fragment)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CROPFLOW_HOME", str(home))
    monkeypatch.setenv("CROPFLOW_REGIONS", f"{inputs['folder']}/regions.yaml")
    catalog = args[args.index("--catalog") + 1] if "--catalog" in args else None
    catalogs = Path(inputs["folder"]) / f"catalogs-{catalog}.yaml"
    if catalogs.exists():
        monkeypatch.setenv("CROPFLOW_CATALOGS", str(catalogs))
    else:
        monkeypatch.delenv("CROPFLOW_CATALOGS", raising=False)
    code, message = refused_cli([a.format(**inputs) for a in args])
    assert code == 2, message
    assert message.startswith("error: ") and fragment in message, message
    assert "Traceback" not in message
    assert _files(tmp_path) == [home], "a refused run must write nothing"


def test_flow_parameters_with_unknown_keys_or_names_are_refused() -> None:
    from flows.params import ModelSpec

    with pytest.raises(ValidationError, match=r"epoch\n.*Extra inputs are not permitted"):
        ModelSpec.model_validate({"name": "fcn3d", "epoch": 3})  # a deployment's parameters, as Prefect checks them
    with pytest.raises(CropflowError, match=r"model 'resnet' is unknown; valid model names: .*fcn3d"):
        ModelSpec(name="resnet")
