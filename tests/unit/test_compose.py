"""compose/: offline checks of compose.yaml, the Dockerfile and .env.example (no Docker engine needed).

Three layers, because each catches what the others miss:

* the compose-spec JSON schema (vendored by check-jsonschema), listing every error at once, after
  interpolating variables from compose/.env.example the way compose does;
* structural checks the schema cannot express: depends_on targets, integer replicas, commands that
  the lorafleet CLI really parses, least privilege for workers, required secrets, mounted files;
* the real docker compose v2 binary (`config -q`), when installed by compose/fetch_compose_binary.sh:
  skipped locally without it, a failure when CI is set.
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
import subprocess
import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from lorafleet.app.cli import app

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
DOCKERIGNORE = COMPOSE_DIR / "Dockerfile.dockerignore"
DEFINITIONS = ROOT / "broker_config" / "definitions.json"
RABBITMQ_CONF = ROOT / "broker_config" / "rabbitmq.conf"
REDIS_ACL_TEMPLATE = ROOT / "broker_config" / "redis-users.acl.template"
REDIS_START = ROOT / "broker_config" / "redis-start.sh"

CI = bool(os.environ.get("CI"))
SECRETS = (
    "LF_REDIS_ORCHESTRATOR_PASSWORD",
    "LF_REDIS_AGGREGATOR_PASSWORD",
    "LF_REDIS_ADMIN_PASSWORD",
    "LF_AMQP_ORCHESTRATOR_PASSWORD",
    "LF_AMQP_AGGREGATOR_PASSWORD",
    "LF_AMQP_WORKER_PASSWORD",
)
LORAFLEET_SERVICES = ("orchestrator", "aggregator", "worker")
AMQP_USERS = {
    "orchestrator": "lf-orchestrator",
    "aggregator": "lf-aggregator",
    "worker": "lf-worker",
}


def _unavailable(what: str) -> None:
    if CI:
        pytest.fail(f"{what} and CI is set: run `bash compose/fetch_compose_binary.sh` first (see .ci/run)")
    pytest.skip(what)


# --------------------------------------------------------------------------- interpolation


class InterpolationError(ValueError):
    pass


_REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable interpolation, minus nesting: ``$$``, ``$VAR``, ``${VAR}``,
    ``${VAR:-default}``/``${VAR-default}``, ``${VAR:?message}``/``${VAR?message}``, ``${VAR:+alt}``/
    ``${VAR+alt}``. ``:`` forms treat an empty value like an unset one."""

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        braced = _BRACED.fullmatch(match["braced"])
        if braced is None:
            raise InterpolationError(f"invalid interpolation format: {match[0]!r}")
        name, op, arg = braced["name"], braced["op"], braced["arg"] or ""
        value = env.get(name)
        present = value is not None and (value != "" or not (op or "").startswith(":"))
        if op is None:
            return value or ""
        if op.endswith("-"):
            return value if present else arg  # type: ignore[return-value]
        if op.endswith("?"):
            if not present:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return value  # type: ignore[return-value]
        return arg if present else ""  # "+"

    return _REFERENCE.sub(one, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value (not keys), as compose does after parsing the YAML."""
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(value, env) for value in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def volumes(service: dict[str, Any]) -> list[dict[str, Any]]:
    """A service's volumes in long syntax (short ``source:target[:ro]`` entries converted)."""
    out = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            out.append(volume)
            continue
        parts = volume.split(":")
        source, target = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
        bind = source is not None and source.startswith((".", "/", "~"))
        out.append(
            {
                "type": "bind" if bind else "volume",
                "source": source,
                "target": target,
                "read_only": len(parts) > 2 and "ro" in parts[2].split(","),
            }
        )
    return out


def strings(node: Any) -> list[str]:
    """Every string value in a parsed YAML tree (what compose interpolates)."""
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return [node] if isinstance(node, str) else []


def referenced_variables(raw: dict[str, Any]) -> set[str]:
    return {
        m["named"] or _BRACED.fullmatch(m["braced"])["name"]  # type: ignore[index]
        for text in strings(raw)
        for m in _REFERENCE.finditer(text)
        if not m["escaped"]
    }


def test_interpolator_follows_compose_rules() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("a$$b ${SET} $SET ${UNSET}", env) == "a$b v v "
    assert interpolate("${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${SET:-d}", env) == "d d  v"
    assert interpolate("${SET:+alt} ${EMPTY:+alt} ${EMPTY+alt}", env) == "alt  alt"
    assert interpolate("${SET:?boom}", env) == "v"
    with pytest.raises(InterpolationError, match="EMPTY.*boom"):
        interpolate("${EMPTY:?boom}", env)
    assert interpolate("${EMPTY?boom}", env) == ""
    with pytest.raises(InterpolationError, match="UNSET"):
        interpolate("${UNSET?boom}", env)


# --------------------------------------------------------------------------- fixtures


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        env[key.strip()] = value.strip()
    return env


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """compose.yaml as parsed (merge keys resolved), before interpolation."""
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any], example_env: dict[str, str]) -> dict[str, Any]:
    """compose.yaml interpolated with compose/.env.example."""
    return interpolate_tree(copy.deepcopy(raw), example_env)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def cli() -> Any:
    """The CLI as a click group (typer vendors click: duck-typed, not ``click.Group``)."""
    group = typer.main.get_command(app)
    assert isinstance(getattr(group, "commands", None), dict)
    return group


# --------------------------------------------------------------------------- schema


def _compose_schema() -> dict[str, Any]:
    try:
        ref = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    except ModuleNotFoundError:
        if CI:
            pytest.fail("check-jsonschema (test extra) is not installed and CI is set")
        pytest.skip("check-jsonschema is not installed: pip install -e '.[test]'")
    return json.loads(ref.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _schema_errors(document: dict[str, Any]) -> list[str]:
    import jsonschema

    schema = _compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema)
    return sorted(
        f"{'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator.iter_errors(document)
    )


def test_compose_file_matches_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    errors = _schema_errors(compose)
    assert not errors, "compose.yaml fails the compose-spec schema:\n" + "\n".join(errors)


def test_schema_check_is_not_vacuous(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["restartt"] = "on-failure"
    broken["services"]["redis"]["healthcheck"]["interval"] = ["10s"]
    errors = _schema_errors(broken)
    assert any("restartt" in e for e in errors), errors
    assert any("healthcheck/interval" in e for e in errors), errors


# --------------------------------------------------------------------------- structure


def test_services_and_top_level(compose: dict[str, Any]) -> None:
    assert compose["name"] == "lorafleet"
    assert set(compose["services"]) == {"rabbitmq", "redis", *LORAFLEET_SERVICES}
    declared_volumes = set(compose.get("volumes") or {})
    declared_networks = set(compose.get("networks") or {})
    for name, service in compose["services"].items():
        for volume in volumes(service):
            if volume["type"] == "volume":
                assert volume["source"] in declared_volumes, f"{name}: volume {volume['source']!r} undeclared"
        for network in service.get("networks") or []:
            assert network in declared_networks, f"{name}: network {network!r} is not declared"


def test_depends_on_targets_exist_and_wait_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        targets = depends if isinstance(depends, dict) else {t: {} for t in depends}
        for target, spec in targets.items():
            assert target in services, f"{name} depends on undefined service {target!r}"
            assert target != name
            assert spec.get("condition") == "service_healthy", f"{name} -> {target}: {spec}"
            assert "healthcheck" in services[target], f"{name} waits for {target}, which has no healthcheck"
    assert set(services["orchestrator"]["depends_on"]) == {"rabbitmq", "redis"}
    assert set(services["aggregator"]["depends_on"]) == {"rabbitmq", "redis"}
    assert set(services["worker"]["depends_on"]) == {"rabbitmq"}


def test_healthchecks(compose: dict[str, Any]) -> None:
    for name, probe in (("rabbitmq", "rabbitmq-diagnostics"), ("redis", "redis-cli")):
        check = compose["services"][name]["healthcheck"]
        assert probe in " ".join(check["test"]), check
        for key in ("interval", "timeout", "retries", "start_period"):
            assert key in check, f"{name}.healthcheck.{key} is not set"


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert re.fullmatch(r"rabbitmq:4\.\d+\.\d+-management(-alpine)?", services["rabbitmq"]["image"])
    assert re.fullmatch(r"redis:7\.\d+\.\d+(-[a-z0-9]+)?", services["redis"]["image"])
    for name in LORAFLEET_SERVICES:
        build = services[name]["build"]
        assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_redis_never_evicts_and_persists(raw: dict[str, Any], compose: dict[str, Any]) -> None:
    command = " ".join(compose["services"]["redis"]["command"])
    for flag in (
        "--appendonly yes",
        "--appendfsync everysec",
        "--maxmemory-policy noeviction",
    ):
        assert flag in command, f"redis command lacks {flag!r}: {command}"
    assert any(v["target"] == "/data" for v in volumes(compose["services"]["redis"]))


def _start_script_default(name: str) -> str:
    """The default of ``${name:-...}`` in broker_config/redis-start.sh."""
    match = re.search(r"\$\{" + name + r":-([^}]+)\}", REDIS_START.read_text())
    assert match, f"redis-start.sh has no default for {name}"
    return match[1]


def test_redis_loads_the_acl_users(raw: dict[str, Any], compose: dict[str, Any]) -> None:
    """Redis starts on broker_config/redis-users.acl.template, rendered with the passwords at container
    start (redis-start.sh), not on one --requirepass shared by every client."""
    redis_service = compose["services"]["redis"]
    command = [str(c) for c in redis_service["command"]]
    assert "--requirepass" not in command, "one shared password: the ACL file's users replace it"
    mounts = {v["target"]: v for v in volumes(redis_service)}
    script, template = "/etc/lorafleet/redis-start.sh", _start_script_default("LF_REDIS_ACL_TEMPLATE")
    for target, source in ((script, REDIS_START), (template, REDIS_ACL_TEMPLATE)):
        assert (COMPOSE_DIR / mounts[target]["source"]).resolve() == source, target
        assert mounts[target]["read_only"] is True
    assert redis_service["entrypoint"] == ["/bin/sh", script]
    # the script renders, then runs the image's own entrypoint (which drops to the redis user)
    assert command[:2] == ["docker-entrypoint.sh", "redis-server"], command
    aclfile = _start_script_default("LF_REDIS_ACL_FILE")
    assert command[command.index("--aclfile") + 1] == aclfile
    # the rendered file (passwords) lives in memory only
    assert any(aclfile.startswith(path.split(":")[0].rstrip("/") + "/") for path in redis_service["tmpfs"])
    # every password the template names reaches the container, and is required
    rules = [line for line in REDIS_ACL_TEMPLATE.read_text().splitlines() if not line.startswith("#")]
    placeholders = {name for line in rules for name in re.findall(r"\$\{([A-Z_]+)\}", line)}
    assert placeholders == {
        "LF_REDIS_ORCHESTRATOR_PASSWORD",
        "LF_REDIS_AGGREGATOR_PASSWORD",
        "LF_REDIS_ADMIN_PASSWORD",
    }
    environment = raw["services"]["redis"]["environment"]
    for name in placeholders:
        assert environment[name].startswith("${" + name + ":?"), environment[name]
    # the health check logs in as the admin user, its password from REDISCLI_AUTH (not a command line)
    assert "--user lf-admin" in " ".join(redis_service["healthcheck"]["test"])
    assert raw["services"]["redis"]["environment"]["REDISCLI_AUTH"].startswith("${LF_REDIS_ADMIN_PASSWORD:?")


def test_worker_replicas_is_an_int(raw: dict[str, Any], compose: dict[str, Any]) -> None:
    replicas = compose["services"]["worker"]["deploy"]["replicas"]
    if isinstance(replicas, str):
        assert re.fullmatch(r"\d+", replicas), f"deploy.replicas interpolates to {replicas!r}"
    else:
        assert isinstance(replicas, int) and not isinstance(replicas, bool)
    assert int(replicas) >= 1
    # and with the variable unset (its default) or set
    raw_replicas = str(raw["services"]["worker"]["deploy"]["replicas"])
    for env in ({}, {"LORAFLEET_WORKERS": "3"}):
        assert re.fullmatch(r"\d+", interpolate(raw_replicas, env)), raw_replicas


def test_restart_and_stop_policies(compose: dict[str, Any]) -> None:
    for name in LORAFLEET_SERVICES:
        service = compose["services"][name]
        assert service["restart"] == "on-failure", name
        assert "stop_grace_period" in service, name


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


@pytest.mark.parametrize("name", LORAFLEET_SERVICES)
def test_command_is_a_real_cli_invocation(compose: dict[str, Any], cli: Any, name: str) -> None:
    service = compose["services"][name]
    assert "entrypoint" not in service
    args = _command(service)
    assert args[0] == "lorafleet", f"{name}: command must start with lorafleet: {args}"
    assert args[1] == name, f"{name}: runs `lorafleet {args[1]}`"
    sub = cli.commands.get(args[1])
    assert sub is not None, f"{name}: `lorafleet {args[1]}` is not a command (have {sorted(cli.commands)})"
    known = {opt for param in sub.params for opt in (*param.opts, *param.secondary_opts)}
    for token in args[2:]:
        if token.startswith("-"):
            assert token.split("=", 1)[0] in known, f"{name}: `lorafleet {args[1]}` has no option {token}"
    # the config argument is the mounted run configuration
    targets = {v["target"]: v for v in volumes(service)}
    assert "/config/run.yaml" in args
    assert targets["/config/run.yaml"]["read_only"] is True


@pytest.mark.parametrize("name", LORAFLEET_SERVICES)
def test_cli_parses_the_command_with_the_service_environment(
    compose: dict[str, Any], cli: Any, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Click parses the command line (types, required options, env-var fallbacks) exactly as in the
    container, without running it."""
    for key in list(os.environ):
        if key.startswith("LORAFLEET_"):
            monkeypatch.delenv(key)
    environment = compose["services"][name].get("environment") or {}
    assert isinstance(environment, dict), f"{name}: use the mapping form of environment"
    for key, value in environment.items():
        monkeypatch.setenv(key, str(value))
    args = _command(compose["services"][name])
    sub = cli.commands[args[1]]
    try:
        ctx = sub.make_context(args[1], args[2:])
    except Exception as exc:  # click's UsageError/BadParameter/MissingParameter/NoSuchOption
        message = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
        pytest.fail(f"{name}: `{shlex.join(args)}` does not parse: {message}")
    ctx.close()


@pytest.mark.parametrize("name", LORAFLEET_SERVICES)
def test_broker_and_state_urls(compose: dict[str, Any], example_env: dict[str, str], name: str) -> None:
    env = compose["services"][name]["environment"]
    user = AMQP_USERS[name]
    password = example_env[f"LF_AMQP_{name.upper()}_PASSWORD"]
    assert env["LORAFLEET_BROKER_URL"] == f"amqp://{user}:{password}@rabbitmq:5672/lorafleet"
    assert env["LORAFLEET_DATA_DIR"] == "/data-sets"
    assert str(env["HF_HUB_OFFLINE"]) == "1"
    if name != "worker":
        # each service logs in to Redis as its own ACL user (broker_config/redis-users.acl.template)
        redis_password = example_env[f"LF_REDIS_{name.upper()}_PASSWORD"]
        assert env["LORAFLEET_STATE_URL"] == f"redis://lf-{name}:{redis_password}@redis:6379/0"
        assert any(v["target"] == "/runs" for v in volumes(compose["services"][name]))
        assert "--out" in _command(compose["services"][name])


def test_worker_has_no_redis_access(raw: dict[str, Any]) -> None:
    worker = raw["services"]["worker"]
    text = json.dumps(worker).lower()
    assert "redis" not in text, f"the worker service mentions redis: {worker}"
    assert "LORAFLEET_STATE_URL" not in (worker.get("environment") or {})
    assert "--device-id" not in _command(worker), "workers claim a free device slot: no --device-id"


def test_secrets_are_required(raw: dict[str, Any]) -> None:
    text = "\n".join(strings(raw))
    for secret in SECRETS:
        references = re.findall(r"\$\{" + secret + r"([^}]*)\}", text)
        assert references, f"{secret} is never used"
        for rest in references:
            assert rest.startswith(":?") and len(rest) > 2, (
                f"${{{secret}{rest}}} must be ${{{secret}:?message}}"
            )


@pytest.mark.parametrize("secret", SECRETS)
def test_missing_secret_fails_interpolation(
    raw: dict[str, Any], example_env: dict[str, str], secret: str
) -> None:
    for env in ({k: v for k, v in example_env.items() if k != secret}, {**example_env, secret: ""}):
        with pytest.raises(InterpolationError, match=secret):
            interpolate_tree(raw, env)


def test_mounted_host_files_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in volumes(service):
            if volume["type"] != "bind":
                continue
            source = (COMPOSE_DIR / volume["source"]).resolve()
            if not source.is_relative_to(ROOT):
                continue  # outside the repository (the data sets): checked by compose at `up`
            assert source.exists(), f"{name}: {volume['source']} -> {source} does not exist"
            assert volume.get("bind", {}).get("create_host_path") is False, (
                f"{name}: {volume['source']}: a missing file would be created as a directory"
            )


def test_rabbitmq_loads_the_broker_config(compose: dict[str, Any]) -> None:
    mounts = {v["target"]: v for v in volumes(compose["services"]["rabbitmq"])}
    conf, definitions = mounts["/etc/rabbitmq/rabbitmq.conf"], mounts["/etc/rabbitmq/definitions.json"]
    assert (COMPOSE_DIR / conf["source"]).resolve() == RABBITMQ_CONF
    assert (COMPOSE_DIR / definitions["source"]).resolve() == DEFINITIONS
    assert conf["read_only"] is True and definitions["read_only"] is True
    assert mounts["/var/lib/rabbitmq"]["type"] == "volume"
    assert "definitions.local.path = /etc/rabbitmq/definitions.json" in RABBITMQ_CONF.read_text()
    assert compose["services"]["rabbitmq"].get("hostname"), "the node name must not change between containers"


def _rabbit_sha256_matches(password: str, password_hash: str) -> bool:
    raw = base64.b64decode(password_hash)
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


def test_example_passwords_match_the_committed_definitions(example_env: dict[str, str]) -> None:
    users = {u["name"]: u for u in json.loads(DEFINITIONS.read_text())["users"]}
    for service, user in AMQP_USERS.items():
        password = example_env[f"LF_AMQP_{service.upper()}_PASSWORD"]
        assert users[user]["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert _rabbit_sha256_matches(password, users[user]["password_hash"]), (
            f"compose/.env.example's password for {user} does not match broker_config/definitions.json"
        )


def test_env_example_documents_every_variable(raw: dict[str, Any]) -> None:
    referenced = referenced_variables(raw)
    lines = ENV_EXAMPLE.read_text().splitlines()
    defined: dict[str, int] = {}
    for i, line in enumerate(lines):
        match = re.match(r"([A-Za-z_][A-Za-z0-9_]*)=", line)
        if match:
            defined[match[1]] = i
    assert referenced <= set(defined), f"not in .env.example: {sorted(referenced - set(defined))}"
    assert set(defined) <= referenced, f"unused in compose.yaml: {sorted(set(defined) - referenced)}"
    for name, i in defined.items():
        j = i - 1
        while j >= 0 and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", lines[j]):
            j -= 1  # a block of variables under one comment
        assert j >= 0 and lines[j].startswith("#"), f"{name} in .env.example has no comment above it"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comment lines dropped and continuation lines joined."""
    logical: list[str] = []
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    if current:
        logical.append(current)
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical if text.strip()]


def test_dockerfile_installs_cpu_torch_before_the_project() -> None:
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [(i, args) for i, (op, args) in enumerate(instructions) if op == "RUN"]
    torch = [i for i, args in runs if re.search(r"pip install (\S+ )*torch==2\.13\.0(\s|$)", args)]
    project = [i for i, args in runs if re.search(r"pip install (-\S+ )*\.(\s|$)", args)]
    assert torch, "no `pip install torch==2.13.0`"
    assert project, "no `pip install .`"
    assert torch[0] < project[0], "torch must be installed before the project"
    assert "-e " not in dict(runs)[project[0]], "the image installs the project, not an editable checkout"


def test_dockerfile_runs_unprivileged_offline_and_without_entrypoint() -> None:
    instructions = _dockerfile_instructions()
    ops = [op for op, _ in instructions]
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert "HF_HUB_OFFLINE=1" in env
    assert "ENTRYPOINT" not in ops, "compose commands are full `lorafleet ...` command lines"


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()}
    for needed in (".venv", ".git", "runs"):
        assert needed in patterns, f"{DOCKERIGNORE.name} lacks {needed}"
    assert any("__pycache__" in p for p in patterns)


# --------------------------------------------------------------------------- docker compose v2


def _compose_binary() -> list[str] | None:
    """A docker compose v2 command: the standalone binary, or the CLI plugin (run directly)."""
    candidates = [
        Path(sys.executable).parent / "docker-compose",
        shutil.which("docker-compose"),
        Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "cli-plugins" / "docker-compose",
        "/usr/local/lib/docker/cli-plugins/docker-compose",
        "/usr/libexec/docker/cli-plugins/docker-compose",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            try:
                out = subprocess.run(
                    [str(candidate), "version", "--short"], capture_output=True, text=True, timeout=10
                )
            except OSError:
                continue
            if out.returncode == 0 and out.stdout.strip().lstrip("v").startswith("2."):
                return [str(candidate)]
    return None


@pytest.fixture(scope="module")
def docker_compose() -> list[str]:
    binary = _compose_binary()
    if binary is None:
        _unavailable("the docker compose v2 binary is not installed")
    assert binary is not None
    return binary


def _run_compose(binary: list[str], env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Variables set in the shell win over the env file: drop every one compose.yaml references.
    referenced = referenced_variables(yaml.safe_load(COMPOSE_FILE.read_text()))
    env = {k: v for k, v in os.environ.items() if k not in referenced and not k.startswith("COMPOSE_")}
    return subprocess.run(
        [*binary, "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )


def test_docker_compose_config_accepts_the_file(docker_compose: list[str]) -> None:
    result = _run_compose(docker_compose, ENV_EXAMPLE, "config", "-q")
    assert result.returncode == 0, result.stderr
    result = _run_compose(docker_compose, ENV_EXAMPLE, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    worker = resolved["services"]["worker"]
    assert worker["deploy"]["replicas"] == 8
    assert not any("redis" in f"{k}={v}".lower() for k, v in worker["environment"].items())
    assert resolved["services"]["orchestrator"]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("secret", SECRETS)
def test_docker_compose_config_fails_without_a_secret(
    docker_compose: list[str], tmp_path: Path, secret: str
) -> None:
    env_file = tmp_path / "missing.env"
    env_file.write_text(
        "".join(line + "\n" for line in ENV_EXAMPLE.read_text().splitlines() if not line.startswith(secret))
    )
    result = _run_compose(docker_compose, env_file, "config", "-q")
    assert result.returncode != 0, f"config passed without {secret}"
    assert secret in result.stderr, result.stderr
