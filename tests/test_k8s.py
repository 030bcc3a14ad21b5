"""The Kubernetes side without a cluster: the training launcher's settings (pipelines/launchers.py)
and the deploy/k8s configuration against dagster-k8s's own schemas, and a k8s training launch
through dagster-k8s's PipesK8sClient with only the Kubernetes API (CoreV1Api) faked: a fake
kubelet runs the pod's container locally from the pod body the client submitted; and the run
worker and step Jobs that K8sRunLauncher and the k8s executor build from the deploy config, with
BatchV1Api faked."""

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
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
IMAGE = "registry.example.com/mambacast:1.0"
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

    launcher = defs().resources["training_launcher"]
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
    assert spec["automount_service_account_token"] is False  # nor API credentials
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
        ({"data_dir": "data"}, "training_launcher.data_dir='data' must be the absolute", "/data"),
        ({"data_dir": ""}, "training_launcher.data_dir='' must be the absolute", "/data"),
        ({"data_dir": "//"}, "training_launcher.data_dir='//' must be the absolute", "not '/'"),
        (
            {"env": {"FRED_API_KEY": "x"}},
            "training_launcher.env.FRED_API_KEY looks like a secret",
            "list the Secret in env_secrets",
        ),
        (
            {"env": {"db_Password": "x"}},
            "training_launcher.env.db_Password looks like a secret",
            "env_secrets",
        ),
        (
            {"base_pod_spec": {"hostNetwork": True}},
            "training_launcher.base_pod_spec.hostNetwork is not allowed",
            "base_pod_spec takes only nodeSelector, tolerations",
        ),
        (
            {"base_pod_spec": {"securityContext": {"runAsUser": 0}}},
            "training_launcher.base_pod_spec.securityContext is not allowed",
            "remove it",
        ),
        (
            {"base_pod_spec": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}},
            "training_launcher.base_pod_spec.volumes is not allowed",
            "data_volume_claim and data_dir",
        ),
        (
            {"base_pod_spec": {"volumes": [{"name": "mambacast-data", "emptyDir": {}}]}},
            "has a volume named 'mambacast-data', the data volume",
            "remove it",
        ),
        (
            {"base_pod_spec": {"containers": [{"securityContext": {"privileged": True}}]}},
            "training_launcher.base_pod_spec.containers is not allowed",
            "set through image, command",
        ),
        (
            {"base_pod_spec": {"init_containers": [{"image": "busybox"}]}},
            "training_launcher.base_pod_spec.init_containers is not allowed",
            "one container",
        ),
        ({"pod_wait_timeout_s": 0}, "training_launcher.pod_wait_timeout_s must be > 0", "86400"),
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


def test_a_secret_looking_env_name_is_refused_with_the_subprocess_kind_too():
    assert TrainingLauncher(env={"OMP_NUM_THREADS": "2"}).problems() == []
    (problem,) = TrainingLauncher(env={"hf_token": "x"}).problems()
    assert problem.startswith("training_launcher.env.hf_token looks like a secret")
    assert "the training subprocess inherits" in problem


def test_the_allowed_pod_spec_keys_pass_in_either_spelling():
    spec = {
        "nodeSelector": {"a": "b"},
        "tolerations": [],
        "affinity": {},
        "service_account_name": "sa",
        "priorityClassName": "high",
        "image_pull_secrets": [{"name": "pull"}],
        "runtimeClassName": "nvidia",
        "restartPolicy": "OnFailure",
    }
    launcher = TrainingLauncher(**{**_training_config(), "base_pod_spec": spec})
    assert launcher.problems() == []
    built = launcher.pod_spec()
    assert built["runtime_class_name"] == "nvidia" and built["priority_class_name"] == "high"
    assert built["automount_service_account_token"] is False


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
            "training_launcher": TrainingLauncher(
                kind="k8s", namespace="mambacast", data_dir="/data"
            ),
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
    # image, namespace, Secret, env and volumes come from the run launcher, set once there
    for key in ("job_image", "job_namespace", "env_secrets", "env_vars", "volumes"):
        assert key not in config, key
    limits = result.value["step_k8s_config"]["container_config"]["resources"]["limits"]
    assert limits == {"cpu": "2", "memory": "4Gi"}
    # the schema is strict: a misspelt key is an error, so the check above can fail
    typo = {**config, "job_namspace": "mambacast"}
    bad = process_config(schema, typo)
    assert not bad.success and "job_namspace" in bad.errors[0].message


def test_the_run_launcher_yaml_validates_against_the_k8s_run_launcher_schema(monkeypatch):
    monkeypatch.setenv("MAMBACAST_IMAGE", IMAGE)
    config = _yaml("run_launcher.yaml")["run_launcher"]
    assert (config["module"], config["class"]) == ("dagster_k8s", "K8sRunLauncher")
    result = process_config(dagster_k8s.K8sRunLauncher.config_type(), config["config"])
    assert result.success, [e.message for e in result.errors]
    assert result.value["job_image"] == IMAGE  # from the daemon's environment
    monkeypatch.delenv("MAMBACAST_IMAGE")
    assert not process_config(dagster_k8s.K8sRunLauncher.config_type(), config["config"]).success


def test_the_deploy_instance_validates_against_dagsters_instance_schema(tmp_path, monkeypatch):
    from dagster._core.instance.config import dagster_instance_config

    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("DAGSTER_PG_PORT", "5432")
    monkeypatch.setenv("MAMBACAST_IMAGE", IMAGE)
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    merged = {**instance, **_yaml("run_launcher.yaml")}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(merged))
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["concurrency"]["runs"]["max_concurrent_runs"] == 4
    assert config["concurrency"]["pools"]["default_limit"] == 1
    assert config["run_monitoring"]["start_timeout_seconds"] == 600
    assert config["run_monitoring"]["max_resume_run_attempts"] == 0  # the default launcher's
    assert config["run_launcher"]["config"]["job_image"] == {"env": "MAMBACAST_IMAGE"}
    # the same check refuses a misspelt key, so the success above means something
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({**merged, "run_monitorin": {}}))
    with pytest.raises(dg.DagsterInvalidConfigError, match="run_monitorin"):
        dagster_instance_config(str(tmp_path))


def test_the_deploy_workspace_points_at_the_code_server_the_readme_starts():
    from dagster._core.workspace.config_schema import ensure_workspace_config

    workspace = yaml.safe_load((DEPLOY / "workspace.yaml").read_text())
    ensure_workspace_config(workspace, str(DEPLOY / "workspace.yaml"))
    (entry,) = workspace["load_from"]
    server = entry["grpc_server"]
    assert server["location_name"] == "mambacast"
    command = (
        "dagster api grpc -m pipelines.k8s_definitions "
        f"--location-name {server['location_name']} -h 0.0.0.0 -p {server['port']}"
    )
    assert command in (DEPLOY / "README.md").read_text()
    assert command in (DEPLOY / "workspace.yaml").read_text()


def test_the_secrets_example_holds_placeholders_only():
    secret = _yaml("secrets.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "mambacast-secrets"
    assert set(secret["stringData"]) == {"FRED_API_KEY", "DAGSTER_PG_PASSWORD"}
    assert all(v.startswith("<") and v.endswith(">") for v in secret["stringData"].values())


def test_the_k8s_code_location_accepts_the_deploy_run_config_and_the_refresh_runs():
    from pipelines.defs.schedules import IN_PROCESS
    from pipelines.k8s_definitions import defs

    run_config = {**_yaml("executor.yaml"), **_yaml("pipes_training.yaml")}
    job = defs().resolve_job_def("retrain_job")
    assert job.executor_def.name == "mambacast_k8s_executor"
    executor = dg.validate_run_config(job, run_config)["execution"]["mambacast_k8s_executor"]
    assert executor["max_concurrent"] == 3 and not executor["in_process"]
    # the refresh schedule's runs ask for in_process, as on the local executor
    refresh = defs().resolve_job_def("daily_refresh_job")
    executor = dg.validate_run_config(refresh, IN_PROCESS)["execution"]["mambacast_k8s_executor"]
    assert executor["in_process"]
    with pytest.raises(dg.DagsterInvalidConfigError, match="job_namspace"):
        dg.validate_run_config(job, {"execution": {"config": {"job_namspace": "x"}}})


def test_the_k8s_executor_runs_the_refresh_runs_in_process_under_any_launcher():
    from dagster._core.executor.in_process import InProcessExecutor

    with dg.DagsterInstance.ephemeral() as instance:  # the default run launcher
        assert isinstance(_executor(instance, {"in_process": True}), InProcessExecutor)


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
        pod_wait_timeout_s=120,
    )
    waits = []
    wait_for_pod = dagster_k8s.client.DagsterKubernetesClient.wait_for_pod

    def spy(self, *args, **kwargs):
        waits.append(kwargs.get("wait_timeout"))
        return wait_for_pod(self, *args, **kwargs)

    monkeypatch.setattr(dagster_k8s.client.DagsterKubernetesClient, "wait_for_pod", spy)
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
    assert 120 in waits  # pod_wait_timeout_s reached the client's wait for the pod to end
    assert spec.automount_service_account_token is False
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


# ---- the run worker and step Jobs, against a fake BatchV1Api --------------------------------


class FakeBatchV1Api:
    """The part of kubernetes.client.BatchV1Api that the run launcher and the step handler call
    to start a Job: it keeps the Job bodies."""

    def __init__(self):
        self.created: list = []

    def create_namespaced_job(self, body, namespace, **_):
        self.created.append((namespace, body))


def _origin(container_image: str | None = None):
    """What a run's code origin is under deploy/workspace.yaml: the gRPC server's module, and no
    image unless the server was started with --container-image."""
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin

    pointer = ModuleCodePointer("pipelines.k8s_definitions", "defs", working_directory=None)
    repository = RepositoryPythonOrigin(sys.executable, pointer, container_image=container_image)
    return JobPythonOrigin("retrain_job", repository)


def _k8s_instance(tmp_path, monkeypatch, **changes):
    """A test instance (SQLite) whose run launcher is deploy/k8s/run_launcher.yaml's, pointed at
    a kubeconfig instead of the in-cluster service account; the Kubernetes API is faked."""
    monkeypatch.setenv("MAMBACAST_IMAGE", IMAGE)
    batch = FakeBatchV1Api()
    monkeypatch.setattr(kubernetes.client, "BatchV1Api", lambda *a, **k: batch)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda *a, **k: SimpleNamespace())
    launcher = copy.deepcopy(_yaml("run_launcher.yaml")["run_launcher"])
    launcher["config"].update(
        load_incluster_config=False,
        kubeconfig_file=str(_kubeconfig(tmp_path / "kubeconfig")),
        **changes,
    )
    return dg.instance_for_test(overrides={"run_launcher": launcher}), batch


def _launch_run(instance, tags=None):
    from dagster._core.launcher import LaunchRunContext
    from dagster._core.test_utils import create_run_for_test

    run = create_run_for_test(
        instance, job_name="retrain_job", job_code_origin=_origin(), tags=tags
    )
    instance.run_launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    return run


def _env(container) -> dict:
    return {e.name: e.value for e in container.env or []}


def test_the_deploy_run_launcher_starts_a_run_worker_job_with_the_image(tmp_path, monkeypatch):
    instance_cm, batch = _k8s_instance(tmp_path, monkeypatch)
    with instance_cm as instance:
        assert isinstance(instance.run_launcher, dagster_k8s.K8sRunLauncher)
        run = _launch_run(instance)
        ((namespace, job),) = batch.created
        assert namespace == "mambacast"
        pod = job.spec.template.spec
        (container,) = pod.containers
        assert container.image == IMAGE  # from MAMBACAST_IMAGE, not the code origin's None
        assert instance.get_run_by_id(run.run_id).tags["dagster/image"] == IMAGE
        assert pod.service_account_name == "mambacast-runs"
        assert "execute_run" in " ".join(container.args)
        env = _env(container)
        assert env["DAGSTER_PG_HOST"] == "postgresql.mambacast.svc.cluster.local"
        assert env["MAMBACAST_DATA_DIR"] == "/data"
        assert [s.secret_ref.name for s in container.env_from] == ["mambacast-secrets"]
        assert [v.name for v in pod.volumes] == ["mambacast-data"]
        assert container.volume_mounts[0].mount_path == "/data"
        assert container.resources.limits == {"cpu": "3", "memory": "6Gi"}
    # the defect this guards against: without job_image (and no image from the code server)
    # the Job has `image: None`, and dagster-k8s fails the launch tagging the run with it
    instance_cm, batch = _k8s_instance(tmp_path, monkeypatch, job_image=None)
    with instance_cm as instance, pytest.raises(Exception, match="dagster/image"):
        _launch_run(instance)
    assert batch.created == []


def test_the_run_launcher_allows_a_run_only_the_k8s_config_the_deploy_needs(tmp_path, monkeypatch):
    instance_cm, batch = _k8s_instance(tmp_path, monkeypatch)
    with instance_cm as instance:
        allowed = {"container_config": {"resources": {"limits": {"memory": "8Gi"}}}}
        _launch_run(instance, tags={"dagster-k8s/config": json.dumps(allowed)})
        ((_, job),) = batch.created
        assert job.spec.template.spec.containers[0].resources.limits["memory"] == "8Gi"
        for refused, name in [
            ({"pod_spec_config": {"hostNetwork": True}}, "pod_spec_config.host_network"),
            ({"container_config": {"securityContext": {"privileged": True}}}, "security_context"),
        ]:
            with pytest.raises(Exception, match="violated the allowed list") as err:
                _launch_run(instance, tags={"dagster-k8s/config": json.dumps(refused)})
            assert name in str(err.value)
        assert len(batch.created) == 1  # nothing else was started


def _executor(instance, run_config: dict):
    from dagster._core.definitions.job_base import InMemoryJob

    from pipelines.k8s_definitions import defs, mambacast_k8s_executor

    job = defs().resolve_job_def("retrain_job")
    config = dg.validate_run_config(job, {"execution": {"config": run_config}})
    context = dg.InitExecutorContext(
        job=InMemoryJob(job),
        executor_def=mambacast_k8s_executor,
        executor_config=config["execution"]["mambacast_k8s_executor"],
        instance=instance,
    )
    return mambacast_k8s_executor.executor_creation_fn(context)


def _launch_step(instance, monkeypatch, step_key: str):
    """Start one step of retrain_job the way the run worker does under deploy/k8s/executor.yaml:
    the executor built from the run config, its step handler's launch_step. Only the step
    context (used for the 'starting' event) is a stand-in."""
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.executor.step_delegating import StepDelegatingExecutor
    from dagster._core.executor.step_delegating.step_handler.base import StepHandlerContext
    from dagster._core.test_utils import create_run_for_test
    from dagster._grpc.types import ExecuteStepArgs

    from pipelines.k8s_definitions import defs

    executor = _executor(instance, _yaml("executor.yaml")["execution"]["config"])
    assert isinstance(executor, StepDelegatingExecutor)
    assert executor._step_handler.name == "K8sStepHandler"
    job = defs().resolve_job_def("retrain_job")
    step = create_execution_plan(job).get_step_by_key(step_key)
    run = create_run_for_test(instance, job_name="retrain_job", job_code_origin=_origin())
    args = ExecuteStepArgs(_origin(), run.run_id, [step_key], instance_ref=instance.get_ref())
    plan_context = SimpleNamespace(for_step=lambda s: SimpleNamespace(step=s))
    context = StepHandlerContext(instance, plan_context, [step], args, run)
    monkeypatch.setattr(
        dagster_k8s.executor.DagsterEvent, "step_worker_starting", lambda *a, **k: "starting"
    )
    return list(executor._step_handler.launch_step(context))


def test_a_step_job_takes_the_launchers_image_env_and_volume_once(tmp_path, monkeypatch):
    instance_cm, batch = _k8s_instance(tmp_path, monkeypatch)
    with instance_cm as instance:
        assert _launch_step(instance, monkeypatch, "model") == ["starting"]
    ((namespace, job),) = batch.created
    assert namespace == "mambacast" and job.metadata.name.startswith("dagster-step-")
    pod = job.spec.template.spec
    (container,) = pod.containers
    assert container.image == IMAGE
    assert pod.service_account_name == "mambacast-runs"
    assert pod.node_selector == {"kubernetes.io/os": "linux"}  # step_k8s_config
    assert container.resources.limits == {"cpu": "4", "memory": "8Gi"}  # per_step: model
    env = _env(container)
    assert env["DAGSTER_PG_DB"] == "dagster" and env["OMP_NUM_THREADS"] == "1"
    assert env["DAGSTER_RUN_STEP_KEY"] == "model"
    assert [s.secret_ref.name for s in container.env_from] == ["mambacast-secrets"]
    assert [v.name for v in pod.volumes] == ["mambacast-data"]  # once, from the launcher
    assert [m.mount_path for m in container.volume_mounts] == ["/data"]


def test_a_step_under_the_default_run_launcher_fails_naming_the_launcher_config(monkeypatch):
    batch = FakeBatchV1Api()
    monkeypatch.setattr(kubernetes.client, "BatchV1Api", lambda *a, **k: batch)
    with (
        dg.instance_for_test() as instance,
        pytest.raises(dg.DagsterInvariantViolationError) as err,
    ):
        _launch_step(instance, monkeypatch, "model")
    text = str(err.value)
    assert "DefaultRunLauncher" in text and "deploy/k8s/run_launcher.yaml" in text
    assert "in_process: true" in text
    assert batch.created == []
