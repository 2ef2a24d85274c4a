"""deploy/k8s: every manifest validates offline against the Kubernetes schemas (kubernetes-validate, strict, bundled
schemas), and the settings that make the pipeline work on a cluster hold: GPU requests, a grace period past the
drain, /healthz probes on the metrics port, a read-only model volume, real CLI arguments, a KEDA trigger on the right
stream and group. KEDA's ScaledObject is a CRD with no schema in that package, so its structure is checked here.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pipeline.config import config_from_mapping, load_config
from pipeline.streams import SCORER_GROUP, LineKeys
from tests.deploy.conftest import parse_lineinspect, stop_bound_s
from tests.workers.processes import REPO_ROOT

K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())  # an older, still common cluster, and the newest
ROLE_OF_COMMAND = {"ingest": "ingest", "score-worker": "score", "sink": "sink"}
# what streaming workers read from config.toml (besides model.device); model settings come from the artifact
RUNTIME_SECTIONS = ("redis", "streams", "worker", "ingest", "sink")


def load_documents(folder: Path) -> list[dict[str, Any]]:
    """What ``kubectl apply -f FOLDER`` applies: the folder's own manifests, not its subfolders' (no ``-R``)."""
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


@pytest.fixture(scope="module")
def documents(deploy_dir: Path) -> list[dict[str, Any]]:
    return load_documents(deploy_dir / "k8s")


@pytest.fixture(scope="module")
def examples(deploy_dir: Path) -> list[dict[str, Any]]:
    """Manifests an operator adapts and creates once (deploy/k8s/example/), never applied with the folder."""
    return load_documents(deploy_dir / "k8s" / "example")


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc["kind"] == kind]


def test_manifests_validate_against_the_kubernetes_schemas(
    documents: list[dict[str, Any]], examples: list[dict[str, Any]]
) -> None:
    kinds = {doc["kind"] for doc in documents + examples}
    assert {"Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "ScaledObject"} <= kinds
    for doc in documents + examples:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked in test_keda_scales_scorers_on_the_frames_stream_lag
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "lineinspect"


def test_the_validator_rejects_a_misspelt_field(documents: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(of_kind(documents, "Deployment")[0])
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 40
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_configmap_matches_the_repo_config_in_what_workers_read(documents: list[dict[str, Any]]) -> None:
    text = of_kind(documents, "ConfigMap")[0]["data"]["config.toml"]
    pod_config = config_from_mapping(tomllib.loads(text), "ConfigMap lineinspect-config").model_dump(mode="json")
    repo_config = load_config(REPO_ROOT / "config.toml", environ={}).model_dump(mode="json")
    differences = {
        f"{section}.{key}"
        for section in RUNTIME_SECTIONS
        for key, value in repo_config[section].items()
        if pod_config[section][key] != value
    }
    assert differences == {"worker.health_port", "sink.metrics_port", "sink.heatmap_dir"}
    assert pod_config["model"]["device"] == repo_config["model"]["device"]
    assert pod_config["worker"]["health_port"] == pod_config["sink"]["metrics_port"] == 9102


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return dict(deployment["spec"]["template"]["spec"])


def test_deployments_run_real_commands_drain_and_probe_healthz(documents: list[dict[str, Any]]) -> None:
    deployments = of_kind(documents, "Deployment")
    components = {deployment["metadata"]["labels"]["app.kubernetes.io/component"] for deployment in deployments}
    assert components == {"score", "ingest", "sink"}
    for deployment in deployments:
        spec = pod_spec(deployment)
        assert spec["terminationGracePeriodSeconds"] > stop_bound_s()
        assert spec["securityContext"]["runAsNonRoot"] is True
        (container,) = spec["containers"]
        args = parse_lineinspect(container["args"])
        role = ROLE_OF_COMMAND[args.command]
        assert deployment["metadata"]["labels"]["app.kubernetes.io/component"] == role  # Prometheus' job label
        assert args.config == Path("/etc/lineinspect/config.toml")
        assert getattr(args, "name", None) is None  # pod name + role, as the image's health check expects
        env = {item["name"]: item for item in container["env"]}
        assert env["LINEINSPECT_ROLE"]["value"] == role
        assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "lineinspect-redis"
        (port,) = container["ports"]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port["containerPort"]) == "9102"
        assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
        # liveness must not restart a worker that is only waiting for Redis
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": port["name"]}
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert any(mount["mountPath"] == "/tmp" for mount in container["volumeMounts"])


def test_applying_the_folder_never_overwrites_the_redis_secret(
    documents: list[dict[str, Any]], examples: list[dict[str, Any]]
) -> None:
    """The operator creates the Redis Secret with the password; `kubectl apply -f deploy/k8s/`, run again for any
    change, must not replace it with an example's password-less URL (pods restarted later would fail to connect)."""
    assert of_kind(documents, "Secret") == []
    (secret,) = of_kind(examples, "Secret")
    name = secret["metadata"]["name"]
    for deployment in of_kind(documents, "Deployment"):
        (container,) = pod_spec(deployment)["containers"]
        refs = [item["valueFrom"]["secretKeyRef"] for item in container["env"] if "valueFrom" in item]
        assert {ref["name"] for ref in refs} == {name}
        assert {ref["key"] for ref in refs} <= set(secret["stringData"])
    (scaled,) = of_kind(documents, "ScaledObject")
    database = secret["stringData"]["url"].rsplit("/", 1)[1]
    assert scaled["spec"]["triggers"][0]["metadata"]["databaseIndex"] == database  # KEDA reads where workers write


def test_only_livez_restarts_a_pod(documents: list[dict[str, Any]]) -> None:
    """Kubernetes restarts a container whose startup or liveness probe fails. /healthz is readiness: 503 while a
    scorer loads its model (tests/workers/test_score_startup.py) and while a worker waits for an unreachable Redis,
    which no restart fixes. /livez stays 200 through both and turns 503 by itself once a load outlasts
    worker.max_startup_s or a batch worker.max_batch_duration_s, so it alone may restart a pod."""
    for deployment in of_kind(documents, "Deployment"):
        (container,) = pod_spec(deployment)["containers"]
        restarting = {kind: container[kind] for kind in ("startupProbe", "livenessProbe") if kind in container}
        assert "livenessProbe" in restarting, deployment["metadata"]["name"]
        for kind, probe in restarting.items():
            assert probe["httpGet"]["path"] == "/livez", f"{deployment['metadata']['name']}: {kind}"


def test_scorers_request_a_gpu_and_mount_the_model_read_only(documents: list[dict[str, Any]]) -> None:
    (scorer,) = [
        d for d in of_kind(documents, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "score"
    ]
    spec = pod_spec(scorer)
    (container,) = spec["containers"]
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert mounts["models"]["readOnly"] is True
    assert volumes["models"]["persistentVolumeClaim"]["readOnly"] is True
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    (pvc,) = [doc for doc in of_kind(documents, "PersistentVolumeClaim") if doc["metadata"]["name"] == claim]
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    model_arg = container["args"][container["args"].index("--model") + 1]
    assert model_arg.startswith(mounts["models"]["mountPath"] + "/")


def test_keda_scales_scorers_on_the_frames_stream_lag(documents: list[dict[str, Any]]) -> None:
    (scaled,) = of_kind(documents, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    deployments = {doc["metadata"]["name"]: doc for doc in of_kind(documents, "Deployment")}
    target = deployments[spec["scaleTargetRef"]["name"]]
    assert target["metadata"]["labels"]["app.kubernetes.io/component"] == "score"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis-streams"
    metadata = trigger["metadata"]
    assert all(isinstance(value, str) for value in metadata.values())  # KEDA trigger metadata is a string map
    config = config_from_mapping(tomllib.loads(of_kind(documents, "ConfigMap")[0]["data"]["config.toml"]))
    line = target["metadata"]["labels"]["lineinspect.io/line"]
    assert metadata["stream"] == LineKeys(config.streams.prefix, line).frames
    assert metadata["consumerGroup"] == SCORER_GROUP
    lag_count = int(metadata["lagCount"])
    assert 0 < int(metadata["activationLagCount"]) <= lag_count
    # ingest holds the lag near ingest.live_queue_limit, so more replicas than limit / lagCount are unreachable
    assert spec["maxReplicaCount"] <= -(-config.ingest.live_queue_limit // lag_count)
    env_names = {item["name"] for item in pod_spec(target)["containers"][0]["env"]}
    assert metadata["addressFromEnv"] in env_names
    assert set(metadata) <= {
        "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "usernameFromEnv",
        "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount", "streamLength", "lagCount",
        "activationLagCount", "enableTLS", "unsafeSsl", "databaseIndex",
    }  # fmt: skip
