"""Pure planning: LoRA blocks, FedLoRA specs, device sampling, quorum sizes and task ids."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from pydantic import TypeAdapter

from orchestrator.planners.baselines import plan_fedlora
from orchestrator.planners.specs import global_spec, lora_blocks, uniform_spec
from orchestrator.rounds import quorum_size, sample_devices, task_id
from schemas.config import LoraConfigSection, parse_run_config
from schemas.messages import TaskId


def devices(n: int) -> list[str]:
    return [f"dev-{i:04d}" for i in range(n)]


def exact_ceil(fraction: float, n: int) -> int:
    """ceil(fraction * n) with the fraction read as the decimal the user wrote (no float rounding)."""
    return math.ceil(Fraction(repr(fraction)) * n)


# ---- lora_blocks, uniform_spec, plan_fedlora -----------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "num_blocks", "want"),
    [
        ("all", 6, [0, 1, 2, 3, 4, 5]),
        ("all", 1, [0]),
        ([0], 6, [0]),
        ([5, 1, 3], 6, [1, 3, 5]),
        ([2, 2, 0], 3, [0, 2]),
    ],
)
def test_lora_blocks(layers: object, num_blocks: int, want: list[int]) -> None:
    assert lora_blocks(LoraConfigSection(layers=layers), num_blocks) == want  # type: ignore[arg-type]


@pytest.mark.parametrize(("layers", "num_blocks"), [([6], 6), ([0, 7], 6), ([100], 12)])
def test_lora_blocks_out_of_range(layers: list[int], num_blocks: int) -> None:
    with pytest.raises(ValueError, match=r"outside the model's blocks"):
        lora_blocks(LoraConfigSection(layers=layers), num_blocks)


def test_uniform_spec_puts_the_configured_rank_on_every_block() -> None:
    # Given
    lora = LoraConfigSection(
        rank=4, alpha_ratio=1.5, dropout=0.2, target_modules=["query", "key"], layers=[3, 1]
    )

    # When
    spec = uniform_spec(lora, 6)

    # Then
    assert spec.layer_ranks == {1: 4, 3: 4}
    assert spec.layers == [1, 3]
    assert spec.max_rank == 4
    assert spec.target_modules == ["query", "key"]
    assert (spec.alpha_ratio, spec.dropout) == (1.5, 0.2)


def test_plan_fedlora_gives_every_device_the_same_spec() -> None:
    # Given
    config = parse_run_config({"devices": {"count": 5}, "lora": {"rank": 2, "layers": "all"}})
    ids = config.device_ids()

    # When
    plans = plan_fedlora(ids, config, 3)

    # Then
    assert [p.device_id for p in plans] == ids
    assert all(p.lora == plans[0].lora for p in plans)
    assert plans[0].lora.layer_ranks == {0: 2, 1: 2, 2: 2}
    assert plans[0].lora == global_spec(config, 3)
    assert plan_fedlora([], config, 3) == []


# ---- sample_devices ------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [1.0, 1.5])
def test_full_fraction_returns_every_device_sorted(fraction: float) -> None:
    ids = ["dev-0003", "dev-0001", "dev-0002", "dev-0000"]
    assert sample_devices(ids, fraction, round_no=4, seed=9) == sorted(ids)


def test_quarter_of_twenty() -> None:
    # When
    chosen = sample_devices(devices(20), 0.25, round_no=1, seed=0)

    # Then: 5 distinct members, sorted
    assert len(chosen) == 5
    assert len(set(chosen)) == 5
    assert set(chosen) <= set(devices(20))
    assert chosen == sorted(chosen)


@pytest.mark.parametrize(
    ("n", "fraction"),
    [(20, 0.25), (10, 0.5), (7, 0.3), (100, 0.07), (50, 0.14), (25, 0.28), (75, 0.68), (3, 0.01), (1, 0.5)],
)
def test_sample_size_is_ceil_of_fraction_times_n(n: int, fraction: float) -> None:
    # e.g. 0.07 * 100 is 7.000000000000001 in floating point: the sample must still be 7 devices
    want = max(1, exact_ceil(fraction, n))
    chosen = sample_devices(devices(n), fraction, round_no=2, seed=5)
    assert len(chosen) == want
    assert len(set(chosen)) == want


def test_sample_size_for_every_percentage() -> None:
    for n in (1, 9, 20, 25, 50, 100):
        for pct in range(1, 100):
            fraction = pct / 100
            want = max(1, exact_ceil(fraction, n))
            assert len(sample_devices(devices(n), fraction, 0, 0)) == want, (n, pct)


def test_sampling_is_deterministic_for_seed_and_round() -> None:
    ids = devices(30)
    a = sample_devices(ids, 0.2, round_no=3, seed=42)
    b = sample_devices(list(reversed(ids)), 0.2, round_no=3, seed=42)  # input order does not matter
    assert a == b


def test_sampling_differs_across_rounds_for_most_seeds() -> None:
    ids = devices(20)
    differing = sum(
        sample_devices(ids, 0.25, round_no=0, seed=s) != sample_devices(ids, 0.25, round_no=1, seed=s)
        for s in range(20)
    )
    # C(20, 5) = 15504 samples: a coincidence is rare
    assert differing >= 18


def test_sampling_differs_across_seeds() -> None:
    ids = devices(20)
    samples = {tuple(sample_devices(ids, 0.25, round_no=0, seed=s)) for s in range(20)}
    assert len(samples) >= 18


def test_sampling_visits_every_device_over_many_rounds() -> None:
    ids = devices(10)
    seen = set()
    for r in range(50):
        seen.update(sample_devices(ids, 0.2, round_no=r, seed=1))
    assert seen == set(ids)


@pytest.mark.parametrize("fraction", [1e-9, 0.001, 0.01])
@pytest.mark.parametrize("n", [1, 2, 50])
def test_sample_is_never_empty(n: int, fraction: float) -> None:
    assert len(sample_devices(devices(n), fraction, round_no=0, seed=0)) >= 1


def test_no_devices_gives_an_empty_sample() -> None:
    assert sample_devices([], 0.5, 0, 0) == []
    assert sample_devices([], 1.0, 0, 0) == []


# ---- quorum_size ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction"),
    [
        (1, 1.0),
        (1, 0.1),
        (10, 1.0),
        (10, 0.5),
        (10, 0.7),
        (10, 0.75),
        (10, 0.01),
        (3, 0.34),
        (3, 2 / 3),
        (7, 0.3),
        (100, 0.07),
        (25, 0.28),
        (30, 0.1),
        (8, 0.125),
    ],
)
def test_quorum_size(n: int, fraction: float) -> None:
    want = min(n, max(1, exact_ceil(fraction, n)))
    assert quorum_size(n, fraction) == want


def test_quorum_size_for_every_percentage() -> None:
    for n in range(1, 41):
        for pct in range(1, 101):
            fraction = pct / 100
            assert quorum_size(n, fraction) == min(n, max(1, exact_ceil(fraction, n))), (n, pct)


@pytest.mark.parametrize("n", [0, -1])
def test_quorum_size_needs_a_task(n: int) -> None:
    with pytest.raises(ValueError):
        quorum_size(n, 0.5)


# ---- task_id -------------------------------------------------------------------------------------


def test_task_id_format() -> None:
    # When
    tid = task_id("run-1", 12, "dev-0003")

    # Then: readable, deterministic, unique per (run, round, device), and a valid TaskId
    assert tid == "run-1:12:dev-0003"
    assert task_id("run-1", 12, "dev-0003") == tid
    assert len({task_id("r", r, d) for r in range(3) for d in devices(4)}) == 12
    adapter = TypeAdapter(TaskId)
    longest = task_id("r" * 64, 1_000_000_000, "d" * 64)
    assert adapter.validate_python(longest) == longest
