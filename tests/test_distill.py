"""Both teacher -> student distillations on the synthetic cube: they run and give loadable checkpoints."""

from __future__ import annotations

import pytest
import torch
from test_train import BANDS, FAST, LTAE, SAR_BANDS, write_synthetic_region

from models.joint_reconstruction import JointReconstruction
from models.modality_distillation import ModalityDistillation
from tasks.distill import distill_incomplete, distill_modalities
from tasks.labels import read_classes
from tasks.train import TrainOptions, load_checkpoint, train_model

OPTIONS = TrainOptions(epochs=1, patches_per_epoch=16, patch_size=16, batch_size=8, progress=False, device="cpu")


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    torch.set_num_threads(1)
    return write_synthetic_region(tmp_path_factory.mktemp("distill"))


def test_incomplete_series_distillation(region, tmp_path):
    teacher = train_model(
        region["cube"],
        region["labels"],
        region["classes"],
        tmp_path / "teacher",
        "ltae",
        epochs=2,
        **(FAST | {"model_config": LTAE}),
    )
    result = distill_incomplete(
        region["cube"],
        region["labels"],
        region["classes"],
        tmp_path / "student",
        teacher.checkpoint,
        {"hidden_dim": 8, "heads": 2, "layers": 1},
        options=OPTIONS,
    )
    model, ckpt = load_checkpoint(result.checkpoint, BANDS, read_classes(region["classes"]))
    assert isinstance(model, JointReconstruction) and ckpt["model_config"]["backbone"] == "ltae"
    assert ckpt["norm"] == torch.load(teacher.checkpoint, weights_only=True)["norm"]
    assert result.epochs_run == 1 and 0 <= result.best_val_miou <= 1


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
    classes = read_classes(region["classes"])
    _, sar_ckpt = load_checkpoint(results["sar_student"].checkpoint, SAR_BANDS, classes)
    assert sar_ckpt["sensor"] == "s1"
    model, ckpt = load_checkpoint(results["target"].checkpoint, BANDS, classes, sar_bands=SAR_BANDS)
    assert isinstance(model, ModalityDistillation) and ckpt["sar"]["bands"] == SAR_BANDS
