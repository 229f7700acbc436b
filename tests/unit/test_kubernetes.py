"""deploy/kubernetes/: offline checks of the kustomize base and the example overlay (no cluster needed).

The overlay is rendered with ``kubectl kustomize`` (skipped locally without kubectl, a failure when CI
is set), and every rendered object is checked:

* core kinds against the Kubernetes JSON schemas of ``kubernetes-validate`` (strict: an unknown or
  misspelled field is an error), for the oldest and the newest Kubernetes version it ships that we
  support;
* custom resources (KEDA's ScaledObject and TriggerAuthentication, the RabbitMQ Cluster Operator's
  RabbitmqCluster) against the OpenAPI schemas of their CRDs, vendored under deploy/kubernetes/crds/
  (see its README), made strict the same way (a field the CRD does not define is an error, as with
  ``kubectl apply --validate=strict``);
* what no schema knows: every container command parses with the lorafleet CLI (subcommands, flags,
  the environment the pod gets from its Secrets), queue, vhost, user and Secret names agree with
  lorafleet/transport/topology.py and broker_config/, every reference (Secret key, ConfigMap, PVC,
  scale target) resolves, the autoscaler counts what it must, and every pod is locked down.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import typer
import yaml

from lorafleet.app.cli import app
from lorafleet.transport import topology
from schemas.config import RunConfig, load_run_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
CRDS = K8S / "crds"
DEFINITIONS = ROOT / "broker_config" / "definitions.json"
RABBITMQ_CONF = ROOT / "broker_config" / "rabbitmq.conf"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
COMPOSE = ROOT / "compose" / "compose.yaml"

CI = bool(os.environ.get("CI"))
#: Kubernetes versions the manifests must be valid for (kubernetes-validate ships their schemas)
KUBERNETES_VERSIONS = ("1.30", "1.37")
#: custom resources: kind -> (apiVersion, vendored CRD file)
CUSTOM_RESOURCES = {
    "ScaledObject": ("keda.sh/v1alpha1", "keda.sh_scaledobjects.yaml"),
    "TriggerAuthentication": ("keda.sh/v1alpha1", "keda.sh_triggerauthentications.yaml"),
    "RabbitmqCluster": ("rabbitmq.com/v1beta1", "rabbitmq.com_rabbitmqclusters.yaml"),
}
#: lorafleet service -> the RabbitMQ user of its role (broker_config/definitions.json)
ROLES = {"orchestrator": "lf-orchestrator", "aggregator": "lf-aggregator", "worker": "lf-worker"}
SERVICES = tuple(ROLES)
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


# --------------------------------------------------------------------------- rendering


def render(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if CI:
            pytest.fail("kubectl is not installed and CI is set: `kubectl kustomize` renders the manifests")
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render(OVERLAY)


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def service(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The Deployment of a lorafleet service."""
    return named(objects, "Deployment", f"lorafleet-{name}")


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]  # type: ignore[no-any-return]


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def secret_values(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    """A rendered Secret's keys and values (stringData as written, data decoded)."""
    secret = named(objects, "Secret", name)
    values = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    values.update(secret.get("stringData") or {})
    return values


def env_of(objects: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, str]:
    """A container's environment, with secretKeyRef values read from the rendered Secrets."""
    env: dict[str, str] = {}
    for entry in spec.get("env") or []:
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
            continue
        ref = entry["valueFrom"].get("secretKeyRef")
        if ref is not None:
            values = secret_values(objects, ref["name"])
            if ref["key"] in values:
                env[entry["name"]] = values[ref["key"]]
            else:
                assert ref.get("optional"), f"{entry['name']}: Secret {ref['name']} has no key {ref['key']}"
    return env


@pytest.fixture(scope="module")
def cli() -> Any:
    """The CLI as a click group (typer vendors click: duck-typed, not ``click.Group``)."""
    group = typer.main.get_command(app)
    assert isinstance(getattr(group, "commands", None), dict)
    return group


@pytest.fixture(scope="module")
def run_config(objects: list[dict[str, Any]]) -> RunConfig:
    text = run_yaml(objects)
    return load_run_config_text(text)


def run_yaml(objects: list[dict[str, Any]]) -> str:
    maps = [
        o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].startswith("lorafleet-run-config")
    ]
    assert len(maps) == 1, [o["metadata"]["name"] for o in maps]
    return maps[0]["data"]["run.yaml"]  # type: ignore[no-any-return]


def load_run_config_text(text: str) -> RunConfig:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(text, encoding="utf-8")
        return load_run_config(path)


# --------------------------------------------------------------------------- schemas


def test_renders_every_part(objects: list[dict[str, Any]]) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for expected in [
        ("Namespace", "lorafleet"),
        ("Deployment", "lorafleet-orchestrator"),
        ("Deployment", "lorafleet-aggregator"),
        ("Deployment", "lorafleet-worker"),
        ("PersistentVolumeClaim", "lorafleet-runs"),
        ("ScaledObject", "lorafleet-worker"),
        ("TriggerAuthentication", "lorafleet-keda-rabbitmq"),
        ("RabbitmqCluster", "lorafleet-rabbitmq"),
        ("StatefulSet", "lorafleet-redis"),
        ("Secret", "lorafleet-rabbitmq-definitions"),
    ]:
        assert expected in kinds, expected
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"lorafleet"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_match_the_kubernetes_schemas(objects: list[dict[str, Any]], version: str) -> None:
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import SchemaNotFoundError
    except ModuleNotFoundError:
        if CI:
            pytest.fail("kubernetes-validate (test extra) is not installed and CI is set")
        pytest.skip("kubernetes-validate is not installed: pip install -e '.[test]'")
    errors = []
    for obj in objects:
        if obj["kind"] in CUSTOM_RESOURCES:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}")
        except SchemaNotFoundError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)


def strict_schema(schema: Any) -> Any:
    """A CRD's OpenAPI schema as JSON Schema that rejects unknown fields: every object with
    ``properties`` and no ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields`` gets
    ``additionalProperties: false`` (the API server prunes such fields silently; strict field
    validation reports them). ``nullable: true`` also admits null."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_schema(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def crd_schema(kind: str) -> dict[str, Any]:
    api_version, filename = CUSTOM_RESOURCES[kind]
    group, version = api_version.split("/")
    crd = yaml.safe_load((CRDS / filename).read_text(encoding="utf-8"))
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    schema = copy.deepcopy(served["schema"]["openAPIV3Schema"])
    return strict_schema(schema)  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", sorted(CUSTOM_RESOURCES))
def test_custom_resources_match_their_vendored_crds(objects: list[dict[str, Any]], kind: str) -> None:
    import jsonschema

    rendered = of_kind(objects, kind)
    assert rendered, f"no {kind} rendered"
    validator = jsonschema.Draft7Validator(crd_schema(kind))
    errors = []
    for obj in rendered:
        assert obj["apiVersion"] == CUSTOM_RESOURCES[kind][0]
        errors += [
            f"{kind}/{obj['metadata']['name']}: {'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
    assert not errors, "\n".join(errors)


def test_every_vendored_crd_names_its_source() -> None:
    readme = (CRDS / "README.md").read_text(encoding="utf-8")
    vendored = sorted(p.name for p in CRDS.glob("*.yaml"))
    assert vendored == sorted(f for _, f in CUSTOM_RESOURCES.values())
    for name in vendored:
        row = next((line for line in readme.splitlines() if f"`{name}`" in line), None)
        assert row is not None, f"crds/README.md does not list {name}"
        assert re.search(r"github\.com/[\w.-]+/[\w.-]+", row), f"{name}: no source repository"
        assert re.search(r"config/crd/bases/", row), f"{name}: no path in the repository"
        assert re.search(r"v\d+\.\d+\.\d+", row), f"{name}: no version"


# --------------------------------------------------------------------------- the lorafleet CLI


def lorafleet_containers(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for workload in workloads(objects):
        spec = workload["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            if (c.get("command") or [""])[0] == "lorafleet":
                yield workload["metadata"]["name"], c


def test_every_lorafleet_container_runs_a_cli_command(objects: list[dict[str, Any]], cli: Any) -> None:
    seen = set()
    for name, c in lorafleet_containers(objects):
        assert c["command"] == ["lorafleet"], name
        args = c["args"]
        assert args[0] in cli.commands, f"{name}: `lorafleet {args[0]}` is not a subcommand"
        sub = cli.commands[args[0]]
        flags = {opt for param in sub.params for opt in (*param.opts, *param.secondary_opts)}
        for arg in args[1:]:
            if arg.startswith("-"):
                flag = arg.split("=", 1)[0]
                assert flag in flags, f"{name}: `lorafleet {args[0]}` has no option {flag}"
        seen.add(args[0])
    assert seen == set(SERVICES)


@pytest.mark.parametrize("name", SERVICES)
def test_cli_parses_the_command_with_the_pod_environment(
    objects: list[dict[str, Any]], cli: Any, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Click parses the container's command line (types, required options, env-var fallbacks from the
    example Secrets) exactly as in the pod, without running it."""
    for key in list(os.environ):
        if key.startswith("LORAFLEET_"):
            monkeypatch.delenv(key)
    c = container(service(objects, name))
    for key, value in env_of(objects, c).items():
        monkeypatch.setenv(key, value)
    args = c["args"]
    sub = cli.commands[args[0]]
    try:
        ctx = sub.make_context(args[0], list(args[1:]))
    except Exception as exc:  # click's UsageError/BadParameter/MissingParameter/NoSuchOption
        message = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
        pytest.fail(f"{name}: `lorafleet {shlex.join(args)}` does not parse: {message}")
    assert ctx.params["config"] == Path("/config/run.yaml")
    if name != "worker":
        assert ctx.params["out"] == Path("/runs")
    ctx.close()


def test_the_run_configuration_is_the_quickstart(
    objects: list[dict[str, Any]], run_config: RunConfig
) -> None:
    assert run_yaml(objects) == QUICKSTART.read_text(encoding="utf-8")
    assert (BASE / "run.yaml").read_bytes() == QUICKSTART.read_bytes()
    for name in SERVICES:
        pod = service(objects, name)["spec"]["template"]["spec"]
        [config] = [v for v in pod["volumes"] if v["name"] == "config"]
        assert config["configMap"]["name"].startswith("lorafleet-run-config-")  # the generated, hashed one
        mounts = {m["mountPath"]: m for m in container(service(objects, name))["volumeMounts"]}
        assert mounts["/config"]["name"] == "config" and mounts["/config"]["readOnly"] is True
    assert run_config.devices.count >= 1


# --------------------------------------------------------------------------- names and references


def test_definitions_secret_is_broker_configs_file(objects: list[dict[str, Any]]) -> None:
    assert (OVERLAY / "definitions.json").read_bytes() == DEFINITIONS.read_bytes()
    values = secret_values(objects, "lorafleet-rabbitmq-definitions")
    assert json.loads(values["definitions.json"]) == json.loads(DEFINITIONS.read_text(encoding="utf-8"))


def _rabbitmq_conf(text: str) -> dict[str, str]:
    pairs = (
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def test_rabbitmq_cluster(objects: list[dict[str, Any]]) -> None:
    cluster = named(objects, "RabbitmqCluster", "lorafleet-rabbitmq")
    spec = cluster["spec"]
    assert spec["replicas"] == 3
    conf = _rabbitmq_conf(spec["rabbitmq"]["additionalConfig"])
    ours = _rabbitmq_conf(RABBITMQ_CONF.read_text(encoding="utf-8"))
    for key in ("max_message_size", "consumer_timeout", "heartbeat", "definitions.import_backend"):
        assert conf[key] == ours[key], key
    # the definitions file is where the config says, from the Secret the overlay generates
    pod = spec["override"]["statefulSet"]["spec"]["template"]["spec"]
    [mount] = [m for c in pod["containers"] if c["name"] == "rabbitmq" for m in c["volumeMounts"]]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    [item] = volume["secret"]["items"]
    assert conf["definitions.local.path"] == f"{mount['mountPath']}/{item['path']}"
    assert item["key"] in secret_values(objects, volume["secret"]["secretName"])
    # the queues lorafleet relies on are quorum queues, lf.slots excepted (classic by design)
    definitions = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    queues = {q["name"]: q["arguments"] for q in definitions["queues"] if q["vhost"] == topology.VHOST}
    for name in (topology.UPDATES_QUEUE, topology.ORCHESTRATOR_QUEUE, topology.DEAD_LETTER_QUEUE):
        assert queues[name].get("x-queue-type") == "quorum", name
    assert queues[topology.SLOTS_QUEUE].get("x-queue-type", "classic") == "classic"


def _broker_urls(value: str) -> list[Any]:
    return [urlsplit(url.strip()) for url in value.split(",")]


def _password_matches(definitions: dict[str, Any], user: str, password: str) -> bool:
    [entry] = [u for u in definitions["users"] if u["name"] == user]
    raw = base64.b64decode(entry["password_hash"])
    return hashlib.sha256(raw[:4] + password.encode()).digest() == raw[4:]


@pytest.mark.parametrize("name", SERVICES)
def test_broker_urls_name_the_roles_user_and_the_vhost(objects: list[dict[str, Any]], name: str) -> None:
    definitions = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    env = env_of(objects, container(service(objects, name)))
    urls = _broker_urls(env["LORAFLEET_BROKER_URL"])
    assert len(urls) == 3, "one URL per RabbitMQ node"
    cluster = named(objects, "RabbitmqCluster", "lorafleet-rabbitmq")["metadata"]["name"]
    hosts = [u.hostname for u in urls]
    assert hosts == [f"{cluster}-server-{i}.{cluster}-nodes" for i in range(3)]
    for url in urls:
        assert url.scheme == "amqp" and url.port == 5672
        assert unquote(url.path.lstrip("/")) == topology.VHOST
        assert url.username == ROLES[name], f"{name} connects as {url.username}"
        assert url.password is not None and _password_matches(
            definitions, url.username, unquote(url.password)
        )
    permissions = {p["user"] for p in definitions["permissions"] if p["vhost"] == topology.VHOST}
    assert ROLES[name] in permissions


def test_state_url_is_the_redis_master_service(objects: list[dict[str, Any]]) -> None:
    password = secret_values(objects, "lorafleet-redis")["password"]
    proxy = named(objects, "Service", "lorafleet-redis")
    for name in ("orchestrator", "aggregator"):
        url = urlsplit(env_of(objects, container(service(objects, name)))["LORAFLEET_STATE_URL"])
        assert url.scheme == "redis" and url.hostname == proxy["metadata"]["name"]
        assert url.port == proxy["spec"]["ports"][0]["port"] == 6379
        assert unquote(url.password or "") == password


def test_workers_get_the_broker_only(objects: list[dict[str, Any]]) -> None:
    worker = service(objects, "worker")
    c = container(worker)
    assert "--device-id" not in c["args"], "workers claim a free device slot: no --device-id"
    assert "LORAFLEET_DEVICE_ID" not in {e["name"] for e in c.get("env", [])}
    assert "LORAFLEET_STATE_URL" not in {e["name"] for e in c.get("env", [])}
    assert "redis" not in json.dumps(worker).lower()
    assert "redis" not in json.dumps(secret_values(objects, "lorafleet-worker")).lower()


def test_every_reference_resolves(objects: list[dict[str, Any]]) -> None:
    configmaps = {o["metadata"]["name"]: o for o in of_kind(objects, "ConfigMap")}
    claims = {o["metadata"]["name"] for o in of_kind(objects, "PersistentVolumeClaim")}
    for workload in workloads(objects):
        where = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod.get("initContainers", []) + pod["containers"]:
            env_of(objects, c)  # every secretKeyRef names a Secret and (unless optional) its key
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in templates, f"{where}: {mount['name']}"
        for volume in volumes.values():
            if "configMap" in volume:
                cm = configmaps.get(volume["configMap"]["name"])
                assert cm is not None, f"{where}: no ConfigMap {volume['configMap']['name']}"
                for item in volume["configMap"].get("items", []):
                    assert item["key"] in cm["data"], f"{where}: {item['key']}"
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, where
            if "secret" in volume:
                secret_values(objects, volume["secret"]["secretName"])
        assert (
            workload["spec"]["selector"]["matchLabels"].items()
            <= workload["spec"]["template"]["metadata"]["labels"].items()
        )
    for svc in of_kind(objects, "Service"):
        selector = svc["spec"]["selector"].items()
        assert any(
            selector <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads(objects)
        ), f"Service {svc['metadata']['name']} selects no pods"


# --------------------------------------------------------------------------- the services


@pytest.mark.parametrize("name", ["orchestrator", "aggregator"])
def test_orchestrator_and_aggregator_are_singletons_with_the_output_volume(
    objects: list[dict[str, Any]], name: str
) -> None:
    deployment = service(objects, name)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    c = container(deployment)
    out = c["args"][c["args"].index("--out") + 1]
    [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == out]
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "lorafleet-runs"
    assert not mount.get("readOnly")


def test_worker_scaling(objects: list[dict[str, Any]], run_config: RunConfig) -> None:
    """One worker per device slot of the run, counted as ready + unacknowledged tokens of lf.slots."""
    worker = service(objects, "worker")
    assert "replicas" not in worker["spec"], "the HPA owns the worker count; a replicas field fights it"
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    scaled = named(objects, "ScaledObject", "lorafleet-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert scaled["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert scaled["minReplicaCount"] == 0
    assert scaled["maxReplicaCount"] == run_config.devices.count
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "rabbitmq"
    meta = trigger["metadata"]
    assert meta["mode"] == "QueueLength"
    assert meta["queueName"] == topology.SLOTS_QUEUE
    assert meta["vhostName"] == topology.VHOST
    assert float(meta["value"]) == 1.0
    # ready + unacknowledged: claimed slots must keep their workers (see worker-autoscaling.yaml)
    assert meta["protocol"] == "http"
    assert str(meta.get("excludeUnacknowledged", "false")).lower() == "false"
    auth = named(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    [ref] = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host"
    host = urlsplit(secret_values(objects, ref["name"])[ref["key"]])
    assert host.scheme == "http" and host.port == 15672
    cluster = named(objects, "RabbitmqCluster", "lorafleet-rabbitmq")["metadata"]
    assert host.hostname == f"{cluster['name']}.{cluster['namespace']}.svc"
    definitions = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    assert _password_matches(definitions, host.username or "", unquote(host.password or ""))


def test_pods_are_locked_down_and_sized(objects: list[dict[str, Any]]) -> None:
    for workload in workloads(objects):
        where = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] != 0, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod["automountServiceAccountToken"] is False, where
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), (where, c["name"], bound)
        for c in pod["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, (where, c["name"])


def test_lorafleet_image_is_the_compose_image(objects: list[dict[str, Any]]) -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    compose_image = compose["x-lorafleet"]["image"]
    assert compose_image.split(":")[0] == "lorafleet"
    assert "compose/Dockerfile" in compose["x-lorafleet"]["build"]["dockerfile"]
    images = {c["image"] for _, c in lorafleet_containers(objects)}
    assert images == {"registry.example.com/lorafleet:0.1.0"}, images
    base = (BASE / "kustomization.yaml").read_text(encoding="utf-8")
    assert re.search(r"-\s*name:\s*lorafleet\b", base), "the base names the image `lorafleet` (compose's)"


def test_redis_runs_with_replicas_and_sentinel(objects: list[dict[str, Any]]) -> None:
    redis = named(objects, "StatefulSet", "lorafleet-redis")
    assert redis["spec"]["replicas"] == 3
    names = {c["name"] for c in redis["spec"]["template"]["spec"]["containers"]}
    assert names == {"redis", "sentinel"}
    headless = named(objects, "Service", redis["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    scripts = named(objects, "ConfigMap", "lorafleet-redis-scripts")["data"]
    configure = scripts["configure.sh"]
    assert f".{headless['metadata']['name']}" in configure
    assert re.search(r"sentinel monitor lorafleet \S+ 6379 2\b", configure)
    assert "maxmemory-policy noeviction" in configure
    sh = shutil.which("sh")
    if sh is not None:  # the script is valid shell
        result = subprocess.run([sh, "-n"], input=configure, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
    haproxy = scripts["haproxy.cfg"]
    servers = re.findall(r"server redis-(\d) \"lorafleet-redis-\1\.(\S+?)\.", haproxy)
    assert [s for s, _ in servers] == ["0", "1", "2"]
    assert {svc for _, svc in servers} == {headless["metadata"]["name"]}
    assert "expect string role:master" in haproxy


# --------------------------------------------------------------------------- probes


def _probe_script(objects: list[dict[str, Any]]) -> list[str]:
    probe = container(service(objects, "worker"))["livenessProbe"]["exec"]["command"]
    assert probe[:2] == ["python", "-c"]
    return list(probe)


def test_probe_detects_the_broker_connection(objects: list[dict[str, Any]]) -> None:
    """The exec probe passes with an established connection to the port it names and fails without."""
    command = _probe_script(objects)
    assert command[3:] == ["5672"]
    script = command[2]
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        run = [sys.executable, "-c", script]
        assert subprocess.run([*run, str(port)], check=False, timeout=30).returncode == 1
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = server.accept()
            with accepted:
                assert subprocess.run([*run, str(port)], check=False, timeout=30).returncode == 0
    for name in SERVICES:
        c = container(service(objects, name))
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[kind]["exec"]["command"] == command, (name, kind)
