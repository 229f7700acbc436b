"""Run configuration: defaults, YAML loading, and errors that name the offending field."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from schemas.config import RunConfig, device_id, load_run_config, parse_run_config
from schemas.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _error(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_run_config(data)
    return str(info.value)


def test_defaults_are_valid() -> None:
    # When
    config = RunConfig()

    # Then: documented defaults, and the defaults validate when spelled out
    assert config.strategy == "fedlora"
    assert config.devices.count == 8
    assert config.min_devices == config.devices.count
    assert config.lora.layers == "all"
    assert config.lora.target_modules == ["query", "value"]
    assert parse_run_config(config.model_dump()) == config
    assert parse_run_config({}) == config


def test_load_reads_yaml_including_exponent_floats(tmp_path: Path) -> None:
    # Given: YAML 1.1 would read ``1e-3`` as a string; the loader must read it as a float
    path = _write(
        tmp_path,
        """
        run_id: exp-1
        seed: 7
        model: {name: tiny, tiny_layers: 3}
        data: {dataset: synthetic, samples_per_device: 32}
        lora: {rank: 4, layers: [0, 2], target_modules: [query]}
        training:
          lr: 1e-3
          weight_decay: 5E-4
          batch_size: 8
        devices: {count: 5, profile: {speed: 0.5}}
        rounds:
          max_rounds: 2
          time_budget_s: 1e2
          quorum_fraction: 0.6
          min_devices: 3
        """,
    )

    # When
    config = load_run_config(path)

    # Then
    assert isinstance(config.training.lr, float) and config.training.lr == 1e-3
    assert config.training.weight_decay == 5e-4
    assert config.rounds.time_budget_s == 100.0
    assert config.run_id == "exp-1" and config.seed == 7
    assert config.model.name == "tiny" and config.model.tiny_layers == 3
    assert config.lora.layers == [0, 2] and config.lora.rank == 4
    assert config.devices.count == 5 and config.devices.profile.speed == 0.5
    assert config.min_devices == 3
    assert config.rounds.quorum_fraction == 0.6


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-3", 1e-3),
        ("1E3", 1000.0),
        ("+1.5e+2", 150.0),
        ("2.5e-1", 0.25),
        (".5e1", 5.0),
        ("1.0", 1.0),
        ("3", 3.0),
    ],
)
def test_number_spellings_are_numbers(tmp_path: Path, text: str, value: float) -> None:
    path = _write(tmp_path, f"rounds: {{round_deadline_s: {text}}}\n")
    assert load_run_config(path).rounds.round_deadline_s == value


def test_negative_exponent_number_reaches_the_range_check(tmp_path: Path) -> None:
    # A number (not a string) that is out of range: the message is about the range, not the type
    path = _write(tmp_path, "training: {lr: -1e-3}\n")
    with pytest.raises(ConfigError, match=r"training\.lr: Input should be greater than 0"):
        load_run_config(path)


def test_strings_that_look_numeric_elsewhere_stay_strings(tmp_path: Path) -> None:
    # A run id is a string; a quoted exponent must not turn into a float
    path = _write(tmp_path, 'run_id: "1e3"\n')
    assert load_run_config(path).run_id == "1e3"


def test_empty_file_gives_defaults_only_through_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_run_config(path)
    assert load_run_config(path, overrides={"seed": 3}).seed == 3


def test_overrides_merge_into_sections(tmp_path: Path) -> None:
    # Given
    path = _write(tmp_path, "rounds: {max_rounds: 4, quorum_fraction: 0.5}\n")

    # When
    config = load_run_config(path, overrides={"rounds": {"max_rounds": 9}, "devices": {"count": 2}})

    # Then: the override wins, its siblings survive
    assert config.rounds.max_rounds == 9
    assert config.rounds.quorum_fraction == 0.5
    assert config.devices.count == 2


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"rounds": {"max_rund": 3}}, "rounds.max_rund"),
        ({"rounds": {"max_rounds": 0}}, "rounds.max_rounds"),
        ({"rounds": {"quorum_fraction": 1.5}}, "rounds.quorum_fraction"),
        ({"rounds": {"sample_fraction": 0.0}}, "rounds.sample_fraction"),
        ({"training": {"lr": 0.0}}, "training.lr"),
        ({"training": {"lr": "fast"}}, "training.lr"),
        ({"training": {"batch_size": 5000}}, "training.batch_size"),
        ({"lora": {"rank": 0}}, "lora.rank"),
        ({"hier": {"warn_divergence": 0.0}}, "hier.warn_divergence"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout"),
        ({"lora": {"target_modules": []}}, "lora.target_modules"),
        ({"model": {"max_seq_len": 4}}, "model.max_seq_len"),
        ({"devices": {"count": 0}}, "devices.count"),
        ({"devices": {"profile": {"speed": 0}}}, "devices.profile.speed"),
        ({"devices": {"profile": {"sped": 2}}}, "devices.profile.sped"),
        ({"limits": {"max_message_bytes": 10}}, "limits.max_message_bytes"),
        ({"run_id": "../etc"}, "run_id"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"unknown_section": {}}, "unknown_section"),
    ],
)
def test_bad_field_names_its_dotted_path(data: dict[str, Any], path: str) -> None:
    message = _error(data)
    assert f"  {path}: " in message, message


@pytest.mark.parametrize(
    ("data", "path", "bad", "allowed"),
    [
        ({"data": {"dataset": "imdb"}}, "data.dataset", "imdb", ["sst2", "20newsgroups", "synthetic"]),
        ({"strategy": "fedprox"}, "strategy", "fedprox", ["fedlora"]),
        ({"data": {"partition": "pathological"}}, "data.partition", "pathological", ["iid", "dirichlet"]),
        ({"hier": {"within_group": "deep"}}, "hier.within_group", "deep", ["uniform", "legend"]),
    ],
)
def test_bad_enum_value_names_path_and_allowed_values(
    data: dict[str, Any], path: str, bad: str, allowed: list[str]
) -> None:
    # When
    message = _error(data)

    # Then: one line names the field, every allowed value, and what was given
    line = next(ln for ln in message.splitlines() if ln.strip().startswith(f"{path}:"))
    assert "allowed" in line
    for value in allowed:
        assert repr(value) in line
    assert repr(bad) in line


def test_every_bad_field_is_listed(tmp_path: Path) -> None:
    path = _write(tmp_path, "rounds: {max_rounds: 0}\ntraining: {lr: 2.0}\nlora: {rank: 999}\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    message = str(info.value)
    assert str(path) in message
    for field in ("rounds.max_rounds", "training.lr", "lora.rank"):
        assert field in message


def test_layers_accepts_all_or_a_list_of_non_negative_ints() -> None:
    assert parse_run_config({"lora": {"layers": "all"}}).lora.layers == "all"
    assert parse_run_config({"lora": {"layers": [3, 0]}}).lora.layers == [3, 0]
    for bad in ("some", [-1], [], ["0"]):
        assert "lora.layers" in _error({"lora": {"layers": bad}})


def test_strict_types_no_coercion() -> None:
    # A quoted number is not a number, and a float is not an int
    assert "rounds.max_rounds" in _error({"rounds": {"max_rounds": "3"}})
    assert "rounds.max_rounds" in _error({"rounds": {"max_rounds": 3.0}})
    # but an int is an acceptable float
    assert parse_run_config({"training": {"lr": 1}}).training.lr == 1.0


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_floats_refused(value: float) -> None:
    assert "rounds.round_deadline_s" in _error({"rounds": {"round_deadline_s": value}})


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")


def test_directory_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path)


@pytest.mark.parametrize("text", ["rounds: {max_rounds: 3\n", "a: b: c\n", "key: [1, 2\n", "\t- x: :\n"])
def test_invalid_yaml_is_config_error(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(path)


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "run_id: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError):
        load_run_config(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "- ab\n- cd\n", "just a string\n", "42\n"])
@pytest.mark.parametrize("overrides", [None, {"seed": 1}])
def test_non_mapping_yaml_is_config_error(
    tmp_path: Path, text: str, overrides: dict[str, Any] | None
) -> None:
    # Given: a file that parses as YAML but is not a mapping of sections
    path = _write(tmp_path, text)

    # Then: a ConfigError saying so, with or without overrides
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_run_config(path, overrides=overrides)


def test_min_devices_above_count_rejected() -> None:
    message = _error({"devices": {"count": 4}, "rounds": {"min_devices": 5}})
    assert "rounds.min_devices" in message and "devices.count" in message


@pytest.mark.parametrize(
    ("count", "min_devices", "expected"), [(4, 4, 4), (4, 1, 1), (4, None, 4), (1, None, 1)]
)
def test_min_devices_within_count(count: int, min_devices: int | None, expected: int) -> None:
    config = parse_run_config({"devices": {"count": count}, "rounds": {"min_devices": min_devices}})
    assert config.min_devices == expected


def test_device_ids_format() -> None:
    # Given
    config = parse_run_config({"devices": {"count": 12}})

    # When
    ids = config.device_ids()

    # Then: zero-padded, in order, unique, and each a valid DeviceId
    assert ids == [f"dev-{i:04d}" for i in range(12)]
    assert ids[0] == "dev-0000" and ids[11] == "dev-0011"
    assert len(set(ids)) == 12
    assert device_id(12345) == "dev-12345"
    from pydantic import TypeAdapter

    from schemas.messages import DeviceId

    adapter = TypeAdapter(DeviceId)
    for d in ids:
        assert adapter.validate_python(d) == d


def test_config_is_frozen() -> None:
    config = RunConfig()
    with pytest.raises(ValueError):
        config.seed = 3  # type: ignore[misc]


def test_there_are_examples() -> None:
    assert EXAMPLES, "examples/*.yaml expected in the repository"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_repository_examples_validate(path: Path) -> None:
    config = load_run_config(path)
    assert isinstance(config, RunConfig)
    assert config.min_devices <= config.devices.count


def test_eval_data_names_the_aggregators_evaluation_file() -> None:
    from schemas.config import parse_run_config

    base = {"data": {"dataset": "sst2", "labels": ["negative", "positive"]}}
    config = parse_run_config({**base, "eval": {"data": "/data/dev.jsonl", "device_fraction": 0.1}})
    assert config.data.eval_path == "/data/dev.jsonl" and config.eval.device_fraction == 0.1
    same = {"data": {**base["data"], "eval_path": "/data/dev.jsonl"}, "eval": {"data": "/data/dev.jsonl"}}
    assert parse_run_config(same).data.eval_path == "/data/dev.jsonl"
    with pytest.raises(ValueError, match="name different files"):
        parse_run_config({"data": {**base["data"], "eval_path": "/a"}, "eval": {"data": "/b"}})


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"aggregation": "hetlora"}, "not hetlora"),
        ({"robust": {"method": "median"}}, "not robust.method median"),
    ],
)
def test_aggregation_coverage_needs_the_rank_wise_merge(extra: dict[str, Any], named: str) -> None:
    assert parse_run_config({"aggregation_coverage": 1.0}).coverage == 1.0
    with pytest.raises(ConfigError, match=f"aggregation_coverage applies to the rank_wise merge, {named}"):
        parse_run_config({"aggregation_coverage": 1.0, **extra})
    # auto under another merge is no error: it means 0 there, for a hierarchical strategy too
    assert parse_run_config({"strategy": "hierfedlora", **extra}).coverage == 0.0


@pytest.mark.parametrize(
    ("strategy", "coverage"),
    [("fedlora", 0.0), ("legend", 0.0), ("hierfedlora", 1.0), ("hier_fixed_depth", 1.0)],
)
def test_aggregation_coverage_is_auto_by_default_one_for_the_hierarchical_strategies(
    strategy: str, coverage: float
) -> None:
    config = parse_run_config({"strategy": strategy})
    assert config.aggregation_coverage == "auto" and config.coverage == coverage
    # a set value wins, 0 included
    assert parse_run_config({"strategy": strategy, "aggregation_coverage": 0}).coverage == 0.0
    assert parse_run_config({"strategy": strategy, "aggregation_coverage": 0.5}).coverage == 0.5
