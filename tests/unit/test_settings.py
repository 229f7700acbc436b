"""lorafleet/settings.py: every variable read in one place, secrets also from ``*_FILE`` files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorafleet.security.signing import settings_key
from lorafleet.settings import SECRETS, Settings, env_name, load_settings
from schemas.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for field in Settings.model_fields:
        monkeypatch.delenv(env_name(field), raising=False)
        monkeypatch.delenv(env_name(field) + "_FILE", raising=False)


def test_variables_are_read_typed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAFLEET_STATE_URL", "redis://h:6379/0")
    monkeypatch.setenv("LORAFLEET_METRICS_PORT", "9102")
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LORAFLEET_CONNECT_TIMEOUT", "2.5")
    monkeypatch.setenv("LORAFLEET_BROKER_URL", "")  # empty: unset
    settings = load_settings()
    assert settings.state_url == "redis://h:6379/0" and settings.broker_url is None
    assert settings.metrics_port == 9102 and settings.data_dir == tmp_path
    assert settings.connect_timeout == 2.5


def test_defaults_without_variables() -> None:
    settings = load_settings()
    assert settings.connect_timeout == 15.0
    assert settings.fleet_key is None and settings.data_dir is None


def test_a_bad_value_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_METRICS_PORT", "99999")
    with pytest.raises(ConfigError, match="LORAFLEET_METRICS_PORT"):
        load_settings()


def test_a_secret_from_its_file_the_variable_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key_file = tmp_path / "fleet.key"
    key_file.write_text("11" * 20 + "\n", encoding="utf-8")
    monkeypatch.setenv("LORAFLEET_FLEET_KEY_FILE", str(key_file))
    assert settings_key("fleet_key") == bytes.fromhex("11" * 20)
    # the key is never shown
    assert "11" * 20 not in repr(load_settings()) and "11" * 20 not in str(load_settings())
    monkeypatch.setenv("LORAFLEET_FLEET_KEY", "22" * 16)
    assert settings_key("fleet_key") == bytes.fromhex("22" * 16)


def test_an_unreadable_secret_file_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LORAFLEET_DEVICE_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="LORAFLEET_DEVICE_KEY_FILE: cannot read"):
        load_settings()


def test_only_secrets_come_from_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "url"
    path.write_text("redis://elsewhere:6379/0", encoding="utf-8")
    monkeypatch.setenv("LORAFLEET_STATE_URL_FILE", str(path))
    assert load_settings().state_url is None
    assert set(SECRETS) == {"fleet_key", "device_key"}


def test_a_short_key_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_DEVICE_KEY", "short")
    with pytest.raises(ConfigError, match="LORAFLEET_DEVICE_KEY: a key must have at least 16 bytes"):
        settings_key("device_key")


def test_env_name_knows_only_the_fields() -> None:
    assert env_name("state_url") == "LORAFLEET_STATE_URL"
    with pytest.raises(KeyError):
        env_name("no_such_setting")


def test_every_variable_of_the_package_is_a_setting() -> None:
    # Given every LORAFLEET_* name the package's code writes (documentation aside) ...
    written: set[str] = set()
    for path in (REPO / "lorafleet").rglob("*.py"):
        if path.name == "settings.py":
            continue
        written |= set(re.findall(r"[\"'](LORAFLEET_[A-Z_]+)[\"']", path.read_text(encoding="utf-8")))
    # ... none is written outside lorafleet/settings.py: the CLI names its variables with env_name
    assert written == set(), written
