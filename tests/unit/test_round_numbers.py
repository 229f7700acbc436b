"""Hierarchical round numbers: every round the configuration allows has a number of its own."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from lorafleet.run.round_numbers import INTRA_BASE, IntraRound, intra_round, parse_round
from schemas.config import MAX_GLOBAL_ROUNDS, MAX_GROUPS, MAX_INTRA_ROUNDS, HierConfig, parse_run_config
from schemas.errors import ConfigError
from schemas.messages import Round


def test_the_largest_configuration_numbers_its_last_round_within_the_message_schema() -> None:
    HierConfig(groups=MAX_GROUPS, max_groups=MAX_GROUPS, max_frequency=MAX_INTRA_ROUNDS)
    last = intra_round(MAX_GLOBAL_ROUNDS, MAX_GROUPS - 1, MAX_INTRA_ROUNDS)
    assert TypeAdapter(Round).validate_python(last) == last
    assert parse_round(last) == IntraRound(MAX_GLOBAL_ROUNDS, MAX_GROUPS - 1, MAX_INTRA_ROUNDS)


def test_every_global_round_the_configuration_allows_reads_back_as_a_global_round() -> None:
    # a global round's number shares the messages' round field with the intra-group ones: global
    # round 10_000 would read as an intra-group round of global round 1
    assert parse_round(MAX_GLOBAL_ROUNDS) is None
    assert MAX_GLOBAL_ROUNDS < INTRA_BASE == intra_round(1, 0, 1) - 1


def test_no_two_rounds_of_one_global_round_share_a_number() -> None:
    numbers = {intra_round(7, g, k) for g in range(MAX_GROUPS) for k in range(1, MAX_INTRA_ROUNDS + 1)}
    assert len(numbers) == MAX_GROUPS * MAX_INTRA_ROUNDS
    assert {parse_round(n).global_round for n in numbers} == {7}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "field",
    [{"groups": MAX_GROUPS + 1}, {"max_groups": MAX_GROUPS + 1}, {"max_frequency": MAX_INTRA_ROUNDS + 1}],
)
def test_the_configuration_refuses_a_count_the_numbers_cannot_hold(field: dict[str, int]) -> None:
    with pytest.raises(ValidationError, match=next(iter(field))):
        HierConfig(**field)  # type: ignore[arg-type]


def test_a_part_outside_its_range_is_named() -> None:
    with pytest.raises(ValueError, match="group 100"):
        intra_round(1, MAX_GROUPS, 1)
    with pytest.raises(ValueError, match="intra-group round 100"):
        intra_round(1, 0, MAX_INTRA_ROUNDS + 1)


def test_a_hierarchical_run_with_more_global_rounds_than_the_numbers_hold_fails_at_startup() -> None:
    parse_run_config({"strategy": "hierfedlora", "rounds": {"max_rounds": MAX_GLOBAL_ROUNDS}})
    with pytest.raises(ConfigError, match=f"rounds.max_rounds \\({MAX_GLOBAL_ROUNDS + 1}\\) exceeds"):
        parse_run_config({"strategy": "hierfedlora", "rounds": {"max_rounds": MAX_GLOBAL_ROUNDS + 1}})
    parse_run_config(
        {"strategy": "fedlora", "rounds": {"max_rounds": MAX_GLOBAL_ROUNDS + 1}}
    )  # flat: no limit
