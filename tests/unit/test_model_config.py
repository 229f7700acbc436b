"""The configuration of the model, its task and data, the LoRA targets and the target metric."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from schemas.config import RoundsConfig, RunConfig, load_run_config, parse_run_config, perplexity
from schemas.errors import ConfigError


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_run_config(data)
    return str(info.value)


def test_defaults_classify_in_float32_with_the_family_s_lora_targets() -> None:
    config = RunConfig()
    assert config.model.task == "sequence_classification" and config.model.dtype == "float32"
    assert not config.model.gradient_checkpointing and config.model.tiny_family == "bert"
    assert config.lora.targets is None  # the family's default, resolved when the model is loaded
    assert config.lora.target_modules == ["query", "value"]  # read before that: BERT's, the built-ins' family
    assert config.rounds.target_metric == "accuracy" and config.rounds.target_value is None


def test_target_modules_keep_their_name_in_files_and_dumps(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: tiny}\nlora: {target_modules: null, rank: 4}\n", encoding="utf-8")
    assert load_run_config(path).lora.targets is None
    given = parse_run_config({"lora": {"target_modules": ["q_proj", "self_attn.v_proj"]}})
    assert given.lora.target_modules == ["q_proj", "self_attn.v_proj"]
    dumped = given.model_dump()
    assert (
        dumped["lora"]["target_modules"] == ["q_proj", "self_attn.v_proj"] and "targets" not in dumped["lora"]
    )
    assert parse_run_config(dumped) == given
    assert "lora.target_modules" in _error({"lora": {"target_modules": []}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": {"dtype": "float64"}}, "model.dtype"),
        ({"model": {"task": "translation"}}, "model.task"),
        ({"model": {"tiny_family": "t5"}}, "model.tiny_family"),
        ({"data": {"dataset": "jsonl"}}, "data.dataset jsonl needs data.path"),
        ({"data": {"dataset": "sst2", "path": "rows.jsonl"}}, "data.path and data.eval_path are for"),
        ({"data": {"prompt_field": "a b"}}, "data.prompt_field"),
        ({"data": {"dataset": "jsonl", "path": "rows.jsonl"}}, "it needs model.task causal_lm"),
        (
            {"model": {"task": "causal_lm"}, "data": {"dataset": "20newsgroups"}},
            "causal_lm trains on prompt/response rows",
        ),
        ({"rounds": {"target_metric": "f1"}}, "rounds.target_metric"),
        ({"rounds": {"target_accuracy": 0.8, "target": 0.9}}, "not both"),
        ({"rounds": {"target_accuracy": 0.8, "target_metric": "loss"}}, "target for accuracy, not loss"),
        ({"rounds": {"target": 1.5}}, "above 1, the highest accuracy"),
        ({"rounds": {"target": 0.0, "target_metric": "loss"}}, "rounds.target"),
    ],
)
def test_inconsistent_settings_are_refused_by_name(data: dict[str, Any], message: str) -> None:
    assert message in _error(data)


def test_causal_lm_settings_validate() -> None:
    config = parse_run_config(
        {
            "model": {"name": "/models/llama", "task": "causal_lm", "dtype": "bfloat16", "max_seq_len": 2048},
            "data": {
                "dataset": "jsonl",
                "path": "train.jsonl",
                "eval_path": "eval.jsonl",
                "prompt_field": "input",
            },
            "rounds": {"target_metric": "perplexity", "target": 12.5},
        }
    )
    assert config.data.response_field == "response" and config.model.gradient_checkpointing is False
    assert config.rounds.target_value == 12.5


@pytest.mark.parametrize(
    ("rounds", "accuracy", "loss", "reached"),
    [
        ({"target_accuracy": 0.8}, 0.8, 9.0, True),  # accuracy: at or above
        ({"target_accuracy": 0.8}, 0.79, 0.1, False),
        ({"target_metric": "accuracy", "target": 0.5}, 0.6, 9.0, True),
        ({"target_metric": "loss", "target": 2.0}, 0.0, 2.0, True),  # loss: at or below
        ({"target_metric": "loss", "target": 2.0}, 1.0, 2.01, False),
        ({"target_metric": "perplexity", "target": 10.0}, 0.0, math.log(9.9), True),
        ({"target_metric": "perplexity", "target": 10.0}, 1.0, math.log(10.1), False),
        ({"target_metric": "loss"}, 1.0, 0.0, False),  # no target, nothing reached
    ],
)
def test_the_target_metric_has_a_direction(
    rounds: dict[str, Any], accuracy: float, loss: float, reached: bool
) -> None:
    config = RoundsConfig.model_validate(rounds)
    assert config.target_reached(accuracy, loss) is reached
    assert config.target_reached(None, None) is False


def test_perplexity_is_the_exp_of_the_loss_and_never_overflows() -> None:
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert math.isfinite(perplexity(1e6))
    rounds = RoundsConfig.model_validate({"target_metric": "perplexity"})
    assert rounds.metric_value(0.3, math.log(4.0)) == pytest.approx(4.0)
    assert RoundsConfig().metric_value(0.3, 1.0) == 0.3 and rounds.metric_value(0.3, None) is None
