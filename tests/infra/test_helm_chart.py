"""Offline checks of the trimflow-triton Helm chart: lint, schema validation, rendered facts.

Helm comes from ``devstack.tools`` (installed into .trimflow/tools/bin on first use); the
rendered manifests are validated against the Kubernetes 1.32 OpenAPI schemas with
``kubernetes-validate --strict``, then the objects are inspected for what matters on each pool.

    pytest -m infra tests/infra/test_helm_chart.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devstack.tools import ToolInstallError, ensure

pytestmark = pytest.mark.infra

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "infra" / "helm" / "trimflow-triton"
VALUES_FILES = ("values.yaml", "values-cpu.yaml")
KUBERNETES_VERSION = "1.32.0"
REQUIRED = ("--set", "image.repository=registry.example.com/trimflow-serving",
            "--set", "modelRepository=s3://trimflow-models/triton")
GPU = "nvidia.com/gpu"


@pytest.fixture(scope="module")
def helm() -> str:
    try:
        return str(ensure("helm"))
    except ToolInstallError as e:
        pytest.fail(f"helm is needed for these checks and could not be installed: {e}\n"
                    "install it with: python -m devstack.tools helm")


def _helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def _template(helm: str, values: str, *extra: str, required: tuple[str, ...] = REQUIRED) -> str:
    proc = _helm(helm, "template", "trimflow", str(CHART), "-f", str(CHART / values), *required, *extra)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _objects(manifest: str) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(manifest) if doc}


def _kubernetes_validate(manifest: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "-k", KUBERNETES_VERSION, "--strict", "-"],
                          input=manifest, capture_output=True, text=True, timeout=120)


def _triton(objects: dict[str, dict]) -> tuple[dict, dict]:
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


@pytest.fixture(scope="module")
def gpu(helm) -> dict[str, dict]:
    return _objects(_template(helm, "values.yaml"))


@pytest.fixture(scope="module")
def cpu(helm) -> dict[str, dict]:
    return _objects(_template(helm, "values-cpu.yaml"))


# -- lint and schema validation ----------------------------------------------------------------

@pytest.mark.parametrize("values", VALUES_FILES)
def test_chart_passes_helm_lint_strict_with_values_file(helm, values):
    proc = _helm(helm, "lint", "--strict", str(CHART), "-f", str(CHART / values), *REQUIRED)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values", VALUES_FILES)
def test_rendered_manifests_validate_against_kubernetes_1_32_strictly(helm, values):
    proc = _kubernetes_validate(_template(helm, values, "--set", "s3.existingSecret=triton-s3"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # A kind without a schema only warns (exit 0); every kind this chart renders by default has one.
    assert "WARN" not in proc.stdout, proc.stdout


def test_rendered_optional_objects_validate_when_all_are_enabled(helm):
    manifest = _template(helm, "values.yaml", "--set", "autoscaling.enabled=true", "--set", "serviceMonitor.enabled=true",
                         "--set", "modelControl.mode=poll", "--set", "extraArgs={--log-verbose=1}",
                         "--set-json", 'extraEnv=[{"name":"TRITON_EXTRA","value":"1"}]')
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"} <= set(_objects(manifest))
    proc = _kubernetes_validate(manifest)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warnings = [ln for ln in proc.stdout.splitlines() if ln.startswith("WARN")]
    # ServiceMonitor is a Prometheus Operator CRD: no schema in kubernetes-validate.
    assert len(warnings) == 1 and "ServiceMonitor" in warnings[0], warnings


def test_kubernetes_validate_rejects_a_misspelt_field_in_the_rendered_pod(helm):
    proc = _kubernetes_validate(_template(helm, "values.yaml", "--set", "podSecurityContext.runAsNonroot=true"))
    assert proc.returncode != 0
    assert "runAsNonroot" in proc.stdout


def test_chart_refuses_to_render_when_model_repository_is_missing(helm):
    proc = _helm(helm, "template", "trimflow", str(CHART), "--set", "image.repository=registry.example.com/x")
    assert proc.returncode != 0
    assert "modelRepository is required" in proc.stderr


def test_chart_refuses_a_model_repository_outside_s3(helm):
    proc = _helm(helm, "template", "trimflow", str(CHART), "--set", "image.repository=registry.example.com/x",
                 "--set", "modelRepository=gs://bucket/models")
    assert proc.returncode != 0
    assert "modelRepository" in proc.stderr


def test_chart_schema_rejects_a_misspelt_top_level_value(helm):
    proc = _helm(helm, "template", "trimflow", str(CHART), *REQUIRED, "--set", "replicaCont=3")
    assert proc.returncode != 0
    assert "replicaCont" in proc.stderr


# -- what the GPU and CPU pools get --------------------------------------------------------------

def test_gpu_values_request_one_gpu_on_the_gpu_pool_with_its_toleration(gpu):
    pod, container = _triton(gpu)
    assert container["resources"]["limits"][GPU] == 1
    assert pod["nodeSelector"] == {"trimflow.io/node-pool": "gpu"}
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "--allow-gpu-metrics=false" not in container["args"]


def test_cpu_values_carry_no_gpu_limit_toleration_or_selector(cpu):
    pod, container = _triton(cpu)
    assert GPU not in container["resources"].get("limits", {})
    assert GPU not in container["resources"].get("requests", {})
    assert "tolerations" not in pod
    assert pod["nodeSelector"] == {"trimflow.io/node-pool": "cpu"}
    assert "--allow-gpu-metrics=false" in container["args"]
    assert container["image"].endswith(":0.1.0-cpu")


def test_cpu_values_run_more_replicas_under_an_autoscaler(gpu, cpu):
    assert "replicas" not in cpu["Deployment"]["spec"], "the HPA owns the replica count"
    assert cpu["HorizontalPodAutoscaler"]["spec"]["minReplicas"] > gpu["Deployment"]["spec"]["replicas"]
    assert "HorizontalPodAutoscaler" not in gpu


@pytest.mark.parametrize("pool", ["gpu", "cpu"])
def test_triton_runs_non_root_with_read_only_root_and_no_privilege_escalation(pool, request):
    pod, container = _triton(request.getfixturevalue(pool))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("pool", ["gpu", "cpu"])
def test_triton_serves_the_s3_repository_with_cache_and_explicit_load(pool, request):
    _, container = _triton(request.getfixturevalue(pool))
    assert container["command"] == ["tritonserver"]
    args = container["args"]
    assert "--model-repository=s3://trimflow-models/triton" in args
    assert "--model-control-mode=explicit" in args and "--load-model=*" in args
    # an integer, not Helm's float rendering (2.68435456e+08), or Triton rejects the flag
    assert "--cache-config=local,size=268435456" in args


def test_poll_mode_sets_the_poll_interval_and_loads_nothing_explicitly(helm):
    _, container = _triton(_objects(_template(helm, "values.yaml", "--set", "modelControl.mode=poll")))
    assert "--repository-poll-secs=30" in container["args"]
    assert not any(a.startswith("--load-model") for a in container["args"])


@pytest.mark.parametrize("pool", ["gpu", "cpu"])
def test_probes_use_triton_health_endpoints(pool, request):
    _, container = _triton(request.getfixturevalue(pool))
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "large models load for minutes"


@pytest.mark.parametrize("pool", ["gpu", "cpu"])
def test_dev_shm_is_an_in_memory_volume(pool, request):
    pod, container = _triton(request.getfixturevalue(pool))
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "sizeLimit" in volumes[mounts["/dev/shm"]]["emptyDir"]
    assert "/tmp" in mounts, "Triton copies s3:// models under /tmp; the root filesystem is read-only"


def test_service_exposes_http_grpc_and_metrics(gpu):
    ports = {p["name"]: p["port"] for p in gpu["Service"]["spec"]["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert gpu["Service"]["spec"]["selector"] == gpu["Deployment"]["spec"]["selector"]["matchLabels"]


def test_s3_credentials_come_only_from_the_named_existing_secret(helm):
    manifest = _template(helm, "values.yaml", "--set", "s3.existingSecret=triton-s3")
    objects = _objects(manifest)
    assert "Secret" not in objects
    _, container = _triton(objects)
    env = {e["name"]: e for e in container["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "triton-s3"


def test_no_s3_keys_are_injected_without_a_secret(gpu):
    _, container = _triton(gpu)
    names = {e["name"] for e in container["env"]}
    assert names == {"AWS_DEFAULT_REGION"}


def test_changing_model_revision_changes_the_pod_template(helm):
    def annotations(revision: str) -> dict:
        objects = _objects(_template(helm, "values.yaml", "--set", f"modelRevision={revision}"))
        return objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]

    assert annotations("run-1")["trimflow.io/model-revision"] == "run-1"
    assert annotations("run-2")["trimflow.io/model-revision"] == "run-2"
