"""Where the sequence-model training runs: the `training_launcher` resource of `mamba_model`,
`sequence_baselines` and `literature_baselines`.

The three assets hand the same Pipes launch (`python -m pipelines.train_sequences`, its settings as
Pipes extras, its materialization reported back) to this resource, which starts it

- `kind: subprocess` (the default): as a process beside the step, through
  `dg.PipesSubprocessClient` and the whole-line message reader (`pipelines.pipes`);
- `kind: k8s`: as a Kubernetes pod, through `dagster_k8s.PipesK8sClient` (context in the pod's
  environment, messages read from its logs). The pod sees the data directory on a shared
  volume (`data_volume_claim` mounted at `data_dir`). dagster-k8s and the kubernetes client are
  imported only on this path, so loading the definitions does not pay for them.

Configured like any resource, e.g. in a run's config (deploy/k8s/pipes_training.yaml):

    resources:
      training_launcher:
        config: {kind: k8s, image: registry.example.com/mambacast:1.0, namespace: mambacast}

A setting that cannot work (an unknown kind, a k8s launch without an image, a namespace that is
not a Kubernetes name, ...) fails the step before anything starts, naming the field and the fix.

Run config is trusted input: whoever can launch a run chooses `command`, `image` and `env`, so
they can run any command in the training process or pod (deploy/README.md, "Security"). What
this resource does limit is the pod's shape: `base_pod_spec` takes only the scheduling keys in
`POD_SPEC_KEYS` (no hostPath volumes, privileged or host-network pods, extra or init
containers), the pod gets no service-account token, and an `env` name that looks like a secret
is refused in favour of `env_secrets`, so no secret value lands in the run's stored config.
"""

from __future__ import annotations

import copy
import posixpath
import re
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from pipelines.pipes import WholeLineTempFileMessageReader

if TYPE_CHECKING:
    from dagster_k8s import PipesK8sClient

TRAINING_MODULE = "pipelines.train_sequences"
KINDS = ("subprocess", "k8s")
# the image's interpreter runs the training module (a DDP launch would be
# ["torchrun", "--nproc-per-node", "4", "-m", "pipelines.train_sequences"])
K8S_COMMAND = ["python", "-m", TRAINING_MODULE]
DATA_VOLUME = "mambacast-data"  # the name of the pod's volume for `data_volume_claim`
# Kubernetes names: a namespace is an RFC 1123 label, a Secret or claim an RFC 1123 subdomain
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# the PodSpec keys `base_pod_spec` may set (camelCase as in a manifest, or snake_case): where
# the pod is scheduled and as whom; everything else (volumes, containers, initContainers,
# hostNetwork, hostPID, securityContext, ...) is refused, naming the key and the fix
POD_SPEC_KEYS = {
    "nodeSelector": "node_selector",
    "tolerations": "tolerations",
    "affinity": "affinity",
    "serviceAccountName": "service_account_name",
    "priorityClassName": "priority_class_name",
    "imagePullSecrets": "image_pull_secrets",
    "runtimeClassName": "runtime_class_name",
    "restartPolicy": "restart_policy",
}
_POD_SPEC_ALLOWED = set(POD_SPEC_KEYS) | set(POD_SPEC_KEYS.values())
# substrings (any case) of an `env` name that mark it as a secret: those belong in env_secrets
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
DEFAULT_POD_WAIT_TIMEOUT_S = 86400.0  # dagster-k8s's own default: one day
_K8S_ONLY = (
    "image",
    "namespace",
    "base_pod_spec",
    "resources",
    "env_secrets",
    "data_volume_claim",
    "data_dir",
    "load_incluster_config",
    "kubeconfig_file",
    "kube_context",
)


class TrainingLauncherError(ValueError):
    """A `training_launcher` setting that cannot work; the message names each field and fix."""


class TrainingLauncher(dg.ConfigurableResource):
    """Launches the sequence-model training (Dagster Pipes) as a local subprocess or a
    Kubernetes pod; see the module docstring and deploy/README.md."""

    kind: str = Field(
        default="subprocess",
        description="subprocess: a process beside the step (the default); k8s: a Kubernetes pod "
        "through dagster-k8s PipesK8sClient",
    )
    command: list[str] = Field(
        default=[],
        description="The training command; empty: this interpreter's `-m "
        f"{TRAINING_MODULE}` (subprocess) or `{' '.join(K8S_COMMAND)}` (k8s)",
    )
    env: dict[str, str] = Field(
        default={},
        description="Plain environment variables of the training process (no secrets: use "
        "env_secrets)",
    )
    image: str = Field(
        default="",
        description="k8s: the image with the project installed (or set it in base_pod_spec)",
    )
    namespace: str = Field(
        default="",
        description="k8s: the pod's namespace; empty: the run worker's own namespace in a "
        "cluster, else 'default'",
    )
    base_pod_spec: dict[str, Any] = Field(
        default={},
        description="k8s: PodSpec keys (camelCase or snake_case) the pod starts from, only "
        "nodeSelector, tolerations, affinity, serviceAccountName, priorityClassName, "
        "imagePullSecrets, runtimeClassName, restartPolicy",
    )
    resources: dict[str, Any] = Field(
        default={},
        description="k8s: the training container's requests/limits, e.g. {limits: "
        "{nvidia.com/gpu: 1, memory: 16Gi}}",
    )
    env_secrets: list[str] = Field(
        default=[],
        description="k8s: Secrets whose keys become the training container's environment",
    )
    data_volume_claim: str = Field(
        default="",
        description="k8s: the PersistentVolumeClaim holding the data directory, mounted at "
        "data_dir",
    )
    data_dir: str = Field(
        default="",
        description="k8s (required): the absolute data directory as the pod sees it, where "
        "data_volume_claim is mounted (e.g. /data)",
    )
    load_incluster_config: bool | None = Field(
        default=None,
        description="k8s: true inside the cluster (service account), false for a kubeconfig; "
        "unset: in-cluster when KUBERNETES_SERVICE_HOST is set",
    )
    kubeconfig_file: str | None = Field(default=None, description="k8s: a kubeconfig path")
    kube_context: str | None = Field(default=None, description="k8s: the kubeconfig context")
    poll_interval_s: float = Field(
        default=10.0, description="k8s: seconds between polls of the pod's status"
    )
    pod_wait_timeout_s: float = Field(
        default=DEFAULT_POD_WAIT_TIMEOUT_S,
        description="k8s: seconds to wait for the training pod to finish before the step fails "
        "(PipesK8sClient's pod_wait_timeout; default one day)",
    )

    # ---- validation -------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every setting that cannot work, each naming the field and the fix."""
        kind = self.kind
        if kind not in KINDS:
            return [
                f"training_launcher.kind={kind!r} is not a launcher: use 'subprocess' (a process "
                "beside the step, the default) or 'k8s' (a Kubernetes pod through dagster-k8s)"
            ]
        out = [
            f"training_launcher.env.{name} looks like a secret (its name has "
            f"{'/'.join(SECRET_MARKERS)}): run config is stored with the run and shown in the "
            + (
                "UI; put it in a Kubernetes Secret and list the Secret in env_secrets"
                if kind == "k8s"
                else "UI; set it in the environment of the process that runs the step, which "
                "the training subprocess inherits"
            )
            for name in self.env
            if any(marker in name.upper() for marker in SECRET_MARKERS)
        ]
        if kind == "subprocess":
            given = [f for f in _K8S_ONLY if getattr(self, f) not in (None, "", {}, [])]
            return out + [
                f"training_launcher.{f} is a k8s setting, but kind='subprocess' ignores it: set "
                "kind: k8s, or remove it"
                for f in given
            ]
        if not self.image:
            out.append(
                "training_launcher.image is required with kind='k8s': set it to an image with "
                "the project installed (e.g. registry.example.com/mambacast:1.0)"
            )
        out.extend(self._pod_spec_problems())
        if self.namespace and not _is_name(self.namespace, _LABEL, 63):
            out.append(
                f"training_launcher.namespace={self.namespace!r} is not a Kubernetes namespace "
                "name: use at most 63 lowercase letters, digits and '-', starting and ending "
                "with a letter or digit (e.g. 'mambacast')"
            )
        for name in self.env_secrets:
            if not _is_name(name, _SUBDOMAIN, 253):
                out.append(
                    f"training_launcher.env_secrets: {name!r} is not a Secret name: use "
                    "lowercase letters, digits, '-' and '.' (e.g. 'mambacast-secrets')"
                )
        if self.data_volume_claim and not _is_name(self.data_volume_claim, _SUBDOMAIN, 253):
            out.append(
                f"training_launcher.data_volume_claim={self.data_volume_claim!r} is not a "
                "PersistentVolumeClaim name: use lowercase letters, digits, '-' and '.'"
            )
        if not self.data_dir.startswith("/") or not posixpath.normpath(self.data_dir).strip("/"):
            out.append(
                f"training_launcher.data_dir={self.data_dir!r} must be the absolute path (not "
                "'/') where the pod sees the data directory, i.e. where it mounts "
                "data_volume_claim (e.g. /data)"
            )
        unknown = set(self.resources) - {"requests", "limits", "claims"}
        if unknown:
            out.append(
                f"training_launcher.resources has {sorted(unknown)}: a container's resources "
                "take 'requests' and 'limits', e.g. {limits: {nvidia.com/gpu: 1}}"
            )
        if self.load_incluster_config and (self.kubeconfig_file or self.kube_context):
            out.append(
                "training_launcher.load_incluster_config=true uses the pod's service account: "
                "remove kubeconfig_file/kube_context, or set load_incluster_config: false"
            )
        if self.poll_interval_s <= 0:
            out.append("training_launcher.poll_interval_s must be > 0 (seconds, e.g. 10)")
        if self.pod_wait_timeout_s <= 0:
            out.append(
                "training_launcher.pod_wait_timeout_s must be > 0 (seconds the step waits for "
                "the pod, e.g. 86400)"
            )
        return out

    def _pod_spec_problems(self) -> list[str]:
        out = []
        for key, value in self.base_pod_spec.items():
            if key in _POD_SPEC_ALLOWED:
                continue
            if key == "volumes" and any(
                isinstance(v, Mapping) and v.get("name") == DATA_VOLUME for v in value or []
            ):
                out.append(
                    f"training_launcher.base_pod_spec.volumes has a volume named {DATA_VOLUME!r}, "
                    "the data volume this resource adds from data_volume_claim: remove it and "
                    "set data_volume_claim and data_dir"
                )
            elif key in ("volumes", "containers", "initContainers", "init_containers"):
                out.append(
                    f"training_launcher.base_pod_spec.{key} is not allowed: the pod runs one "
                    "container, set through image, command, env, env_secrets and resources, "
                    "with the data volume from data_volume_claim and data_dir"
                )
            else:
                out.append(
                    f"training_launcher.base_pod_spec.{key} is not allowed (host access, "
                    "privileges and the pod's security settings are the cluster's to set): "
                    f"remove it; base_pod_spec takes only {', '.join(POD_SPEC_KEYS)}"
                )
        policy = self.base_pod_spec.get("restartPolicy", self.base_pod_spec.get("restart_policy"))
        if policy == "Always":
            out.append(
                "training_launcher.base_pod_spec.restartPolicy=Always would restart a finished "
                "training: leave it out (Never) or use OnFailure"
            )
        return out

    def check(self) -> None:
        """Raise `TrainingLauncherError` listing every problem, if there is any."""
        found = self.problems()
        if found:
            raise TrainingLauncherError("; ".join(found))

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.check()  # fail the step before anything is launched

    # ---- the launch -------------------------------------------------------------------------

    def training_command(self) -> list[str]:
        if self.command:
            return list(self.command)
        return [sys.executable, "-m", TRAINING_MODULE] if self.kind == "subprocess" else K8S_COMMAND

    def subprocess_client(self) -> dg.PipesSubprocessClient:
        # Dagster's file reader can parse a message line the training process is still writing
        return dg.PipesSubprocessClient(
            env=dict(self.env) or None, message_reader=WholeLineTempFileMessageReader()
        )

    def k8s_client(self) -> PipesK8sClient:
        self.check()
        from dagster_k8s import PipesK8sClient  # only here: kubernetes takes ~1 s to import

        return PipesK8sClient(
            load_incluster_config=self.load_incluster_config,
            kubeconfig_file=self.kubeconfig_file,
            kube_context=self.kube_context,
            poll_interval=self.poll_interval_s,
        )

    def pod_spec(self) -> dict[str, Any]:
        """The PodSpec the training pod starts from (snake_case, as dagster-k8s builds it):
        `base_pod_spec` with no service-account token mounted, the container's resources, the
        Secrets as its environment and the data volume mounted at `data_dir`. PipesK8sClient
        adds the image, command and the Pipes environment to the first container."""
        from dagster_k8s.models import k8s_snake_case_dict
        from kubernetes.client import V1PodSpec

        spec = k8s_snake_case_dict(V1PodSpec, copy.deepcopy(self.base_pod_spec))
        # the training talks to nothing but its data volume and its logs: no API credentials
        spec["automount_service_account_token"] = False
        containers = spec.setdefault("containers", [{}])
        first = containers[0]
        if self.resources:
            first["resources"] = copy.deepcopy(self.resources)
        if self.env_secrets:
            first.setdefault("env_from", []).extend(
                {"secret_ref": {"name": name}} for name in self.env_secrets
            )
        if self.data_volume_claim:
            spec.setdefault("volumes", []).append(
                {
                    "name": DATA_VOLUME,
                    "persistent_volume_claim": {"claim_name": self.data_volume_claim},
                }
            )
            first.setdefault("volume_mounts", []).append(
                {"name": DATA_VOLUME, "mount_path": self.data_dir}
            )
        return spec

    def launch(
        self, context: dg.AssetExecutionContext, extras: Mapping[str, Any]
    ) -> dg.PipesClientCompletedInvocation:
        """Run the training with `extras` and wait for it; its reported materialization is on
        the result. `extras["data_dir"]` becomes `data_dir` for a pod that mounts the data
        elsewhere."""
        self.check()
        if self.kind == "subprocess":
            return self.subprocess_client().run(
                command=self.training_command(), context=context, extras=dict(extras)
            )
        extras = {**extras, "data_dir": self.data_dir}
        return self.k8s_client().run(
            context=context,
            image=self.image or None,
            command=self.training_command(),
            namespace=self.namespace or None,
            env=dict(self.env),
            base_pod_spec=self.pod_spec(),
            extras=extras,
            pod_wait_timeout=self.pod_wait_timeout_s,
        )


def _is_name(value: str, pattern: re.Pattern, limit: int) -> bool:
    return len(value) <= limit and pattern.fullmatch(value) is not None
