"""CLI habits: --version from the package metadata, --set overrides validated as the file is,
validate's checks against the model, help texts as written (no markup eaten), logging and --set
passed on to the services a launcher starts."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from lorafleet.app import launcher, preflight
from lorafleet.app.cli import app
from schemas.config import parse_override
from schemas.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "examples" / "tiny.yaml")


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_version_is_the_installed_packages() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"lorafleet {version('lorafleet')}"


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("rounds.max_rounds=5", {"rounds": {"max_rounds": 5}}),
        ("lora.target_modules=[query, value]", {"lora": {"target_modules": ["query", "value"]}}),
        ("training.lr=1e-3", {"training": {"lr": 0.001}}),  # read as the file reads it
        ("run_id=1e3", {"run_id": 1000.0}),  # ... and then refused as the file would be (not a string)
        ("data.eval_samples=null", {"data": {"eval_samples": None}}),
    ],
)
def test_an_override_is_a_nested_mapping_with_a_yaml_value(assignment: str, expected: dict[str, Any]) -> None:
    assert parse_override(assignment) == expected


@pytest.mark.parametrize(
    ("assignment", "says"),
    [
        ("lora.rnak=3", "lora has no field 'rnak' (its fields: rank, alpha_ratio"),
        ("modle.name=x", "the configuration has no field 'modle'"),
        ("rounds.max_rounds.x=1", "rounds.max_rounds is a value, not a section"),
        ("rounds", "expected section.field=value"),
        ("lora.rank=[", "the value is not valid YAML"),
    ],
)
def test_a_bad_override_is_refused_in_one_line_naming_it(assignment: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_override(assignment)
    assert says in str(info.value) and "\n" not in str(info.value)
    assert assignment in str(info.value)


def test_set_overrides_the_file_and_is_validated_with_it() -> None:
    shown = invoke("validate", TINY, "--no-model", "--set", "rounds.max_rounds=7", "--set", "lora.rank=2")
    assert shown.exit_code == 0, shown.output
    config = json.loads(shown.stdout)
    assert (config["rounds"]["max_rounds"], config["lora"]["rank"], config["devices"]["count"]) == (7, 2, 4)
    bad_value = invoke("validate", TINY, "--no-model", "--set", "lora.rank=0")
    assert (
        bad_value.exit_code == 2
        and "lora.rank: Input should be greater than or equal to 1" in bad_value.stderr
    )
    bad_field = invoke("validate", TINY, "--set", "lora.rnak=3")
    assert bad_field.exit_code == 2
    assert bad_field.stderr.strip().startswith("error: --set 'lora.rnak=3': lora has no field 'rnak'")
    assert len(bad_field.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["lora.layers=[0, 5]"], "error: lora.layers: lora.layers [5] outside the model's blocks 0..1"),
        (
            ["lora.target_modules=[nope]"],
            "error: lora.target_modules: lora.target_modules ['nope'] name no linear",
        ),
        (
            ["model.max_seq_len=1024"],
            "error: model.max_seq_len: model.max_seq_len 1024 exceeds the model's 512",
        ),
        (["model.name=/nonexistent/model"], "error: model.name: model.name '/nonexistent/model' is not"),
    ],
)
def test_validate_refuses_what_the_model_does_not_have(overrides: list[str], says: str) -> None:
    result = invoke("validate", TINY, *[a for o in overrides for a in ("--set", o)])
    assert result.exit_code == 2, result.output
    assert says in result.stderr


def test_validate_describes_the_model_and_notes_what_the_run_will_correct() -> None:
    # a tiny GPT-2 of 2 blocks, a fixed depth of 3 (clamped by the planner) and its fused projection
    result = invoke(
        "validate",
        TINY,
        "--set",
        "model.tiny_family=gpt2",
        "--set",
        "strategy=legend_fixed_depth",
        "--set",
        "lora.target_modules=[c_attn]",
    )
    assert result.exit_code == 0, result.output
    assert "model: gpt2, 2 blocks (transformer.h), projections attn.c_attn, attn.c_proj" in result.stderr
    assert "note: legend.fixed_depth: 3 exceeds the model's 2 blocks: 2 is used" in result.stderr


def test_validate_reads_a_model_folder_without_its_weights() -> None:
    # MiniLM (6 blocks), from its packaged folder: block 6 does not exist
    result = invoke("validate", TINY, "--set", "model.name=minilm", "--set", "lora.layers=[5, 6]")
    assert result.exit_code == 2
    assert "model: bert, 6 blocks (bert.encoder.layer)" in result.stderr
    assert "lora.layers [6] outside the model's blocks 0..5" in result.stderr


def test_help_texts_show_as_written() -> None:
    group = typer.main.get_command(app)
    commands: dict[str, Any] = getattr(group, "commands", {})
    assert {"run", "orchestrator", "aggregator", "worker", "validate"} <= set(commands)
    for name in ["", *commands]:
        result = invoke(*([name] if name else []), "--help")
        assert result.exit_code == 0, name
        assert "``" not in result.stdout and "[/" not in result.stdout and "[bold" not in result.stdout, name
    assert "lora.target_modules=[query,value]" in " ".join(invoke("run", "--help").stdout.split())


@pytest.mark.parametrize("command", ["run", "orchestrator", "aggregator", "worker"])
def test_every_service_command_takes_the_operator_options(command: str) -> None:
    shown = " ".join(invoke(command, "--help").stdout.split())
    for option in ("--set", "--log-format", "--log-level", "--metrics-port"):
        assert option in shown, (command, option)


def test_run_passes_logging_and_overrides_to_the_services_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run_distributed(config: Any, config_path: Path, out: Path, **kw: Any) -> dict[str, Any]:
        seen.update(kw, max_rounds=config.rounds.max_rounds)
        return {"final_accuracy": 0.5, "final_round": 1}

    monkeypatch.setattr(launcher, "run_distributed", fake_run_distributed)
    monkeypatch.setattr(preflight, "check_servers", lambda **kw: None)  # no servers at h
    result = invoke(
        "run",
        TINY,
        "--broker",
        "amqp://h/",
        "--state",
        "redis://h/0",
        "--log-format",
        "json",
        "--set",
        "rounds.max_rounds=2",
    )
    assert result.exit_code == 0, result.output
    assert seen["max_rounds"] == 2
    assert seen["service_args"] == [
        "--log-format",
        "json",
        "--log-level",
        "WARNING",
        "--set",
        "rounds.max_rounds=2",
    ]
    # the service commands parse what they are given
    worker = typer.main.get_command(app).commands["worker"]  # type: ignore[attr-defined]
    worker.make_context("worker", [TINY, "--broker", "amqp://h/", *seen["service_args"]])
