"""Masked pre-training of STCLN on the synthetic cube, then fine-tuning from its encoder."""

from __future__ import annotations

import pytest
import torch
from test_train import FAST, STCLN, write_synthetic_region

from infra.errors import CropflowError
from tasks.pretrain import pretrain_model
from tasks.train import TrainOptions, train_model

OPTIONS = TrainOptions(epochs=2, patches_per_epoch=16, patch_size=16, batch_size=8, progress=False, device="cpu")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("pretrain")
    region = write_synthetic_region(folder)
    return region, pretrain_model(region["cube"], folder / "encoder", STCLN, options=OPTIONS)


def test_pretraining_writes_an_encoder_checkpoint(pretrained):
    _, result = pretrained
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert ckpt["kind"] == "pretrained_encoder" and ckpt["model_name"] == "stcln" and ckpt["classes"] == []
    assert ckpt["model_config"]["reconstruction_head"] and "reconstruction.weight" in ckpt["state_dict"]
    assert [h["epoch"] for h in result.history] == [1, 2] and all(h["loss"] > 0 for h in result.history)


def test_fine_tuning_starts_from_the_pretrained_encoder(pretrained, tmp_path):
    region, result = pretrained
    encoder = torch.load(result.checkpoint, weights_only=True)
    # lr 0: the weights stay where fine-tuning started
    tuned = train_model(
        region["cube"],
        region["labels"],
        region["classes"],
        tmp_path,
        "stcln",
        epochs=1,
        init_from=result.checkpoint,
        **(FAST | {"model_config": STCLN, "lr": 0.0}),
    )
    ckpt = torch.load(tuned.checkpoint, weights_only=True)
    assert ckpt["norm"] == encoder["norm"]  # fine-tuning uses the pre-training's normalisation
    for key in ("mask_token", "cnn.0.0.weight", "temporal.0.self_attn.in_proj_weight"):
        assert torch.equal(ckpt["state_dict"][key], encoder["state_dict"][key])
    assert "reconstruction.weight" not in ckpt["state_dict"]
    with pytest.raises(CropflowError, match="has no pre-trained encoder to load"):
        train_model(
            region["cube"],
            region["labels"],
            region["classes"],
            tmp_path / "fcn",
            epochs=1,
            init_from=result.checkpoint,
            **FAST,
        )
    with pytest.raises(CropflowError, match="does not fit the model"):
        train_model(
            region["cube"],
            region["labels"],
            region["classes"],
            tmp_path / "big",
            "stcln",
            epochs=1,
            init_from=result.checkpoint,
            **(FAST | {"model_config": STCLN | {"d_model": 32}}),
        )


def test_model_spec_takes_pretraining_and_a_teacher_only_where_they_apply() -> None:
    from flows.params import ModelSpec
    from infra.errors import CropflowError

    assert ModelSpec(name="stcln", pretrain_epochs=3).pretrain_epochs == 3
    assert ModelSpec(name="joint_reconstruction", teacher="runs/ltae/model.pt").teacher == "runs/ltae/model.pt"
    with pytest.raises(CropflowError, match="pretrain_epochs applies to stcln"):
        ModelSpec(name="fcn3d", pretrain_epochs=1)
    with pytest.raises(CropflowError, match="joint_reconstruction learns from a teacher"):
        ModelSpec(name="joint_reconstruction")
    with pytest.raises(CropflowError, match="teacher applies to joint_reconstruction"):
        ModelSpec(name="ltae", teacher="model.pt")
