"""Compute specs in infra/: the Dask cluster choice, the Kubernetes and HPC specs, the GPU work pool, Dockerfiles."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from importlib.resources import files
from pathlib import Path

import pytest
import yaml

from infra import dask_cluster
from infra.dask_cluster import DaskSettings, cluster_kwargs, kubernetes_spec, task_runner
from infra.errors import CropflowError
from infra.settings import REPO_ROOT

K8S_VERSION = "1.33"  # the oldest Kubernetes the specs must fit


def test_cluster_choice_from_env(monkeypatch):
    monkeypatch.delenv("CROPFLOW_DASK", raising=False)
    assert DaskSettings.from_env() == DaskSettings("local")
    assert DaskSettings.configured() is None  # tiled inference then runs in one process
    monkeypatch.setenv("CROPFLOW_DASK", "tcp://10.0.0.5:8786")
    monkeypatch.setenv("CROPFLOW_DASK_WORKERS", "8")
    settings = DaskSettings.from_env()
    assert (settings.address, settings.workers) == ("tcp://10.0.0.5:8786", 8)
    assert DaskSettings.configured() == settings
    assert task_runner(settings).address == "tcp://10.0.0.5:8786"
    monkeypatch.setenv("CROPFLOW_DASK", "yarn")
    with pytest.raises(CropflowError, match=r"CROPFLOW_DASK='yarn'.*local, kubernetes, slurm, pbs"):
        DaskSettings.from_env()
    monkeypatch.setenv("CROPFLOW_DASK", "slurm")
    monkeypatch.setenv("CROPFLOW_DASK_WORKERS", "0")
    with pytest.raises(CropflowError, match="CROPFLOW_DASK_WORKERS='0' must be a positive"):
        DaskSettings.from_env()


def test_local_cluster_runs_prefect_tasks_in_worker_processes(prefect_server):
    """The default: a LocalCluster on 127.0.0.1 whose worker processes run the tasks of a real flow run."""
    from distributed import LocalCluster
    from prefect import flow, task

    runner = task_runner(DaskSettings("local", workers=2, threads=1))
    assert runner.cluster_class is LocalCluster
    assert runner.cluster_kwargs == {
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
        "n_workers": 2,
        "threads_per_worker": 1,
    }

    @task
    def where(i: int) -> tuple[int, int]:
        return i * i, os.getpid()

    @flow(task_runner=runner)
    def squares() -> list[tuple[int, int]]:
        return [f.result() for f in where.map(range(6))]

    results = squares()
    assert [r for r, _ in results] == [i * i for i in range(6)]
    assert os.getpid() not in {pid for _, pid in results}, "tasks must run in the Dask worker processes"


HPC_DIRECTIVES = {
    "slurm": ["#SBATCH -t 04:00:00", "#SBATCH --hint=nomultithread"],
    "pbs": ["#PBS -l select=1:ncpus=8:mem=32GB", "#PBS -l walltime=04:00:00"],
}


@pytest.mark.parametrize(("kind", "directives"), HPC_DIRECTIVES.items())
def test_hpc_job_scripts_render(kind: str, directives: list[str]):
    """dask-jobqueue renders the batch script of cropflow's worker jobs from infra/hpc/jobqueue.yaml."""
    cls, kwargs = cluster_kwargs(DaskSettings(kind, workers=4))
    assert cls.__name__ == f"{kind.upper()}Cluster" and kwargs == {"config_name": kind, "n_workers": 4}
    local = {"n_workers": 0, "scheduler_options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    with cls(**{**kwargs, **local}) as cluster:
        script = cluster.job_script()
    for line in directives:
        assert line in script
    assert "--nworkers 2" in script and "--nthreads 4" in script and "--memory-limit 16.00GiB" in script
    assert "export DO_NOT_TRACK=1" in script


def _dask_cluster_schema() -> dict:
    """The DaskCluster schema of the dask-kubernetes operator's CRD, its pod and service specs resolved to the
    strict Kubernetes schemas that kubernetes-validate ships (unknown fields are errors)."""
    crd = files("dask_kubernetes.operator") / "customresources" / "templates.yaml"
    text = crd.read_text().replace(
        "python://dask_kubernetes/operator/customresources/templates.yaml#/definitions/", "#/definitions/"
    )
    text = text.replace(
        "python://k8s_crd_resolver/schemata/k8s-1.21.1.json#/definitions/",
        "https://kubernetes.io/api/_definitions.json#/$defs/",
    )
    definitions = yaml.safe_load(text)["definitions"]
    return {"$ref": "#/definitions/dask.k8s.api.v1.DaskCluster", "definitions": definitions}


def _validate_dask_cluster(manifest: dict) -> None:
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource

    version = next(v for v in reversed(kubernetes_validate.utils.all_versions()) if v.startswith(K8S_VERSION))
    k8s = json.loads(
        (files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict" / "_definitions.json")
        .read_text()
    )  # fmt: skip
    registry = Resource.from_contents(k8s) @ Registry()
    jsonschema.Draft202012Validator(_dask_cluster_schema(), registry=registry).validate(manifest)


def test_kubernetes_dask_cluster_spec_is_valid():
    import jsonschema

    manifest = kubernetes_spec(workers=6)
    assert (manifest["apiVersion"], manifest["kind"]) == ("kubernetes.dask.org/v1", "DaskCluster")
    assert manifest["spec"]["worker"]["replicas"] == 6
    _validate_dask_cluster(manifest)
    cls, kwargs = cluster_kwargs(DaskSettings("kubernetes", workers=6))
    assert cls.__name__ == "KubeCluster" and kwargs == {"custom_cluster_spec": manifest}

    broken = kubernetes_spec()
    broken["spec"]["worker"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolice"):
        _validate_dask_cluster(broken)


def test_gpu_work_pool_job_renders_with_prefect():
    """The base job template renders like the Prefect Kubernetes worker renders it, into a valid GPU Job."""
    import kubernetes_validate
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((REPO_ROOT / "infra" / "k8s" / "gpu-work-pool.json").read_text())
    values = {"gpu_count": 2, "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}, "namespace": "crops"}

    async def render() -> KubernetesWorkerJobConfiguration:
        # the client resolves block and variable references; the template has none, so it is never contacted
        async with PrefectClient(api="http://127.0.0.1:9/api") as client:
            return await KubernetesWorkerJobConfiguration.from_template_and_values(template, values, client=client)

    config = asyncio.run(render())
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="crop-map-run", flow_id=uuid.uuid4()))
    job = config.job_manifest
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 2 == resources["requests"]["nvidia.com/gpu"]
    assert container["image"] == "cropflow:gpu" and job["metadata"]["namespace"] == "crops"
    assert pod["nodeSelector"] == values["node_selector"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["envFrom"] == [{"secretRef": {"name": "cropflow-object-store", "optional": True}}]
    assert container["args"] == ["prefect", "flow-run", "execute"]


def test_dockerfiles_pass_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    dockerfiles = sorted((REPO_ROOT / "infra" / "docker").glob("Dockerfile.*"))
    assert [p.name for p in dockerfiles] == ["Dockerfile.cpu", "Dockerfile.gpu"]
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", "--no-color", *map(str, dockerfiles)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_specs_hold_no_credentials():
    specs = [p for folder in ("k8s", "hpc", "docker") for p in (REPO_ROOT / "infra" / folder).iterdir()]
    assert dask_cluster.KUBERNETES_SPEC in specs and dask_cluster.JOBQUEUE_SPEC in specs
    for path in specs:
        text = path.read_text()
        for secret in ("AWS_SECRET_ACCESS_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "password:", "token:"):
            assert secret not in text, (path, secret)
