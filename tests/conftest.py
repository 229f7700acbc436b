"""Shared fixtures. Real-server fixtures skip locally when the server is missing and fail under CI."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest

CI = bool(os.environ.get("CI"))
RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _unavailable(what: str) -> None:
    if CI:
        pytest.fail(f"{what} is not reachable and CI is set: start it (see .ci/run)")
    pytest.skip(f"{what} is not reachable")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _redis_ping() -> bool:
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1.0) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def rabbitmqctl(*args: str, timeout: float = 120.0) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=timeout)


@contextlib.contextmanager
def throwaway_vhost() -> Iterator[str]:
    """An AMQP URL (heartbeat 30 s) on a fresh vhost of the real RabbitMQ, deleted afterwards."""
    vhost = f"lf-test-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}/{vhost}?heartbeat=30"
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, timeout=120)


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """An AMQP URL on a fresh, empty vhost of the real RabbitMQ (deleted afterwards)."""
    if not _port_open(RABBITMQ_HOST, RABBITMQ_PORT) or shutil.which("rabbitmqctl") is None:
        _unavailable(f"RabbitMQ on {RABBITMQ_HOST}:{RABBITMQ_PORT}")
    with throwaway_vhost() as url:
        yield url


@pytest.fixture
def redis_url() -> str:
    """The URL of the real Redis (tests use unique run ids and delete them)."""
    if not _redis_ping():
        _unavailable(f"Redis on {REDIS_HOST}:{REDIS_PORT}")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


@pytest.fixture
def run_id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"
