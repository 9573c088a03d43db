"""Both teacher -> student distillations on the synthetic cube: they run, start from the teacher's weights and give
loadable checkpoints; the train flow and `cropflow train` / `crop-map` reach them."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from test_train import BANDS, FAST, LTAE, SAR_BANDS, write_synthetic_region

from infra.errors import CropflowError
from models.joint_reconstruction import JointReconstruction
from models.modality_distillation import ModalityDistillation
from tasks.distill import distill_incomplete, distill_modalities
from tasks.labels import read_classes
from tasks.train import TrainOptions, load_checkpoint, train_model

OPTIONS = TrainOptions(epochs=1, patches_per_epoch=16, patch_size=16, batch_size=8, progress=False, device="cpu")
STILL = dataclasses.replace(OPTIONS, lr=0.0)  # no step moves a weight: checkpoints hold the starting weights
RECONSTRUCTION = {"hidden_dim": 8, "heads": 2, "layers": 1}


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    torch.set_num_threads(1)
    return write_synthetic_region(tmp_path_factory.mktemp("distill"))


@pytest.fixture(scope="module")
def teacher(region, tmp_path_factory) -> Path:
    """An optical L-TAE checkpoint."""
    folder = tmp_path_factory.mktemp("teacher")
    kwargs = FAST | {"model_config": LTAE}
    result = train_model(region["cube"], region["labels"], region["classes"], folder, "ltae", epochs=2, **kwargs)
    return result.checkpoint


@pytest.fixture(scope="module")
def still(region, teacher, tmp_path_factory) -> dict:
    """Both distillations from `teacher` at learning rate 0."""
    folder = tmp_path_factory.mktemp("still")
    inputs = (region["cube"], region["labels"], region["classes"])
    incomplete = distill_incomplete(*inputs, folder / "incomplete", teacher, RECONSTRUCTION, options=STILL)
    stages = distill_modalities(
        *inputs, folder / "modalities", teacher, target_config={"embed_dim": 8}, threshold=0.4, options=STILL
    )
    return {"incomplete": incomplete.checkpoint} | {name: result.checkpoint for name, result in stages.items()}


def parameters(checkpoint: Path, bands: list[str] = BANDS, sar_bands: list[str] | None = None) -> dict:
    return dict(load_checkpoint(checkpoint, bands, None, sar_bands)[0].named_parameters())


def test_incomplete_series_distillation(region, teacher, tmp_path):
    result = distill_incomplete(
        region["cube"], region["labels"], region["classes"], tmp_path, teacher, RECONSTRUCTION, options=OPTIONS
    )
    model, ckpt = load_checkpoint(result.checkpoint, BANDS, read_classes(region["classes"]))
    assert isinstance(model, JointReconstruction) and ckpt["model_config"]["backbone"] == "ltae"
    assert ckpt["norm"] == torch.load(teacher, weights_only=True)["norm"]
    assert result.epochs_run == 1 and 0 <= result.best_val_miou <= 1


def test_students_start_from_the_teacher(teacher, still):
    """As in `cropflow bench accuracy`: every student parameter with a teacher's name and shape starts equal to it."""
    ours = parameters(teacher)
    incomplete = parameters(still["incomplete"])
    assert all(torch.equal(incomplete[f"student.{k}"], v) for k, v in ours.items())
    optical = parameters(still["optical_student"])
    assert optical.keys() == ours.keys() and all(torch.equal(optical[k], v) for k, v in ours.items())
    branch = parameters(still["target"], sar_bands=SAR_BANDS)
    same_shape = {k for k, v in ours.items() if branch[f"optical.{k}"].shape == v.shape}
    assert all(torch.equal(branch[f"optical.{k}"], ours[k]) for k in same_shape)
    # the branch's head gives an 8-channel embedding, not the 3 classes: it alone starts afresh
    assert sorted(ours.keys() - same_shape) == ["decoder.1.bias", "decoder.1.weight"]


def test_a_teacher_is_an_optical_model(region, still, tmp_path):
    inputs = (region["cube"], region["labels"], region["classes"], tmp_path)
    for other in (still["target"], still["sar_student"]):
        with pytest.raises(CropflowError, match=r"not of the optical \(s2\) bands alone"):
            distill_modalities(*inputs, other, options=STILL)
        with pytest.raises(CropflowError, match=r"not of the optical \(s2\) bands alone"):
            distill_incomplete(*inputs, other, options=STILL)
    with pytest.raises(CropflowError, match=r"teacher checkpoint .*none\.pt not found"):
        distill_incomplete(*inputs, tmp_path / "none.pt", options=STILL)


def test_optical_sar_distillation(region, tmp_path):
    results = distill_modalities(
        region["cube"],
        region["labels"],
        region["classes"],
        tmp_path,
        teacher_config=LTAE,
        student_config=LTAE,
        target_config={"embed_dim": 8},
        threshold=0.4,
        options=OPTIONS,
    )
    assert list(results) == ["teacher", "optical_student", "sar_student", "target"]
    assert results["target"].checkpoint == tmp_path / "model.pt"  # the run's model; the other stages in sub-folders
    assert all((tmp_path / name / "model.pt").is_file() for name in ("teacher", "optical_student", "sar_student"))
    classes = read_classes(region["classes"])
    _, sar_ckpt = load_checkpoint(results["sar_student"].checkpoint, SAR_BANDS, classes)
    assert sar_ckpt["sensor"] == "s1"
    model, ckpt = load_checkpoint(results["target"].checkpoint, BANDS, classes, sar_bands=SAR_BANDS)
    assert isinstance(model, ModalityDistillation) and ckpt["sar"]["bands"] == SAR_BANDS


def test_model_spec_distills_optical_and_sar_from_a_teacher() -> None:
    from flows.params import ModelSpec

    assert ModelSpec(name="modality_distillation", teacher="ltae/model.pt").teacher == "ltae/model.pt"
    assert ModelSpec(name="modality_distillation").teacher is None  # trained on the labels alone
    with pytest.raises(CropflowError, match=r"teacher applies to .* and modality_distillation .*, not to 'stcln'"):
        ModelSpec(name="stcln", teacher="ltae/model.pt")


def test_crop_map_checks_the_teacher_and_the_sensors_first(teacher, tmp_path) -> None:
    from flows.crop_map import check_model_inputs
    from flows.params import ModelSpec

    spec = ModelSpec(name="modality_distillation", teacher=str(teacher))
    check_model_inputs(spec, ["s2", "s1"])
    with pytest.raises(CropflowError, match="add s1 to the sensors"):
        check_model_inputs(spec, ["s2", "landsat"])
    with pytest.raises(CropflowError, match=r"teacher .*none\.pt not found"):
        check_model_inputs(ModelSpec(name="joint_reconstruction", teacher=str(tmp_path / "none.pt")), ["s2"])


def _run_folder(region: dict, outputs: Path) -> tuple[str, str, Path]:
    """A bbox region and season whose run folder under `outputs` holds the synthetic cube."""
    from flows.params import resolve_run

    bbox, season = "3.0,51.0,3.1,51.1", "2024-04-01..2024-07-09"
    run = resolve_run(bbox, season, outputs, region["labels"], region["classes"])
    shutil.copytree(region["cube"], run.out / "cube.zarr")
    return bbox, season, run


def test_train_key_follows_the_method_and_the_teachers_bytes(region, teacher, tmp_path) -> None:
    from flows.params import ModelSpec
    from flows.steps import train_key

    _, _, run = _run_folder(region, tmp_path / "outputs")
    copy = tmp_path / "teacher.pt"
    shutil.copy(teacher, copy)
    specs = [
        ModelSpec(name="modality_distillation"),
        ModelSpec(name="modality_distillation", teacher=str(copy)),
        ModelSpec(name="joint_reconstruction", teacher=str(copy)),
        ModelSpec(name="stcln"),
        ModelSpec(name="stcln", pretrain_epochs=2),
    ]
    keys = [train_key(run, spec) for spec in specs]
    assert len(set(keys)) == len(specs) and train_key(run, specs[1]) == keys[1]
    copy.write_bytes(copy.read_bytes() + b"retrained")
    assert train_key(run, specs[1]) != keys[1]


@pytest.mark.slow
def test_train_flow_distills_optical_and_sar(region, teacher, prefect_server, tmp_path) -> None:
    """`cropflow train --model modality_distillation --teacher T`: the run's model.pt, cached, the teacher checked."""
    from flows.params import ModelSpec
    from flows.steps import train

    bbox, season, run = _run_folder(region, tmp_path)
    spec = ModelSpec(
        name="modality_distillation", teacher=str(teacher), params={"embed_dim": 8}, epochs=3, time_budget_s=None
    )
    result = train(bbox, season, spec, region["labels"], region["classes"], tmp_path)
    assert result.checkpoint == run.out / "model.pt" and result.epochs_run == 3
    model, ckpt = load_checkpoint(result.checkpoint, BANDS, read_classes(region["classes"]), SAR_BANDS)
    assert isinstance(model, ModalityDistillation) and ckpt["distilled_from"] == str(teacher)
    assert all((run.out / name / "model.pt").is_file() for name in ("optical_student", "sar_student"))
    assert result.best_val_miou > 0.5  # three classes
    written = result.checkpoint.stat().st_mtime_ns
    assert train(bbox, season, spec, region["labels"], region["classes"], tmp_path) == result
    assert result.checkpoint.stat().st_mtime_ns == written  # cached: nothing trained again
    own = spec.model_copy(update={"teacher": str(run.out / "optical_student" / "model.pt")})
    with pytest.raises(CropflowError, match="is a model this run writes"):
        train(bbox, season, own, region["labels"], region["classes"], tmp_path)
