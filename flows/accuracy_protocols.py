"""The protocols of `cropflow bench accuracy` (flows/bench_accuracy.py): cropflow's models on real data.

1. parcels: stratified k-fold cross-validation on labelled parcel series (`tasks.parcels`): random forest,
   TempCNN, L-TAE, a Transformer encoder (STCLN's temporal encoder on 1 x 1 inputs), the incomplete-series
   teacher/student with reconstruction (`joint_reconstruction` around L-TAE, the L-TAE of the fold as teacher) and
   the optical + SAR modality-balancing distillation (`modality_distillation`, L-TAE branches); OA, kappa, macro-F1.
2. robustness: the same fold models with 0-80 % of each test parcel's observed optical dates removed (random or
   one contiguous run), macro-F1 against the missing fraction (table and PNG).
3. modalities: random forest, TempCNN and L-TAE on S2, S1 and S2 + S1 (stacked channels), and the two-branch
   S2 + S1 model without (cross-entropy only) and with the balancing distillation.
4. pixels: the TempCNN pixel set, its fixed train/test split.
5. patches: WorldCereal patches through the full path (import -> local STAC API -> search -> cube -> model),
   leave-one-patch-out, pixel OA and per-class IoU (`flows.bench_patches`).
6. cloud masks: the reflectance-only Fmask test with the cube's dilation options against reference masks.

Deep models stop early on an inner validation split of the training samples (never on the test fold). Everything
is seeded; `--quick` runs a subset (the CI smoke test). Results go to `OUT/accuracy.json`, `OUT/accuracy.md` and
`OUT/robustness.png`, each written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flows.bench_common import markdown_table
from infra.atomic import atomic_path
from infra.errors import CropflowError
from infra.settings import home_dir, real_data_dir
from models.losses import IoULoss
from models.registry import build_model
from tasks.distill import (
    GAP_RATE,
    frozen,
    incomplete_loss,
    modality_target_loss,
    optical_student_loss,
    sar_student_loss,
    warm_start,
)
from tasks.figures import png_figure
from tasks.parcels import (
    Norms,
    SeriesSet,
    hide_observed_dates,
    inner_split,
    load_parcels,
    load_pixel_csv,
    loss_on,
    model_batch,
    score,
    stratified_folds,
    train_series,
)
from tasks.train import TrainOptions

console = Console(width=160)

FRACTIONS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8)
GAP_MODES = ("random", "contiguous")
# Models on single series; STCLN at 1 x 1 is a Transformer encoder over the dates (see tasks/parcels.py).
SERIES_MODELS: dict[str, tuple[str, dict]] = {
    "random_forest": ("random_forest", {"n_estimators": 200}),
    "tempcnn": ("tempcnn", {}),
    "ltae": ("ltae", {}),
    "transformer": ("stcln", {"hidden": 16, "d_model": 64, "num_layers": 2, "num_heads": 4, "window": 1}),
}
INCOMPLETE, MODALITY_KD, FUSION = "incomplete_ltae", "s2s1_distilled", "s2s1_fusion"
PARCEL_ROWS = (*SERIES_MODELS, INCOMPLETE, MODALITY_KD)
ROBUSTNESS_ROWS = (*PARCEL_ROWS, FUSION)
MODALITY_MODELS = ("random_forest", "tempcnn", "ltae")
KD_THRESHOLD = 0.7
VAL_FRACTION = 0.2
PARCELS_FILE = Path("worldcereal-parcels/2023_FRA_LPIS_POLY_110.geoparquet")
MAPPINGS_FILE = Path("worldcereal-parcels/class_mappings.json")
SERIES_PROTOCOLS = {"parcels", "robustness", "modalities"}  # protocols 1-3 share the folds' models
# each protocol's input: its option and its place in the real-data folder
INPUTS = {
    "parcels": ("--parcels", PARCELS_FILE),
    "pixels": ("--pixels", Path("temporalcnn")),
    "patches": ("--patches", Path("worldcereal-patches")),
    "cloudmasks": ("--cloudmasks", Path("cloudmask-reference")),
}
PIXEL_BANDS = ("NIR", "R", "G")


class Bench:
    """Settings shared by the protocols: seed, training options, progress bar."""

    def __init__(self, seed: int, epochs: int, patience: int, batch_size: int, progress: Progress) -> None:
        self.seed, self.progress = seed, progress
        self.options = TrainOptions(
            epochs=epochs, batch_size=batch_size, lr=1e-3, seed=seed, device="cpu", progress=False, patience=patience
        )
        # students learn under simulated gaps from a warm start: more epochs, more patience
        self.student_options = dataclasses.replace(self.options, epochs=epochs * 3 // 2, patience=2 * patience)

    def build(self, name: str, **config: object) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        return build_model(name, **config)

    def series_model(self, key: str, data: SeriesSet, channels: int, train, val) -> torch.nn.Module:
        """Train `SERIES_MODELS[key]` with soft IoU + cross-entropy (the loss of `tasks.train.train_model`)."""
        name, config = SERIES_MODELS[key]
        model = self.build(name, in_channels=channels, num_classes=len(data.classes), **config)
        return train_series(model, loss_on(IoULoss(ce_weight=0.5), model), train, val, data.classes, self.options)


def _summary(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "folds": [float(v) for v in values]}


def _metrics(m: dict) -> dict:
    return {"overall_accuracy": m["overall_accuracy"], "kappa": m["kappa"], "macro_f1": m["macro_f1"]}


def parcel_fold(
    bench: Bench, data: SeriesSet, train_idx: np.ndarray, test_idx: np.ndarray, fold: int, chosen: set[str]
) -> dict:
    """The models that the `chosen` protocols among 1-3 need, trained on one fold's training parcels and scored on
    its test parcels: every series model and the incomplete-series student for parcels and robustness, S1 and
    S2 + S1 series models for modalities, the label-only S2 + S1 model for robustness and modalities."""
    seed = bench.seed + fold
    fit_idx, val_idx = inner_split(data.labels, train_idx, VAL_FRACTION, seed)
    fit, val, test = data.subset(fit_idx), data.subset(val_idx), data.subset(test_idx)
    norms = Norms.of(fit, seed)
    channels = {"s2": len(data.bands), "s1": len(data.sar_bands), "s2+s1": len(data.bands) + len(data.sar_bands)}
    every_series = bool({"parcels", "robustness"} & chosen)
    modalities = ("s2", "s1", "s2+s1") if data.sar is not None and "modalities" in chosen else ("s2",)
    batches = {modality: [model_batch(part, norms, modality) for part in (fit, val, test)] for modality in modalities}
    results: dict = {"modalities": {}}

    def trained(modality: str, keys: Iterable[str]) -> dict[str, torch.nn.Module]:
        """The series models `keys` on `modality`, each scored on the test parcels into `results["modalities"]`."""
        fit_b, val_b, test_b = batches[modality]
        models = {}
        for key in keys:
            models[key] = bench.series_model(key, data, channels[modality], fit_b, val_b)
            results["modalities"][f"{key} {modality}"] = _metrics(score(models[key], test_b, data.classes))
        return models

    models = trained("s2", SERIES_MODELS if every_series else MODALITY_MODELS)
    forward = dict.fromkeys(models, "s2")
    teacher = frozen(models["ltae"], torch.device("cpu"))  # the fold's L-TAE is only scored from here on: no copy
    if every_series:
        fit_b, val_b, _ = batches["s2"]
        student = bench.build(
            "joint_reconstruction", in_channels=channels["s2"], num_classes=len(data.classes), backbone="ltae"
        )
        warm_start(student.student, teacher)
        loss = incomplete_loss(student, teacher, seed, GAP_RATE)
        models[INCOMPLETE] = train_series(student, loss, fit_b, val_b, data.classes, bench.student_options)
        forward[INCOMPLETE] = "s2"
    for modality in modalities[1:]:  # S1 and S2 + S1 for the modalities protocol
        trained(modality, MODALITY_MODELS)
    if data.sar is not None:
        fusion = bool({"robustness", "modalities"} & chosen)
        models |= modality_models(bench, data, fit, val, norms, teacher, seed, fusion)
        forward |= {MODALITY_KD: "pair", FUSION: "pair"}
    results["parcels"] = {
        key: _metrics(score(models[key], model_batch(test, norms, forward[key]), data.classes))
        for key in PARCEL_ROWS
        if key in models
    }
    for key in (MODALITY_KD, FUSION):
        if key in models:
            results["modalities"][key] = results["parcels"].get(key) or _metrics(
                score(models[key], model_batch(test, norms, "pair"), data.classes)
            )
    if "robustness" in chosen:
        results["robustness"] = robustness(bench, models, forward, test, norms, seed)
    return results


def modality_models(
    bench: Bench, data: SeriesSet, fit: SeriesSet, val: SeriesSet, norms: Norms, teacher, seed: int, fusion: bool
) -> dict:
    """The two-branch S2 + S1 model trained by modality-balancing distillation (`MODALITY_KD`): optical and SAR
    auxiliary students on the teacher's pseudo-labels, then the target (`tasks.distill` losses); with `fusion`
    also the same model trained with cross-entropy only (`FUSION`)."""
    fit_b, val_b = model_batch(fit, norms, "pair"), model_batch(val, norms, "pair")
    k = len(data.classes)
    sizes = {"in_channels": len(data.bands), "sar_channels": len(data.sar_bands), "num_classes": k}
    options = bench.student_options
    models = {}
    if fusion:
        model = bench.build("modality_distillation", **sizes)
        warm_start(model.optical, teacher)
        loss = loss_on(IoULoss(ce_weight=0.5), model)
        models[FUSION] = train_series(model, loss, fit_b, val_b, data.classes, options)
    optical = warm_start(bench.build("ltae", in_channels=len(data.bands), num_classes=k), teacher)
    loss = optical_student_loss(optical, teacher, seed, GAP_RATE, KD_THRESHOLD)
    optical = train_series(optical, loss, fit_b, val_b, data.classes, options, lambda m, b: m(*b[:3]))
    sar = bench.build("ltae", in_channels=len(data.sar_bands), num_classes=k)
    loss = sar_student_loss(sar, teacher, KD_THRESHOLD)
    sar = train_series(sar, loss, fit_b, val_b, data.classes, options, lambda m, b: m(*b[4:7]))
    target = bench.build("modality_distillation", **sizes)
    warm_start(target.optical, teacher)
    dev = torch.device("cpu")
    loss = modality_target_loss(target, teacher, frozen(optical, dev), frozen(sar, dev), seed, GAP_RATE)
    models[MODALITY_KD] = train_series(target, loss, fit_b, val_b, data.classes, options)
    return models


def robustness(bench: Bench, models: dict, forward: dict, test: SeriesSet, norms: Norms, seed: int) -> dict:
    """Macro-F1 per model, gap mode and missing fraction of the test parcels' observed optical dates (mean of
    `repeats` draws, seeds `seed + r`)."""
    valid = ~np.isnan(test.optical).any(axis=2)
    out: dict = {key: {mode: {} for mode in GAP_MODES} for key in ROBUSTNESS_ROWS if key in models}
    for mode in GAP_MODES:
        for fraction in FRACTIONS:
            hidden = [hide_observed_dates(valid, fraction, mode, seed + r) for r in range(2)]
            for key in out:
                f1 = [
                    score(models[key], model_batch(test, norms, forward[key], h), test.classes)["macro_f1"]
                    for h in hidden
                ]
                out[key][mode][str(fraction)] = float(np.mean(f1))
    return out


def _pooled(per_fold: list[dict], section: str) -> dict:
    """OA, kappa and macro-F1 of every model of `section`, summarised over the folds."""
    metrics = ("overall_accuracy", "kappa", "macro_f1")
    return {key: {m: _summary([f[section][key][m] for f in per_fold]) for m in metrics} for key in per_fold[0][section]}


def run_parcels(bench: Bench, data: SeriesSet, folds: int, chosen: set[str]) -> dict:
    """The `chosen` protocols among 1-3 over stratified folds; with parcels also one retraining of L-TAE on fold 0
    (reproducibility)."""
    splits = stratified_folds(data.labels, folds, bench.seed)
    job = bench.progress.add_task("parcel folds", total=len(splits))
    per_fold = []
    for k, (train_idx, test_idx) in enumerate(splits):
        t0 = time.monotonic()
        per_fold.append(parcel_fold(bench, data, train_idx, test_idx, k, chosen))
        bench.progress.advance(job)
        f1 = ", ".join(f"{key} {v['macro_f1']:.3f}" for key, v in per_fold[-1]["parcels"].items())
        bench.progress.console.log(f"fold {k + 1}/{len(splits)} ({time.monotonic() - t0:.0f} s): macro-F1 {f1}")
    out: dict = {}
    if "modalities" in chosen:
        out["modalities"] = _pooled(per_fold, "modalities")
    if "robustness" in chosen:
        rob = {
            key: {
                mode: {
                    fr: _summary([f["robustness"][key][mode][fr] for f in per_fold])
                    for fr in per_fold[0]["robustness"][key][mode]
                }
                for mode in GAP_MODES
            }
            for key in per_fold[0]["robustness"]
        }
        out["robustness"] = {"fractions": list(FRACTIONS), "modes": list(GAP_MODES), "repeats": 2, "macro_f1": rob}
    if "parcels" not in chosen:
        return out
    # reproducibility: L-TAE of fold 0 trained again with the same seed
    train_idx, test_idx = splits[0]
    fit_idx, val_idx = inner_split(data.labels, train_idx, VAL_FRACTION, bench.seed)
    norms = Norms.of(data.subset(fit_idx), bench.seed)
    again = bench.series_model(
        "ltae",
        data,
        len(data.bands),
        model_batch(data.subset(fit_idx), norms),
        model_batch(data.subset(val_idx), norms),
    )
    f1_again = score(again, model_batch(data.subset(test_idx), norms), data.classes)["macro_f1"]
    first = per_fold[0]["parcels"]["ltae"]["macro_f1"]
    return out | {
        "parcels": {
            "samples": len(data),
            "classes": data.classes,
            "class_counts": np.bincount(data.labels).tolist(),
            "bands": data.bands,
            "sar_bands": data.sar_bands,
            "dates": len(data.doy),
            "folds": folds,
            "notes": data.notes,
            "models": _pooled(per_fold, "parcels"),
        },
        "reproducibility": {
            "model": "ltae",
            "fold": 0,
            "macro_f1_first": first,
            "macro_f1_again": f1_again,
            "difference_points": 100 * abs(first - f1_again),
        },
    }


def run_pixels(bench: Bench, folder: Path, limit: int | None) -> dict:
    """Protocol 4: TempCNN pixels, fixed train/test split; validation = a stratified part of the training pixels."""
    class_map = folder / "class_map.txt"
    train = load_pixel_csv(folder / "train_dataset.csv", PIXEL_BANDS, class_map)
    test = load_pixel_csv(folder / "test_dataset.csv", PIXEL_BANDS, class_map)
    if train.classes != test.classes:
        raise CropflowError(f"{folder}: train and test hold different classes ({train.classes} / {test.classes}).")
    fit_idx, val_idx = inner_split(train.labels, np.arange(len(train)), VAL_FRACTION, bench.seed)
    if limit:
        fit_idx = fit_idx[:: max(1, len(fit_idx) // limit)]
    norms = Norms.of(train.subset(fit_idx), bench.seed)
    fit_b, val_b = model_batch(train.subset(fit_idx), norms), model_batch(train.subset(val_idx), norms)
    test_b = model_batch(test, norms)
    out = {
        "train_pixels": len(fit_idx),
        "val_pixels": len(val_idx),
        "test_pixels": len(test),
        "dates": len(test.doy),
        "classes": test.classes,
        "notes": train.notes,
        "models": {},
    }
    for key in ("random_forest", "tempcnn", "ltae"):
        model = bench.series_model(key, train, len(PIXEL_BANDS), fit_b, val_b)
        out["models"][key] = _metrics(score(model, test_b, test.classes))
    return out


def run_cloudmasks(folder: Path) -> dict:
    """Protocol 6: the spectral mask, with and without shadows, grown by 0-3 px, against each reference scene."""
    from tasks.cloudmask import mask_agreement, reference_classes, spectral_mask

    scenes = sorted(folder.glob("*.npz"))
    if not scenes:
        raise CropflowError(f"{folder} holds no *.npz reference scenes (img, msk).")
    out = {}
    for path in scenes:
        with np.load(path) as npz:
            img, ref = npz["img"], reference_classes(npz["msk"])
        out[path.stem] = {
            f"{'cloud+shadow' if shadows else 'cloud'} dilation {d}": mask_agreement(
                spectral_mask(img, shadows, d), ref
            )
            for shadows in (False, True)
            for d in (0, 1, 2, 3)
        }
    return out


def write_robustness_plot(rob: dict, out_png: Path) -> None:
    """Macro-F1 (mean over folds) against the missing fraction, one line per model, one panel per gap mode."""
    with png_figure(out_png, nrows=1, ncols=len(GAP_MODES), figsize=(11, 4), dpi=100, sharey=True) as (fig, axes):
        for ax, mode in zip(axes, GAP_MODES, strict=True):
            for key, modes in rob["macro_f1"].items():
                pts = sorted((100 * float(fr), s["mean"]) for fr, s in modes[mode].items())
                ax.plot(*zip(*pts, strict=True), marker="o", label=key)
            ax.set_title(f"{mode} missing dates")
            ax.set_xlabel("optical dates removed at test time (%)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("macro-F1 (mean over folds)")
        axes[-1].legend(fontsize=8)
        fig.tight_layout()


def _pm(s: dict, scale: float = 100.0) -> str:
    return f"{scale * s['mean']:.1f} ± {scale * s['std']:.1f}"


def targets(results: dict) -> list[str]:
    """The issue's targets, checked against the results: one line each, met or missed."""
    lines = []
    models = results.get("parcels", {}).get("models", {})
    if "random_forest" in models:
        f1 = {key: 100 * m["macro_f1"]["mean"] for key, m in models.items()}
        best = max((k for k in f1 if k != "random_forest"), key=f1.get)
        gain = f1[best] - f1["random_forest"]
        lines.append(
            f"- best deep model ({best}) macro-F1 {f1[best]:.1f} vs random forest {f1['random_forest']:.1f}: "
            f"{gain:+.1f} points (target +3): {'met' if gain >= 3 else 'missed'}"
        )
    rob = results.get("robustness", {}).get("macro_f1", {})
    if INCOMPLETE in rob and "ltae" in rob:
        for mode in GAP_MODES:

            def loss(key: str, mode: str = mode) -> float:
                return 100 * (rob[key][mode]["0.0"]["mean"] - rob[key][mode]["0.5"]["mean"])

            ours, base = loss(INCOMPLETE), loss("ltae")
            met = ours <= base / 2 if base > 0 else ours <= 0
            lines.append(
                f"- {mode} gaps, 50 % of the optical dates removed: {INCOMPLETE} loses {ours:.1f} macro-F1 points, "
                f"L-TAE without it {base:.1f} (target: at most half): {'met' if met else 'missed'}"
            )
    if "reproducibility" in results:
        diff = results["reproducibility"]["difference_points"]
        lines.append(
            f"- same command and seed: L-TAE fold 0 retrained {diff:.2f} points apart (target <= 0.5): "
            f"{'met' if diff <= 0.5 else 'missed'}"
        )
    return lines


def markdown(results: dict) -> str:
    """The results as markdown tables (percentages)."""
    lines = [f"# cropflow accuracy benchmark\n\n`{results['command']}`\n", f"{results['environment']}\n"]
    checks = targets(results)
    if checks:
        lines += ["## Targets of issue 7\n", *checks, ""]
    if "parcels" in results:
        p = results["parcels"]
        lines += [f"## 1. Parcels ({p['samples']} parcels, {len(p['classes'])} classes, {p['folds']}-fold CV)\n"]
        lines += [f"- {n}" for n in p["notes"]] + [""]
        metrics = ("overall_accuracy", "kappa", "macro_f1")
        rows = [[key, *(_pm(m[k]) for k in metrics)] for key, m in p["models"].items()]
        lines += markdown_table(["model", "OA %", "kappa %", "macro-F1 %"], rows)
        r = results["reproducibility"]
        lines.append(
            f"Reproducibility: L-TAE fold 0 retrained with the same seed: macro-F1 {100 * r['macro_f1_first']:.2f} "
            f"then {100 * r['macro_f1_again']:.2f} ({r['difference_points']:.2f} points apart).\n"
        )
    if "robustness" in results:
        rob = results["robustness"]
        lines.append("## 2. Missing optical dates at test time (macro-F1 %, mean ± std over folds)\n")
        for mode in rob["modes"]:
            rows = [
                [key, *(_pm(modes[mode][str(f)]) for f in rob["fractions"])] for key, modes in rob["macro_f1"].items()
            ]
            header = ["model", *(f"{100 * f:.0f} %" for f in rob["fractions"])]
            lines += [f"{mode} gaps:\n", *markdown_table(header, rows)]
    if "modalities" in results:
        lines.append("## 3. Optical vs SAR vs both (mean ± std over folds)\n")
        rows = [[key, _pm(m["macro_f1"]), _pm(m["overall_accuracy"])] for key, m in results["modalities"].items()]
        lines += markdown_table(["model", "macro-F1 %", "OA %"], rows)
    if "pixels" in results:
        px = results["pixels"]
        lines.append(
            f"## 4. TempCNN pixels ({px['train_pixels']} train, {px['val_pixels']} validation, "
            f"{px['test_pixels']} test pixels, {px['dates']} dates)\n"
        )
        rows = [
            [k, f"{100 * m['overall_accuracy']:.1f}", f"{100 * m['macro_f1']:.1f}"] for k, m in px["models"].items()
        ]
        lines += markdown_table(["model", "OA %", "macro-F1 %"], rows)
    if "patches" in results:
        lines.append(results["patches"]["markdown"])
    if "cloudmasks" in results:
        lines.append("## 6. Cloud masks against reference masks (Cohen's kappa; the source's bar: 0.60)\n")
        rows = [
            [scene, option, f"{m['kappa_3class']:.3f}", f"{m['kappa_invalid_valid']:.3f}"]
            for scene, options in results["cloudmasks"].items()
            for option, m in options.items()
        ]
        lines += markdown_table(["scene", "option", "kappa 3 classes", "kappa invalid/valid"], rows)
    lines.append(
        f"Run time {results['seconds'] / 60:.1f} min; load average (1, 5, 15 min) at the start "
        f"{results.get('load_start', '?')}, at the end {results['load_end']}.\n"
    )
    return "\n".join(lines)


def run_benchmark(
    *,
    data: Path | None,
    parcels: Path | None,
    mappings: Path | None,
    legend: str,
    patches: Path | None,
    pixels: Path | None,
    cloudmasks: Path | None,
    out: Path | None,
    protocols: list[str],
    folds: int,
    epochs: int,
    patience: int,
    min_parcels: int,
    seed: int,
    threads: int,
    quick: bool,
) -> None:
    """Accuracy of cropflow's models on real data (the `protocols` of the six, checked by the command); prints and
    writes tables, JSON and a PNG."""
    started = time.monotonic()
    chosen = set(protocols)
    series_protocols = SERIES_PROTOCOLS & chosen
    given = {"parcels": parcels, "pixels": pixels, "patches": patches, "cloudmasks": cloudmasks}
    needed = chosen | ({"parcels"} if series_protocols else set())
    root = data or real_data_dir()
    inputs = {key: _input(given[key], root, key) for key in INPUTS if key in needed}
    if "patches" in chosen:  # imported now: a module that changed on disk during a long run cannot break it later
        from flows.bench_patches import run_patches
    out = out or home_dir() / "bench" / "accuracy"
    out.mkdir(parents=True, exist_ok=True)  # a bad --out fails now, not after the run
    torch.set_num_threads(threads)
    if quick:
        folds, epochs, patience = 2, 2, 2
    results: dict = {
        "command": "cropflow bench accuracy " + " ".join(_argv()),
        "environment": f"torch {torch.__version__}, {threads} thread(s), {os.cpu_count()} CPUs, seed {seed}",
        "load_start": ", ".join(f"{v:.2f}" for v in os.getloadavg()),
        "settings": {"folds": folds, "epochs": epochs, "patience": patience, "legend": legend, "quick": quick},
    }
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    with progress:
        bench = Bench(seed, epochs, patience, 32, progress)
        if series_protocols:
            parcels_file = inputs["parcels"]
            series = load_parcels(
                parcels_file, mappings or parcels_file.parent / MAPPINGS_FILE.name, legend, min_parcels
            )
            if quick:
                series = series.subset(_quick_subset(series, 60, seed))
            results |= run_parcels(bench, series, folds, series_protocols)
        if "pixels" in chosen:
            results["pixels"] = run_pixels(bench, inputs["pixels"], 60 if quick else None)
        if "patches" in chosen:
            results["patches"] = run_patches(inputs["patches"], quick, seed, patience, progress)
        if "cloudmasks" in chosen:
            results["cloudmasks"] = run_cloudmasks(inputs["cloudmasks"])
    results["seconds"] = time.monotonic() - started
    results["load_end"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    if "robustness" in results:
        write_robustness_plot(results["robustness"], out / "robustness.png")
    text = markdown(results)
    with atomic_path(out / "accuracy.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    with atomic_path(out / "accuracy.md") as tmp:
        tmp.write_text(text)
    console.print(text, highlight=False, markup=False)


def _argv() -> list[str]:
    args = sys.argv[1:]
    return args[args.index("accuracy") + 1 :] if "accuracy" in args else args


def _input(given: Path | None, root: Path | None, key: str) -> Path:
    """The input of protocol `key`: its option's path, else its place in the real-data folder `root`; refused
    (before any work) when that does not exist."""
    option, default = INPUTS[key]
    path = given or (root / default if root else None)
    if path is None:
        raise CropflowError(f"{option}: no input; give {option} or the real-data folder (--data DIR).")
    if not path.exists():
        where = f"{option} {path}" if given else f"{default} under --data {root}"
        raise CropflowError(f"{where} not found; give {option} or the real-data folder (--data DIR).")
    return path


def _quick_subset(data: SeriesSet, n: int, seed: int) -> np.ndarray:
    """About `n` samples keeping every class (at least 4 each when it has them), stratified."""
    rng = np.random.default_rng(seed)
    share = n / len(data)
    keep = [
        rng.permutation(np.flatnonzero(data.labels == c))[: max(4, round(share * np.sum(data.labels == c)))]
        for c in range(len(data.classes))
    ]
    return np.sort(np.concatenate(keep))
