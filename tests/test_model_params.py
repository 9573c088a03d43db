"""A model's own settings (`--params`, the `params` of the `model` flow parameter): merged over its defaults,
checked against its constructor before any long work, part of the train cache key; the checkpoint that `cropflow
train --params` writes and predict loads: tests/test_train.py (beside its other test of a flow, one Prefect server)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_distill import _run_folder
from test_train import write_synthetic_region

from flows.params import ModelSpec
from infra.errors import CropflowError
from tasks.train import model_config_for, resolve_device

FCN3D_KEYS = "accepted keys (default): widths=(32, 64, 128, 256), use_valid_channel=True"


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    return write_synthetic_region(tmp_path_factory.mktemp("params"))


def _command(command: str, region: dict[str, Path], outputs: Path) -> list[str]:
    bbox, season = "3.0,51.0,3.1,51.1", "2024-04-01..2024-07-09"  # the run folder of test_distill._run_folder
    where = ["--region", bbox, "--season", season, "--labels", str(region["labels"]), "--classes"]
    return [command, *where, str(region["classes"]), "--outputs", str(outputs)]


def test_params_are_merged_over_the_defaults(region) -> None:
    from tasks.train import DEFAULT_MODEL_CONFIG, load_training_data

    data = load_training_data(region["cube"], region["labels"], region["classes"])
    cpu = resolve_device("cpu")
    config = model_config_for("fcn3d", {"use_valid_channel": False}, data, cpu)
    assert config == DEFAULT_MODEL_CONFIG["cpu"]["fcn3d"] | {
        "use_valid_channel": False,
        "in_channels": 4,
        "num_classes": 3,
    }
    assert model_config_for("fcn3d", {"widths": [8]}, data, cpu)["widths"] == [8]


def test_params_enter_the_train_cache_key(region, tmp_path) -> None:
    from flows.steps import train_key

    _, _, run = _run_folder(region, tmp_path)
    specs = [ModelSpec(), ModelSpec(params={"widths": [8, 16]}), ModelSpec(params={"widths": [8, 32]})]
    keys = {train_key(run, spec) for spec in specs}
    assert len(keys) == len(specs)
    assert train_key(run, ModelSpec(params={"widths": [8, 16]})) in keys  # the same params, the same key


def test_the_train_cache_key_follows_the_devices_defaults(region, tmp_path, monkeypatch) -> None:
    """fcn3d is wider on a GPU: a model trained on a CPU does not stand for the one a GPU machine would train."""
    import flows.steps
    from flows.steps import train_key

    _, _, run = _run_folder(region, tmp_path)
    specs = [ModelSpec(), ModelSpec(name="tempcnn")]
    on_cpu = [train_key(run, spec) for spec in specs]
    monkeypatch.setattr(flows.steps, "resolve_device", lambda _: resolve_device("cuda"))  # torch.device only
    on_gpu = [train_key(run, spec) for spec in specs]
    assert on_gpu[0] != on_cpu[0]  # fcn3d's widths differ
    assert on_gpu[1] == on_cpu[1]  # tempcnn has no device defaults


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"params": {"width": [8]}}, f"params: 'width' of model 'fcn3d' is unknown; {FCN3D_KEYS}."),
        (
            {"params": {"widths": "wide"}},
            f"params: widths='wide': input should be a valid array (model 'fcn3d'); {FCN3D_KEYS}",
        ),
        ({"params": {"widths": ["8"]}}, "widths=['8'] at item 0: input should be a valid integer"),
        (
            {"name": "ltae", "params": {"d_model": 64.5}},
            "d_model=64.5: input should be a valid integer (model 'ltae'); accepted keys (default): embed_dims=(64, 1",
        ),
        ({"params": {"widths": [8, 0]}}, "widths=[8, 0] at item 1: input should be greater than 0 (model 'fcn3d')"),
        ({"name": "tempcnn", "params": {"dropout": 1}}, "dropout=1: input should be less than 1 (model 'tempcnn')"),
        ({"name": "modality_distillation", "params": {"tau": 0.0}}, "tau=0.0: input should be greater than 0"),
        (
            {"params": {"in_channels": 3}},
            f"'in_channels' of model 'fcn3d' is set from the cube and the class map; {FCN3D_KEYS}",
        ),
        (
            {"name": "utae", "params": {"n_head": 5}},
            "do not make a utae model: every encoder width but the last must be a multiple of n_head=5",
        ),
        ({"name": "stcln", "params": {"d_model": 30}}, "do not make a stcln model: embed_dim must be divisible by"),
        (
            {"name": "modality_distillation", "params": {"sar_backbone": "tempcnn", "sar_config": {"kernel": 0}}},
            "params.sar_config: kernel=0: input should be greater than 0 (model 'tempcnn'); accepted keys (default): w",
        ),
        (
            {"name": "modality_distillation", "params": {"optical_backbone": "resnet", "optical_config": {}}},
            "params.optical_config: model 'resnet' is unknown; valid names: fcn3d,",
        ),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "wrong-item-type",
        "float-for-int",
        "zero-width",
        "dropout-of-one",
        "zero-temperature",
        "data-size",
        "refused-by-the-model",
        "refused-by-torch",
        "wrapped-model-setting",
        "wrapped-model-unknown",
    ],
)
def test_bad_params_are_refused_naming_key_model_and_accepted_keys(spec, message) -> None:
    """As a deployment's parameters are checked (pydantic), before the flow runs."""
    with pytest.raises(CropflowError) as refused:
        ModelSpec.model_validate(spec)
    assert message in str(refused.value)


def test_good_params_of_every_kind_pass() -> None:
    ModelSpec(name="stcln", params={"window": None, "dropout": 0, "reconstruction_head": True})
    ModelSpec(name="random_forest", params={"n_estimators": 20, "max_depth": 12})
    ModelSpec(name="modality_distillation", params={"embed_dim": 8, "optical_config": {"d_model": 32}})


@pytest.mark.parametrize("command", ["train", "crop-map"])
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ('{"width": [8, 16]}', f"error: params: 'width' of model 'fcn3d' is unknown; {FCN3D_KEYS}."),
        ('{"widths": 8}', "error: params: widths=8: input should be a valid array (model 'fcn3d')"),
        ("{tmp}/none.yaml", "error: --params file {tmp}/none.yaml cannot be read (No such file or directory)"),
        ('{"widths": [8, 16}', "error: --params '{\"widths\": [8, 16}' is not valid JSON (Expecting ',' delimiter"),
        ("{tmp}/list.yaml", "error: --params {tmp}/list.yaml is not a mapping of setting names to values"),
    ],
    ids=["unknown-key", "wrong-type", "file-missing", "invalid-json", "not-a-mapping"],
)
def test_bad_params_on_the_command_line(command, params, message, region, tmp_path, monkeypatch, refused_cli) -> None:
    """Exit 2, one message, nothing written: checked before the cube, the labels or the training."""
    monkeypatch.setenv("CROPFLOW_HOME", str(tmp_path / "home"))
    (tmp_path / "list.yaml").write_text("- widths\n- [8, 16]\n")
    before = sorted(tmp_path.rglob("*"))
    params, message = params.replace("{tmp}", str(tmp_path)), message.replace("{tmp}", str(tmp_path))
    code, output = refused_cli([*_command(command, region, tmp_path / "outputs"), "--params", params])
    assert code == 2 and output.startswith(message), output
    assert sorted(tmp_path.rglob("*")) == before
