"""The Kubernetes side without a cluster: the training launcher's settings (pipelines/launchers.py)
and the deploy/k8s configuration against dagster-k8s's own schemas, and a k8s training launch
through dagster-k8s's PipesK8sClient with only the Kubernetes API (CoreV1Api) faked: a fake
kubelet runs the pod's container locally from the pod body the client submitted."""

import copy
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import polars as pl
import pytest
import yaml
from dagster._config import process_config

from assets.resources import WarehouseResource
from assets.training import mamba_model
from ml.walkforward import Fold
from pipelines.launchers import TrainingLauncher, TrainingLauncherError
from pipelines.pipes import WholeLineTempFileMessageReader
from warehouse import DataPaths, Lake

kubernetes = pytest.importorskip("kubernetes", reason="dagster-k8s is not installed (.[deploy])")
dagster_k8s = pytest.importorskip("dagster_k8s")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
FOLD = Fold(
    "2021",
    datetime(2016, 1, 1),
    datetime(2020, 1, 1),
    datetime(2021, 1, 1),
    datetime(2022, 1, 1),
    timedelta(days=5),
)


def _yaml(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def _training_config() -> dict:
    return _yaml("pipes_training.yaml")["resources"]["training_launcher"]["config"]


def test_the_default_launcher_is_the_pipes_subprocess_with_the_whole_line_reader():
    from pipelines.definitions import defs

    launcher = defs.resources["training_launcher"]
    assert isinstance(launcher, TrainingLauncher) and launcher.kind == "subprocess"
    assert launcher.problems() == []
    assert launcher.training_command() == [sys.executable, "-m", "pipelines.train_sequences"]
    client = launcher.subprocess_client()
    assert isinstance(client, dg.PipesSubprocessClient)
    assert isinstance(client.message_reader, WholeLineTempFileMessageReader)


def test_the_deploy_config_builds_a_pipes_k8s_client_and_the_pod_spec():
    launcher = TrainingLauncher(**_training_config())
    assert launcher.problems() == []
    client = launcher.k8s_client()
    assert isinstance(client, dagster_k8s.PipesK8sClient)
    assert client.load_incluster_config is True and client.kubeconfig_file is None
    assert isinstance(client.message_reader, dagster_k8s.PipesK8sPodLogsMessageReader)
    assert launcher.image == "registry.example.com/mambacast:1.0"
    assert launcher.namespace == "mambacast"
    assert launcher.training_command() == ["python", "-m", "pipelines.train_sequences"]
    spec = launcher.pod_spec()
    # camelCase keys of the YAML arrive as the snake_case dagster-k8s builds the pod from
    assert spec["service_account_name"] == "mambacast-training"
    assert spec["node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    (container,) = spec["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1", "memory": "16Gi"}
    assert container["volume_mounts"] == [{"name": "mambacast-data", "mount_path": "/data"}]
    assert spec["volumes"] == [
        {"name": "mambacast-data", "persistent_volume_claim": {"claim_name": "mambacast-data"}}
    ]
    assert "env_from" not in container  # the training needs no Secret
    # the resource's input is not changed by building a pod from it
    assert launcher.base_pod_spec == _training_config()["base_pod_spec"]


@pytest.mark.parametrize(
    ("change", "field", "fix"),
    [
        ({"image": ""}, "training_launcher.image is required", "set it to an image"),
        ({"namespace": "Mamba_Cast"}, "training_launcher.namespace='Mamba_Cast'", "lowercase"),
        ({"namespace": "x" * 64}, "training_launcher.namespace=", "at most 63"),
        ({"kind": "docker"}, "training_launcher.kind='docker'", "use 'subprocess'"),
        ({"env_secrets": ["FRED key"]}, "training_launcher.env_secrets", "not a Secret name"),
        ({"data_dir": "data"}, "training_launcher.data_dir must be the absolute", "/data"),
        ({"resources": {"limit": {}}}, "training_launcher.resources has ['limit']", "'limits'"),
        (
            {"kubeconfig_file": "~/.kube/config"},
            "training_launcher.load_incluster_config=true",
            "remove kubeconfig_file",
        ),
        (
            {"base_pod_spec": {"restartPolicy": "Always"}},
            "restartPolicy=Always",
            "leave it out",
        ),
    ],
)
def test_a_bad_launcher_config_fails_naming_the_field_and_the_fix(change, field, fix):
    launcher = TrainingLauncher(**{**_training_config(), **change})
    with pytest.raises(TrainingLauncherError) as err:
        launcher.check()
    assert field in str(err.value) and fix in str(err.value)
    with pytest.raises(TrainingLauncherError):
        launcher.k8s_client()  # no client is built from it either


def test_a_k8s_setting_with_the_subprocess_kind_is_refused():
    launcher = TrainingLauncher(image="registry.example.com/mambacast:1.0")
    assert launcher.problems() == [
        "training_launcher.image is a k8s setting, but kind='subprocess' ignores it: set "
        "kind: k8s, or remove it"
    ]


def _dataset(root: Path) -> None:
    """The training dataset's meta, as the launch reads it to check the fold before launching."""
    rows = pl.DataFrame({"symbol": ["BTC-USD"], "ts": [datetime(2021, 6, 1)], "x": [1.0]})
    Lake(DataPaths.at(root).lake).write_snapshot(
        "training_dataset", rows, time_column="ts", version="v1", meta={"folds": [FOLD.to_json()]}
    )


def test_a_bad_launcher_config_fails_the_step_before_anything_starts(tmp_path):
    _dataset(tmp_path / "data")
    result = dg.materialize(
        [mamba_model],
        partition_key=FOLD.key,
        resources={
            "warehouse": WarehouseResource(data_dir=str(tmp_path / "data")),
            "training_launcher": TrainingLauncher(kind="k8s", namespace="mambacast"),
        },
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_failure]
    text = str(failure.event_specific_data.error)
    assert "training_launcher.image is required" in text, text


def test_the_executor_yaml_validates_against_the_k8s_job_executor_schema():
    config = _yaml("executor.yaml")["execution"]["config"]
    schema = dagster_k8s.k8s_job_executor.config_schema.config_type
    result = process_config(schema, config)
    assert result.success, [e.message for e in result.errors]
    assert result.value["job_namespace"] == "mambacast"
    assert result.value["env_secrets"] == ["mambacast-secrets"]
    limits = result.value["step_k8s_config"]["container_config"]["resources"]["limits"]
    assert limits == {"cpu": "2", "memory": "4Gi"}
    # the schema is strict: a misspelt key is an error, so the check above can fail
    typo = {**config, "job_namspace": config["job_namespace"]}
    bad = process_config(schema, typo)
    assert not bad.success and "job_namspace" in bad.errors[0].message


def test_the_run_launcher_yaml_validates_against_the_k8s_run_launcher_schema():
    config = _yaml("run_launcher.yaml")["run_launcher"]
    assert (config["module"], config["class"]) == ("dagster_k8s", "K8sRunLauncher")
    result = process_config(dagster_k8s.K8sRunLauncher.config_type(), config["config"])
    assert result.success, [e.message for e in result.errors]


def test_the_k8s_code_location_accepts_the_deploy_run_config_and_the_refresh_runs():
    from pipelines.definitions import IN_PROCESS
    from pipelines.k8s_definitions import defs

    run_config = {**_yaml("executor.yaml"), **_yaml("pipes_training.yaml")}
    job = defs.resolve_job_def("retrain_job")
    assert job.executor_def.name == "mambacast_k8s_executor"
    executor = dg.validate_run_config(job, run_config)["execution"]["mambacast_k8s_executor"]
    assert executor["max_concurrent"] == 3 and not executor["in_process"]
    # the refresh schedule's runs ask for in_process, as on the local executor
    refresh = defs.resolve_job_def("daily_refresh_job")
    executor = dg.validate_run_config(refresh, IN_PROCESS)["execution"]["mambacast_k8s_executor"]
    assert executor["in_process"]
    with pytest.raises(dg.DagsterInvalidConfigError, match="job_namspace"):
        dg.validate_run_config(job, {"execution": {"config": {"job_namspace": "x"}}})


def test_the_k8s_executor_delegates_steps_to_k8s_jobs_or_runs_them_in_process(tmp_path):
    from dagster._core.definitions.job_base import InMemoryJob
    from dagster._core.executor.in_process import InProcessExecutor
    from dagster._core.executor.step_delegating import StepDelegatingExecutor

    from pipelines.k8s_definitions import defs, mambacast_k8s_executor

    job = defs.resolve_job_def("retrain_job")
    kubeconfig = str(_kubeconfig(tmp_path / "kubeconfig"))
    with dg.DagsterInstance.ephemeral() as instance:

        def executor(run_config: dict):
            config = dg.validate_run_config(job, {"execution": {"config": run_config}})
            context = dg.InitExecutorContext(
                job=InMemoryJob(job),
                executor_def=mambacast_k8s_executor,
                executor_config=config["execution"]["mambacast_k8s_executor"],
                instance=instance,
            )
            return mambacast_k8s_executor.executor_creation_fn(context)

        k8s_config = {
            **_yaml("executor.yaml")["execution"]["config"],
            "load_incluster_config": False,
            "kubeconfig_file": kubeconfig,
        }
        steps = executor(k8s_config)
        assert isinstance(steps, StepDelegatingExecutor)
        assert steps._step_handler.name == "K8sStepHandler"
        assert isinstance(executor({"in_process": True}), InProcessExecutor)


def test_loading_the_definitions_does_not_import_dagster_k8s():
    code = (
        "import json, sys; import pipelines.definitions; "
        "print(json.dumps([m for m in ('dagster_k8s', 'kubernetes') if m in sys.modules]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


# ---- a launch against a fake Kubernetes API --------------------------------------------------

# What the pod's container runs in the test instead of the training (the image's command is
# configurable: `command`): a Pipes process that reports what reached it.
STAND_IN = """
import os
from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as pipes:
    pipes.log.info("training in the pod")
    pipes.report_asset_materialization(
        metadata={
            "extras": {"raw_value": dict(pipes.extras), "type": "json"},
            "token_from_secret": os.environ.get("TRAINING_TOKEN", "missing"),
            "threads": os.environ.get("OMP_NUM_THREADS", "missing"),
        }
    )
"""


class FakeCoreV1Api:
    """The part of kubernetes.client.CoreV1Api that PipesK8sClient calls. Creating a pod runs
    its first container's command here, with the environment the pod body gives it (values, and
    Secrets through envFrom from `secrets`), and keeps its output as the pod's log."""

    def __init__(self, secrets: dict[str, dict[str, str]]):
        self.secrets = secrets
        self.created: list = []
        self.deleted: list[tuple[str, str]] = []
        self.logs: list[str] = []
        self.exit_code: int | None = None

    def create_namespaced_pod(self, namespace, body):
        self.created.append((namespace, body))
        container = body.spec.containers[0]
        env = {"PATH": os.environ["PATH"]}
        for source in container.env_from or []:
            env.update(self.secrets[source.secret_ref.name])
        env.update({e.name: e.value for e in container.env or []})
        proc = subprocess.run(
            container.command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
        self.exit_code, self.logs = proc.returncode, proc.stdout.splitlines()

    def list_namespaced_pod(self, namespace, field_selector=None, **_):
        name = self.created[-1][1].metadata.name
        assert field_selector == f"metadata.name={name}"
        status = SimpleNamespace(
            name=self.created[-1][1].spec.containers[0].name,
            ready=False,
            state=SimpleNamespace(
                running=None,
                waiting=None,
                terminated=SimpleNamespace(exit_code=self.exit_code, message=None),
            ),
        )
        pod = SimpleNamespace(
            metadata=SimpleNamespace(name=name),
            status=SimpleNamespace(init_container_statuses=None, container_statuses=[status]),
        )
        return SimpleNamespace(items=[pod])

    def read_namespaced_pod_log(self, name, namespace, **_):
        start = datetime(2026, 1, 1)
        return [
            f"{start + timedelta(microseconds=i):%Y-%m-%dT%H:%M:%S.%fZ} {line}\n".encode()
            for i, line in enumerate(self.logs)
        ]

    def delete_namespaced_pod(self, name, namespace, **_):
        self.deleted.append((name, namespace))


def _kubeconfig(path: Path) -> Path:
    """A kubeconfig for a cluster that is never contacted (the API is faked)."""
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "not-a-real-token"}}],
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "ctx",
            }
        )
    )
    return path


def test_a_k8s_launch_submits_the_pod_and_reads_the_pipes_messages_from_its_logs(
    tmp_path, monkeypatch
):
    root = tmp_path / "data"
    _dataset(root)
    api = FakeCoreV1Api({"mambacast-training": {"TRAINING_TOKEN": "from-the-secret"}})
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda *a, **k: api)
    config = copy.deepcopy(_training_config())
    config.update(
        command=[sys.executable, "-c", STAND_IN],
        env_secrets=["mambacast-training"],
        load_incluster_config=False,
        kubeconfig_file=str(_kubeconfig(tmp_path / "kubeconfig")),
        poll_interval_s=0.05,
    )
    result = dg.materialize(
        [mamba_model],
        partition_key=FOLD.key,
        resources={
            "warehouse": WarehouseResource(data_dir=str(root)),
            "training_launcher": TrainingLauncher(**config),
        },
        run_config={"ops": {"mamba_model": {"config": {"seeds": [7], "epochs": 2}}}},
    )
    assert result.success
    # the pod the client submitted: namespace, image, command, resources, volume, Secret
    ((namespace, pod),) = api.created
    assert namespace == "mambacast" and pod.metadata.name.startswith("dagster-")
    spec = pod.spec
    assert spec.restart_policy == "Never" and spec.service_account_name == "mambacast-training"
    assert spec.node_selector == {"nvidia.com/gpu.present": "true"}
    assert spec.volumes[0].persistent_volume_claim.claim_name == "mambacast-data"
    (container,) = spec.containers
    assert container.image == "registry.example.com/mambacast:1.0"
    assert container.command == config["command"]
    assert container.resources.limits == {"nvidia.com/gpu": "1", "memory": "16Gi"}
    assert container.volume_mounts[0].mount_path == "/data"
    assert [s.secret_ref.name for s in container.env_from] == ["mambacast-training"]
    env = {e.name: e.value for e in container.env}
    assert env["OMP_NUM_THREADS"] == "4"
    assert {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"} <= set(env)
    assert api.deleted == [(pod.metadata.name, "mambacast")]  # deleted after it finished
    assert api.exit_code == 0, api.logs
    # what the pod reported came back through its logs
    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    extras = metadata["extras"].value
    assert extras["data_dir"] == "/data"  # the pod's mount, not the run worker's path
    assert extras["folds"] == [FOLD.key] and extras["models"] == ["mamba2"]
    assert extras["seeds"] == [7] and extras["epochs"] == 2
    assert metadata["token_from_secret"].value == "from-the-secret"
    assert metadata["threads"].value == "4"
