"""lorafleet's settings from the environment, in one place (pydantic-settings).

Every variable is ``LORAFLEET_`` plus a field name in capitals (``LORAFLEET_STATE_URL``); a secret
(:data:`SECRETS`) may instead be given as a file, named by ``LORAFLEET_<NAME>_FILE`` (Docker and
Kubernetes secrets), read when the variable itself is unset; an empty variable counts as unset. The
command line's options name their variables with :func:`env_name`, so each name is written once,
here. Nothing is read at import: :func:`load_settings` where they are needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from schemas.errors import ConfigError

PREFIX = "LORAFLEET_"

#: the fields that may come from a file (``LORAFLEET_FLEET_KEY_FILE``)
SECRETS = ("fleet_key", "device_key")


class Settings(BaseSettings):
    """What lorafleet reads from the environment (command-line options override their variable)."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True, env_ignore_empty=True)

    broker_url: str | None = Field(
        default=None, description="RabbitMQ URL(s), amqp://user:pass@host:5672/vhost"
    )
    state_url: str | None = Field(default=None, description="Redis URL, redis://host:6379/0")
    fleet_key: SecretStr | None = Field(
        default=None, description="the aggregator's (and elastic workers') key"
    )
    device_key: SecretStr | None = Field(default=None, description="one provisioned device's own key")
    data_dir: Path | None = Field(default=None, description="where the named data sets are")
    device_data: Path | None = Field(default=None, description="a device's own rows (worker --data)")
    device_id: str | None = Field(default=None, description="the slot a worker serves (worker --device-id)")
    run_id: str | None = Field(default=None, description="the run of status and stop (--run)")
    metrics_port: int | None = Field(default=None, ge=1, le=65535, description="--metrics-port")
    log_format: str | None = Field(default=None, description="--log-format")
    log_level: str | None = Field(default=None, description="--log-level")
    turns: int | None = Field(default=None, ge=0, description="worker and aggregator --turns")
    turns_dir: Path | None = Field(default=None, description="worker and aggregator --turns-dir")
    cost_model: Path | None = Field(default=None, description="a pinned cost model JSON (benchmarks)")
    connect_timeout: float = Field(
        default=15.0, gt=0, description="seconds a command waits for the broker and Redis at start-up"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FileVariables(settings_cls)


class _FileVariables(PydanticBaseSettingsSource):
    """``LORAFLEET_<SECRET>_FILE``: the content of the file it names (stripped of surrounding space)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        variable = env_name(field_name) + "_FILE"
        path = os.environ.get(variable) if field_name in SECRETS else None
        if not path:
            return None, field_name, False
        try:
            return Path(path).read_text(encoding="utf-8").strip(), field_name, False
        except OSError as exc:
            raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, _, _ = self.get_field_value(field, name)
            if value is not None:
                values[name] = value
        return values


def env_name(field: str) -> str:
    """The environment variable of a :class:`Settings` field (``state_url`` -> ``LORAFLEET_STATE_URL``).

    Raises:
        KeyError: no such field.
    """
    if field not in Settings.model_fields:
        raise KeyError(field)
    return PREFIX + field.upper()


def load_settings() -> Settings:
    """The settings from the process's environment.

    Raises:
        ConfigError: a variable's value is invalid (named), or a ``_FILE`` cannot be read.
    """
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{env_name(str(e['loc'][0]))}: {e['msg']}" for e in exc.errors() if e["loc"])
        raise ConfigError(problems or str(exc)) from None
