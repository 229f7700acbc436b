"""Authenticity of device reports: HMAC-SHA256 with a key per device (pure).

Each device's key is derived from one fleet key: ``key(d) = HMAC(fleet_key, "lorafleet-device:" + d)``.
The aggregator holds the fleet key and can check any device's signature; a provisioned edge
device holds only its own derived key (``lorafleet device-key``), so it cannot sign as another
device. Elastic replicas that may claim any slot are given the fleet key (they are one trust
domain). The signature covers every field the aggregator acts on, including the adapter's sha256,
so a changed payload, another device's identity or another task's id all fail verification. Updates,
failure reports and federated evaluation results (``EvalResult``) are signed alike.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from lorafleet.settings import Settings, env_name, load_settings
from schemas.errors import ConfigError
from schemas.messages import EvalResult, LoraUpdate, TaskFailed

#: The reports a device signs.
Report = LoraUpdate | TaskFailed | EvalResult

_DOMAIN = b"lorafleet-device:"

#: the variables (each also as ``NAME_FILE``) that hold the fleet's key and one device's own key
FLEET_KEY_ENV = env_name("fleet_key")
DEVICE_KEY_ENV = env_name("device_key")


def derive_device_key(fleet_key: bytes, device_id: str) -> bytes:
    """The key of ``device_id`` under ``fleet_key``."""
    return hmac.new(fleet_key, _DOMAIN + device_id.encode(), hashlib.sha256).digest()


def canonical(report: Report) -> bytes:
    """The bytes a signature covers (every field but the signature, in a fixed order)."""
    if isinstance(report, EvalResult):
        head = ["eval", report.run_id, str(report.round), report.device_id]
        fields = [*head, json.dumps(report.score.model_dump(mode="json"), sort_keys=True)]
    elif isinstance(report, LoraUpdate):
        head = ["update", report.task_id, report.run_id, str(report.round), report.device_id]
        body = [
            str(report.plan_version),
            str(report.num_samples),
            report.adapter.sha256,
            str(report.adapter.nbytes),
        ]
        fields = [*head, *body, json.dumps(report.metrics.model_dump(mode="json"), sort_keys=True)]
    else:
        fields = ["failed", report.task_id, report.run_id, str(report.round), report.device_id, report.reason]
    return "\x1f".join(fields).encode()


def sign(key: bytes, report: Report) -> str:
    """Hex HMAC-SHA256 of the report under ``key``."""
    return hmac.new(key, canonical(report), hashlib.sha256).hexdigest()


def verify(fleet_key: bytes, report: Report) -> bool:
    """True if the report carries a valid signature of the device it names."""
    if report.signature is None:
        return False
    expected = sign(derive_device_key(fleet_key, report.device_id), report)
    return hmac.compare_digest(expected, report.signature)


def read_key(env: str, *, environ: dict[str, str]) -> bytes | None:
    """A key from ``environ[ENV]`` (hex or text) or from the file named by ``environ[ENV_FILE]``; None if
    neither is set (the command line reads its keys through :func:`settings_key`).

    Raises:
        ConfigError: the file cannot be read, or the key is shorter than 16 bytes.
    """
    raw: str | None = environ.get(env)
    if raw is None and environ.get(f"{env}_FILE"):
        try:
            raw = Path(environ[f"{env}_FILE"]).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{env}_FILE: cannot read the key file: {exc.strerror}") from None
    return None if raw is None else parse_key(raw, env)


def settings_key(field: str, settings: Settings | None = None) -> bytes | None:
    """The key of a :class:`lorafleet.settings.Settings` field (``fleet_key``, ``device_key``): from
    its variable or its ``_FILE``; None if neither is set.

    Raises:
        ConfigError: the file cannot be read, or the key is shorter than 16 bytes.
    """
    secret = getattr(settings or load_settings(), field)
    return None if secret is None else parse_key(secret.get_secret_value(), env_name(field))


def parse_key(raw: str, name: str) -> bytes:
    """A key as given (hex, else its text's bytes).

    Raises:
        ConfigError: shorter than 16 bytes (``name`` says whose).
    """
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = raw.encode()
    if len(key) < 16:
        raise ConfigError(f"{name}: a key must have at least 16 bytes")
    return key
