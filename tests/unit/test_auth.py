"""Device signatures (HMAC per device, derived from a fleet key)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafleet.security.signing import canonical, derive_device_key, read_key, sign, verify
from schemas.errors import ConfigError
from schemas.messages import LoraUpdate, TaskFailed, TrainMetrics
from schemas.tensors import encode_tensors

FLEET = b"f" * 32


def _update(**changes: object) -> LoraUpdate:
    base = LoraUpdate(
        task_id="r:1:dev-0001",
        run_id="r",
        round=1,
        device_id="dev-0001",
        plan_version=1,
        num_samples=10,
        adapter=encode_tensors({"w": torch.ones(2)}),
        metrics=TrainMetrics(train_loss=0.5, steps=3, examples=10, compute_s=1.0),
    )
    return base.model_copy(update=changes)


def _signed(report: LoraUpdate | TaskFailed, device: str = "dev-0001") -> LoraUpdate | TaskFailed:
    return report.model_copy(update={"signature": sign(derive_device_key(FLEET, device), report)})


def test_a_device_signature_verifies_with_the_fleet_key() -> None:
    assert verify(FLEET, _signed(_update()))
    failed = TaskFailed(task_id="r:1:dev-0001", run_id="r", round=1, device_id="dev-0001", reason="oom")
    assert verify(FLEET, _signed(failed))


@pytest.mark.parametrize(
    "tamper",
    [
        {"num_samples": 1000},
        {"task_id": "r:1:dev-0002"},
        {"round": 2},
        {"adapter": encode_tensors({"w": torch.full((2,), 100.0)})},
        {"metrics": TrainMetrics(train_loss=0.5, steps=3, examples=10, compute_s=0.1)},
    ],
)
def test_any_change_after_signing_breaks_the_signature(tamper: dict[str, object]) -> None:
    signed = _signed(_update())
    assert not verify(FLEET, signed.model_copy(update=tamper))


def test_a_device_cannot_sign_for_another_device_and_unsigned_reports_fail() -> None:
    forged = _signed(_update(device_id="dev-0002", task_id="r:1:dev-0002"), device="dev-0001")
    assert not verify(FLEET, forged)
    assert not verify(FLEET, _update())
    assert not verify(b"another fleet key!", _signed(_update()))
    assert derive_device_key(FLEET, "dev-0001") != derive_device_key(FLEET, "dev-0002")
    assert canonical(_update()) != canonical(_update(plan_version=2))


def test_keys_come_from_hex_text_or_a_file_and_short_keys_are_refused(tmp_path: Path) -> None:
    assert read_key("K", environ={}) is None
    assert read_key("K", environ={"K": "00" * 16}) == bytes(16)
    assert read_key("K", environ={"K": "a passphrase of some length"}) == b"a passphrase of some length"
    path = tmp_path / "key"
    path.write_text("11" * 20 + "\n")
    assert read_key("K", environ={"K_FILE": str(path)}) == bytes.fromhex("11" * 20)
    with pytest.raises(ConfigError, match="at least 16"):
        read_key("K", environ={"K": "short"})
    with pytest.raises(ConfigError, match="K_FILE"):
        read_key("K", environ={"K_FILE": str(tmp_path / "missing")})
