"""`cropflow bench accuracy`: the parcel-series helpers on small made-up tables, and the command on a subset of the
real data (skipped without it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.bench import app
from infra.errors import CropflowError
from infra.settings import real_data_dir
from tasks.parcels import Norms, hide_observed_dates, load_parcels, load_pixel_csv, model_batch, stratified_folds

REAL = real_data_dir()


def write_parcels(path: Path, n: int = 12, steps: int = 6, drop: str | None = None) -> Path:
    """A long-format table: `n` samples of 3 codes (one code held by a single sample), monthly steps."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        code = 1101060000 if i == 0 else (1101010011 if i % 2 else 2001020022)
        for t in range(steps):
            b04 = 65535 if (i + t) % 3 == 0 else int(rng.integers(300, 900))
            rows.append(
                {
                    "sample_id": f"s{i}",
                    "timestamp": pd.Timestamp(2023, 3 + t, 1),
                    "ewoc_code": code,
                    "S2-L2A-B04": b04,
                    "S2-L2A-B08": 65535 if b04 == 65535 else 3000,
                    "S2-L2A-B8A": 65535,
                    "S1-SIGMA0-VV": 0 if t == 0 else 4157,
                }
            )
    df = pd.DataFrame(rows)
    df.drop(columns=[drop] if drop else []).to_parquet(path)
    return path


def write_mappings(path: Path) -> Path:
    legend = {"1101060000": "maize", "1101010011": "wheat", "2001020022": "grasslands", "1": "ignore"}
    path.write_text(json.dumps({"LEGEND": legend}))
    return path


def test_load_parcels_any_time_step_merges_rare_classes_and_decodes(tmp_path: Path) -> None:
    data = load_parcels(write_parcels(tmp_path / "p.parquet"), write_mappings(tmp_path / "m.json"), "LEGEND", 2)
    assert data.classes == ["grasslands", "other", "wheat"]  # maize (1 sample) merged into "other"
    assert any("'other': maize" in note for note in data.notes)
    assert data.bands == ["B04", "B08"] and any("S2-L2A-B8A" in note for note in data.notes)  # never observed
    assert data.optical.shape == (12, 6, 2) and data.sar.shape == (12, 6, 1)
    assert np.isnan(data.optical[0, 0]).all() and 0.03 <= np.nanmin(data.optical[:, :, 0]) <= 0.09  # x 10000
    assert np.isnan(data.sar[:, 0]).all() and np.allclose(data.sar[:, 1:], 20 * np.log10(4157) - 83)
    assert data.doy[0] == 59 and np.all(np.diff(data.doy) > 27)  # 1 March, monthly
    x, _, valid, target = model_batch(data, Norms.of(data))
    assert x.shape == (12, 6, 2, 1, 1) and valid.shape == (12, 6, 1, 1) and target.shape == (12, 1, 1)
    assert np.isfinite(x.numpy()).all() and (valid[:, :, 0, 0].numpy() == ~np.isnan(data.optical).any(2)).all()


def test_load_parcels_names_what_is_wrong(tmp_path: Path) -> None:
    mappings = write_mappings(tmp_path / "m.json")
    with pytest.raises(CropflowError, match="ewoc_code"):
        load_parcels(write_parcels(tmp_path / "p.parquet", drop="ewoc_code"), mappings, "LEGEND")
    with pytest.raises(CropflowError, match="valid legends: LEGEND"):
        load_parcels(write_parcels(tmp_path / "q.parquet"), mappings, "CROPTYPE24")


def test_hidden_dates_are_a_fraction_of_the_observed_ones() -> None:
    valid = np.random.default_rng(1).random((50, 40)) < 0.5
    random = hide_observed_dates(valid, 0.5, "random", seed=3)
    assert not (random & ~valid).any()  # only observed dates are removed
    assert (random.sum(1) == np.minimum(np.round(0.5 * valid.sum(1)), valid.sum(1) - 1)).all()
    assert (hide_observed_dates(valid, 0.5, "random", seed=3) == random).all()  # seeded
    assert not (random & ~hide_observed_dates(valid, 0.8, "random", seed=3)).any()  # nested fractions
    run = hide_observed_dates(valid, 0.4, "contiguous", seed=3)
    for row, hidden in zip(valid, run, strict=True):
        position = np.flatnonzero(hidden[row])  # consecutive among the observed dates
        assert position.size == 0 or (np.diff(position) == 1).all()


def test_stratified_folds_refuses_too_small_classes() -> None:
    with pytest.raises(CropflowError, match="fewer than the 5 folds"):
        stratified_folds(np.array([0] * 10 + [1] * 3), 5, seed=0)


def test_pixel_csv_class_names_follow_the_class_map(tmp_path: Path) -> None:
    table = np.array([[0, 7, 0.1, 0.2, 0.3, 0.4], [2, 8, 0.5, 0.6, 0.7, 0.8]])
    np.savetxt(tmp_path / "px.csv", table, delimiter=",")
    (tmp_path / "one_based.txt").write_text("value,class\n1,wheat\n2,barley\n3,rapeseed\n")
    pixels = load_pixel_csv(tmp_path / "px.csv", ["nir", "red"], tmp_path / "one_based.txt")
    assert pixels.classes == ["wheat", "rapeseed"] and pixels.labels.tolist() == [0, 1]
    assert pixels.optical.shape == (2, 2, 2) and pixels.optical[1, 1].tolist() == pytest.approx([0.7, 0.8])
    (tmp_path / "zero_based.txt").write_text("value,class\n0,wheat\n1,barley\n2,rapeseed\n")
    assert load_pixel_csv(tmp_path / "px.csv", ["nir", "red"], tmp_path / "zero_based.txt").classes[1] == "rapeseed"
    (tmp_path / "short.txt").write_text("value,class\n0,wheat\n")
    with pytest.raises(CropflowError, match=r"class codes \[2\] are not in"):
        load_pixel_csv(tmp_path / "px.csv", ["nir", "red"], tmp_path / "short.txt")


@pytest.mark.skipif(REAL is None, reason="real data not found (set CROPFLOW_REAL_DATA)")
def test_bench_accuracy_quick_on_real_data(tmp_path: Path) -> None:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    protocols = "parcels,robustness,modalities,pixels,cloudmasks"
    args = ["accuracy", "--quick", "--data", str(REAL), "--protocols", protocols, "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "accuracy.json").read_text())
    assert (tmp_path / "accuracy.md").read_text().startswith("# cropflow accuracy benchmark")
    assert (tmp_path / "robustness.png").read_bytes()[:4] == b"\x89PNG"
    parcels = results["parcels"]
    majority = max(parcels["class_counts"]) / sum(parcels["class_counts"])
    forest = parcels["models"]["random_forest"]
    assert forest["overall_accuracy"]["mean"] > majority  # above always predicting the largest class
    assert set(parcels["models"]) >= {"ltae", "tempcnn", "transformer", "incomplete_ltae", "s2s1_distilled"}
    for model in parcels["models"].values():
        assert all(0 <= v <= 1 for v in model["macro_f1"]["folds"]) and len(model["macro_f1"]["folds"]) == 2
    rows = results["robustness"]["macro_f1"]["incomplete_ltae"]["contiguous"]
    assert [float(f) for f in rows] == results["robustness"]["fractions"]
    assert {"ltae s1", "ltae s2+s1", "s2s1_fusion", "s2s1_distilled"} <= set(results["modalities"])
    pixels = results["pixels"]
    assert pixels["test_pixels"] == 260 and pixels["models"]["random_forest"]["overall_accuracy"] > 2 / 13
    assert results["cloudmasks"]["sentinel2"]["cloud+shadow dilation 0"]["kappa_3class"] > 0.5


def test_bench_accuracy_refuses_unknown_protocols_before_any_work(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["accuracy", "--protocols", "parcels,maps", "--out", str(tmp_path / "out")])
    assert isinstance(result.exception, CropflowError)
    assert "--protocols: unknown ['maps']" in str(result.exception) and "cloudmasks" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_bench_accuracy_takes_a_parcel_file_without_data_and_trains_only_what_protocols_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CROPFLOW_REAL_DATA", str(tmp_path / "no-such-folder"))
    parcels = write_parcels(tmp_path / "p.parquet")
    legend = {"1101060000": "ignore", "1101010011": "wheat", "2001020022": "grasslands"}
    (tmp_path / "m.json").write_text(json.dumps({"LEGEND": legend}))
    args = ["accuracy", "--quick", "--parcels", str(parcels), "--mappings", str(tmp_path / "m.json")]
    args += ["--legend", "LEGEND", "--protocols", "modalities", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert "parcels" not in results and "robustness" not in results and "reproducibility" not in results
    rows = {f"{m} {s}" for m in ("random_forest", "tempcnn", "ltae") for s in ("s2", "s1", "s2+s1")}
    assert set(results["modalities"]) == rows | {"s2s1_fusion", "s2s1_distilled"}  # no transformer, no student


def test_bench_accuracy_names_the_missing_input_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CROPFLOW_REAL_DATA", str(tmp_path / "no-such-folder"))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["accuracy", "--protocols", "cloudmasks,pixels", "--out", str(out)])
    assert isinstance(result.exception, CropflowError) and "--pixels: no input; give --pixels" in str(result.exception)
    result = CliRunner().invoke(app, ["accuracy", "--protocols", "pixels", "--pixels", str(tmp_path / "px")])
    assert "--pixels " + str(tmp_path / "px") + " not found" in str(result.exception)
    assert not out.exists()
