"""The Dask cluster cropflow computes on, chosen by the environment, run through prefect-dask's `DaskTaskRunner`.

`CROPFLOW_DASK` picks it:
- `local` (default): a `distributed.LocalCluster` on this machine, bound to 127.0.0.1;
- `tcp://host:8786` (any scheduler address, `tls://` too): an existing cluster;
- `kubernetes`: dask-kubernetes' operator `KubeCluster` with the spec `infra/k8s/dask-cluster.yaml` (`cropflow[k8s]`);
- `slurm` / `pbs`: dask-jobqueue's `SLURMCluster` / `PBSCluster` with `infra/hpc/jobqueue.yaml` (`cropflow[hpc]`),
  whose settings dask's own environment variables override (e.g. `DASK_JOBQUEUE__SLURM__QUEUE=compute`).

`CROPFLOW_DASK_WORKERS` sets the number of workers (default: distributed's choice locally, the spec's elsewhere),
`CROPFLOW_DASK_THREADS` the threads per local worker. The optional packages are imported only when chosen.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.config
import yaml
from prefect_dask import DaskTaskRunner

from infra.errors import CropflowError

KUBERNETES_SPEC = Path(__file__).with_name("k8s") / "dask-cluster.yaml"
JOBQUEUE_SPEC = Path(__file__).with_name("hpc") / "jobqueue.yaml"
KINDS = ("local", "kubernetes", "slurm", "pbs")
ADDRESS_SCHEMES = ("tcp://", "tls://", "inproc://", "ucx://", "ws://", "wss://")


@dataclass(frozen=True)
class DaskSettings:
    """Which cluster (a kind of `KINDS` or a scheduler address) and how many workers and threads per worker."""

    cluster: str = "local"
    workers: int | None = None
    threads: int | None = None

    @classmethod
    def from_env(cls) -> DaskSettings:
        """`CROPFLOW_DASK`, `CROPFLOW_DASK_WORKERS`, `CROPFLOW_DASK_THREADS`, checked."""
        cluster = os.environ.get("CROPFLOW_DASK", "local").strip() or "local"
        if cluster not in KINDS and not cluster.startswith(ADDRESS_SCHEMES):
            raise CropflowError(
                f"CROPFLOW_DASK={cluster!r} is neither a cluster kind ({', '.join(KINDS)}) nor a scheduler "
                "address such as tcp://10.0.0.5:8786."
            )
        return cls(cluster, _count("CROPFLOW_DASK_WORKERS"), _count("CROPFLOW_DASK_THREADS"))

    @classmethod
    def configured(cls) -> DaskSettings | None:
        """`from_env()` when `CROPFLOW_DASK` is set, else None: for steps that use a cluster only when asked to
        (tiled inference, which otherwise runs in one process, on the GPU when there is one)."""
        return cls.from_env() if os.environ.get("CROPFLOW_DASK", "").strip() else None

    @property
    def address(self) -> str | None:
        """The scheduler address when the cluster already runs elsewhere."""
        return None if self.cluster in KINDS else self.cluster


def _count(name: str) -> int | None:
    raw = os.environ.get(name)
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise CropflowError(f"{name}={raw!r} must be a positive whole number.")
    return int(raw)


def _optional(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CropflowError(
            f"CROPFLOW_DASK needs the Python package {module.split('.')[0]}; install cropflow[{extra}]."
        ) from None


def kubernetes_spec(workers: int | None = None) -> dict:
    """The DaskCluster manifest of `infra/k8s/dask-cluster.yaml`, with `workers` replicas when given."""
    spec = yaml.safe_load(KUBERNETES_SPEC.read_text())
    if workers:
        spec["spec"]["worker"]["replicas"] = workers
    return spec


def _prefect_api_env() -> dict:
    """Inside a flow run, the worker environment that points local workers at the flow's Prefect API (also the
    temporary server a flow starts when none is configured, which workers would not find on their own)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.client is None:
        return {}
    return {"env": {"PREFECT_API_URL": str(context.client.api_url)}}


def cluster_kwargs(settings: DaskSettings) -> tuple[type, dict]:
    """The cluster class of `settings` and its keyword arguments, as `DaskTaskRunner(cluster_class=, cluster_kwargs=)`
    takes them (not for a scheduler address: `DaskTaskRunner(address=)`)."""
    workers = {"n_workers": settings.workers} if settings.workers else {}
    if settings.cluster == "local":
        from distributed import LocalCluster

        threads = {"threads_per_worker": settings.threads} if settings.threads else {}
        local = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", **workers, **threads}
        return LocalCluster, local | _prefect_api_env()
    if settings.cluster == "kubernetes":
        operator = _optional("dask_kubernetes.operator", "k8s")
        return operator.KubeCluster, {"custom_cluster_spec": kubernetes_spec(settings.workers)}
    if settings.cluster in ("slurm", "pbs"):
        jobqueue = _optional("dask_jobqueue", "hpc")  # imported first: its defaults, then cropflow's over them
        dask.config.update_defaults(yaml.safe_load(JOBQUEUE_SPEC.read_text()))
        cls = jobqueue.SLURMCluster if settings.cluster == "slurm" else jobqueue.PBSCluster
        return cls, {"config_name": settings.cluster, **workers}
    raise CropflowError(f"no cluster class for {settings.cluster!r}; it is a scheduler address.")


def task_runner(settings: DaskSettings | None = None) -> DaskTaskRunner:
    """A `DaskTaskRunner` on the cluster of `settings` (default: from the environment)."""
    settings = settings or DaskSettings.from_env()
    if settings.address:
        return DaskTaskRunner(address=settings.address)
    cls, kwargs = cluster_kwargs(settings)
    return DaskTaskRunner(cluster_class=cls, cluster_kwargs=kwargs)
