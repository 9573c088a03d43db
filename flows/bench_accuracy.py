"""`cropflow bench accuracy`: the command. The six protocols are in `flows/accuracy_protocols.py`, imported only when
the benchmark runs (they load torch and the models, which every other `cropflow` command can do without)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.params import listed
from infra.errors import CropflowError

PROTOCOLS = ("parcels", "robustness", "modalities", "pixels", "patches", "cloudmasks")
LEGEND = "CROPTYPE_INSEASON_FRANCE"


def bench_accuracy(
    data: Annotated[
        Path | None,
        typer.Option(help="real-data folder: the default of each input below (CROPFLOW_REAL_DATA or ../shared/data)"),
    ] = None,
    parcels: Annotated[
        Path | None, typer.Option(help="long-format parcel parquet (default: the French LPIS parcels)")
    ] = None,
    mappings: Annotated[Path | None, typer.Option(help="class_mappings.json (default: beside the parcels)")] = None,
    legend: Annotated[str, typer.Option(help="legend of the class mappings")] = LEGEND,
    patches: Annotated[
        Path | None, typer.Option(help="folder of WorldCereal patches (default: DATA/worldcereal-patches)")
    ] = None,
    pixels: Annotated[
        Path | None,
        typer.Option(help="folder of TempCNN-layout train_dataset.csv, test_dataset.csv (DATA/temporalcnn)"),
    ] = None,
    cloudmasks: Annotated[
        Path | None, typer.Option(help="folder of reference *.npz scenes (default: DATA/cloudmask-reference)")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="folder of accuracy.json, accuracy.md, robustness.png (CROPFLOW_HOME/bench/accuracy)"),
    ] = None,
    protocols: Annotated[str, typer.Option(help=f"comma-separated: {', '.join(PROTOCOLS)}")] = ",".join(PROTOCOLS),
    folds: Annotated[int, typer.Option(help="cross-validation folds of the parcels")] = 5,
    epochs: Annotated[int, typer.Option(help="maximum epochs of every deep model")] = 40,
    patience: Annotated[int, typer.Option(help="epochs without a better validation macro-F1 before stopping")] = 10,
    min_parcels: Annotated[int, typer.Option(help="classes with fewer parcels are merged into 'other'")] = 5,
    seed: Annotated[int, typer.Option(help="seed of folds, initialisations and simulated gaps")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads (1 is fastest for these small models)")] = 1,
    quick: Annotated[
        bool, typer.Option(help="a subset for the smoke test: about 60 parcels, 2 folds, 2 epochs")
    ] = False,
) -> None:
    """Accuracy of cropflow's models on real data (six protocols); prints and writes tables, JSON and a PNG."""
    chosen = listed(protocols)
    unknown = sorted(set(chosen) - set(PROTOCOLS))
    if unknown:
        raise CropflowError(f"--protocols: unknown {unknown}; valid: {', '.join(PROTOCOLS)}.")
    from flows.accuracy_protocols import run_benchmark  # here: torch and the models load only for this command

    run_benchmark(
        data=data,
        parcels=parcels,
        mappings=mappings,
        legend=legend,
        patches=patches,
        pixels=pixels,
        cloudmasks=cloudmasks,
        out=out,
        protocols=chosen,
        folds=folds,
        epochs=epochs,
        patience=patience,
        min_parcels=min_parcels,
        seed=seed,
        threads=threads,
        quick=quick,
    )
