"""deploy/k8s: the kustomize output is valid Kubernetes (kubernetes-validate --strict for the core objects, our own
schemas for the custom resources), and its parts agree with each other and with the server."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from server.settings import ENV_PREFIX, Settings
from tests.deploy.support import DEPLOY, run, tool, yaml

K8S = DEPLOY / "k8s"
HERE = Path(__file__).parent
# The oldest and the newest minor we claim; both are bundled with kubernetes-validate.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
CUSTOM_GROUPS = ("monitoring.coreos.com/", "keda.sh/")
CORE_KINDS = {"ConfigMap", "Service", "PersistentVolumeClaim", "Deployment", "PodDisruptionBudget"}
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
UVICORN_CLOSE_S = 5  # server/__main__.py: timeout_graceful_shutdown, after the drain


def kustomize(folder: Path) -> list[dict]:
    result = run(tool("kubectl"), "kustomize", str(folder))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml().safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return kustomize(K8S)


def find(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_base_has_the_core_objects_and_the_top_adds_the_custom_resources(rendered):
    assert {d["kind"] for d in kustomize(K8S / "base")} == CORE_KINDS
    assert sorted(d["kind"] for d in rendered) == sorted(CORE_KINDS | CUSTOM_KINDS)
    assert {d["metadata"]["namespace"] for d in rendered} == {"hymba-serve"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_pass_kubernetes_validate_strict(rendered, version, tmp_path):
    core = [d for d in rendered if not d["apiVersion"].startswith(CUSTOM_GROUPS)]
    manifest = tmp_path / "core.yaml"
    manifest.write_text(yaml().safe_dump_all(core))
    result = run(tool("kubernetes-validate"), "--strict", "-k", version, str(manifest))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert out.count(" passed for resource ") == len(core), out  # none skipped for want of a schema


def test_custom_resources_match_their_schemas(rendered):
    from jsonschema import Draft202012Validator

    schemas = yaml().safe_load((HERE / "crd_schemas.yaml").read_text())
    for doc in rendered:
        if doc["apiVersion"].startswith(CUSTOM_GROUPS):
            validator = Draft202012Validator({"$defs": schemas["$defs"], **schemas[doc["kind"]]})
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
            assert not errors, f"{doc['kind']}: " + "; ".join(errors)


def test_the_crd_schemas_catch_a_misplaced_field(rendered):
    from jsonschema import Draft202012Validator

    schemas = yaml().safe_load((HERE / "crd_schemas.yaml").read_text())
    scaled = find(rendered, "ScaledObject")
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 2  # KEDA wants "2"
    scaled["spec"]["maxReplicas"] = 4
    errors = list(Draft202012Validator({"$defs": schemas["$defs"], **schemas["ScaledObject"]}).iter_errors(scaled))
    assert len(errors) == 2, [e.message for e in errors]


def test_the_configmap_holds_valid_server_settings(rendered):
    data = find(rendered, "ConfigMap")["data"]
    settings = Settings.from_args([], environ={**data, f"{ENV_PREFIX}API_KEY": "from-the-secret"})
    assert (settings.host, settings.port, settings.model) == ("0.0.0.0", 8000, "/models")
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    assert data.keys() <= known, f"not settings of server/settings.py: {data.keys() - known}"


def test_the_grace_period_covers_the_prestop_sleep_and_the_whole_drain(rendered):
    from server.queue import WORKER_STOP_GRACE_S

    pod = find(rendered, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    shutdown_timeout = float(find(rendered, "ConfigMap")["data"]["HYMBA_SHUTDOWN_TIMEOUT"])
    drain = float(command[1]) + shutdown_timeout + WORKER_STOP_GRACE_S + UVICORN_CLOSE_S
    assert pod["terminationGracePeriodSeconds"] > drain
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > shutdown_timeout  # draining is not dying


def test_the_pod_is_probed_on_health_and_locked_down(rendered):
    pod = find(rendered, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model loading from a network volume
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    models = mounts["/models"]
    assert models["readOnly"] and "persistentVolumeClaim" in volumes[models["name"]]
    writable = [path for path, m in mounts.items() if "emptyDir" in volumes[m["name"]]]
    assert "/tmp" in writable
    caches = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for name in ("TRITON_HOME", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH", "XDG_CACHE_HOME"):
        assert any(caches[name].startswith(path) for path in writable), f"{name}={caches[name]} is read-only"
    api_key = next(e for e in container["env"] if e["name"] == "HYMBA_API_KEY")
    assert "secretKeyRef" in api_key["valueFrom"]


def test_service_monitor_pdb_and_scaler_select_the_pods(rendered):
    deployment, service = find(rendered, "Deployment"), find(rendered, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"],
        find(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()
    monitor = find(rendered, "ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    scaler = find(rendered, "ScaledObject")["spec"]
    assert scaler["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    query = scaler["triggers"][0]["metadata"]["query"]
    assert f'namespace="{service["metadata"]["namespace"]}"' in query
    assert f'service="{service["metadata"]["name"]}"' in query
