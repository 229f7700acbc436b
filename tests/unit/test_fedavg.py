"""Rank-aware, contributor-only FedAvg against an independent numpy oracle, and update shape checks."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pytest
import torch

from aggregator.merge.rankwise import WeightedUpdate, aggregate
from aggregator.merge.registry import merge
from aggregator.validation import check_update_shapes
from schemas.config import parse_run_config
from schemas.errors import DecodeError

D_IN, D_OUT, GLOBAL_RANK, BLOCKS, LABELS = 6, 5, 8, 4, 3
MODULES = ("query", "value")
HEAD_W = "base_model.model.classifier.weight"
HEAD_B = "base_model.model.classifier.bias"

Factor = Literal["A", "B"]


def key(block: int, module: str, factor: Factor) -> str:
    return f"base_model.model.bert.encoder.layer.{block}.attention.self.{module}.lora_{factor}.weight"


# The oracle's own record of what each key is (it does not use the code's key parser).
FACTOR_OF: dict[str, Factor | None] = {HEAD_W: None, HEAD_B: None}
for _b in range(BLOCKS):
    for _m in MODULES:
        FACTOR_OF[key(_b, _m, "A")] = "A"
        FACTOR_OF[key(_b, _m, "B")] = "B"


def lora_shape(factor: Factor, rank: int) -> tuple[int, int]:
    return (rank, D_IN) if factor == "A" else (D_OUT, rank)


def make_global(rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {HEAD_W: rng.normal(size=(LABELS, D_IN)), HEAD_B: rng.normal(size=(LABELS,))}
    for k, factor in FACTOR_OF.items():
        if factor is not None:
            out[k] = rng.normal(size=lora_shape(factor, GLOBAL_RANK))
    return {k: v.astype(np.float32) for k, v in out.items()}


def make_update(rng: np.random.Generator, ranks: dict[int, int], head: bool = True) -> dict[str, np.ndarray]:
    """A device's tensors: LoRA on ``ranks`` (block -> rank) for both modules, plus the head."""
    out: dict[str, np.ndarray] = {}
    for block, rank in ranks.items():
        for module in MODULES:
            for factor in ("A", "B"):
                out[key(block, module, factor)] = rng.normal(size=lora_shape(factor, rank)).astype(np.float32)
    if head:
        out[HEAD_W] = rng.normal(size=(LABELS, D_IN)).astype(np.float32)
        out[HEAD_B] = rng.normal(size=(LABELS,)).astype(np.float32)
    return out


def covers(tensors: dict[str, np.ndarray], k: str, idx: tuple[int, ...]) -> bool:
    """Whether an update holds element ``idx`` of key ``k``: row j of A, column j of B, any shared one."""
    if k not in tensors:
        return False
    factor = FACTOR_OF[k]
    if factor == "A":
        return idx[0] < tensors[k].shape[0]
    if factor == "B":
        return idx[1] < tensors[k].shape[1]
    return True


def random_updates(rng: np.random.Generator, devices: int) -> list[tuple[dict[str, np.ndarray], float]]:
    """``devices`` devices, each on a random subset of blocks at random ranks, with random weights."""
    updates = []
    for _ in range(devices):
        blocks = [b for b in range(BLOCKS) if rng.random() < 0.6]
        ranks = {b: int(rng.integers(1, GLOBAL_RANK + 1)) for b in blocks}
        updates.append((make_update(rng, ranks), float(rng.uniform(0.5, 300.0))))
    return updates


def oracle(global_np: dict[str, np.ndarray], updates: list[tuple[dict[str, np.ndarray], float]]):
    """Element by element: the weighted mean over the updates that cover the element, else the global."""
    result = {}
    for k, g in global_np.items():
        out = g.astype(np.float64).copy()
        for idx in np.ndindex(*g.shape):
            num, den = 0.0, 0.0
            for tensors, weight in updates:
                if covers(tensors, k, idx):
                    num += weight * float(tensors[k][idx])
                    den += weight
            if den > 0:
                out[idx] = num / den
        result[k] = out.astype(g.dtype)
    return result


def to_torch(tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}


def run(global_np: dict[str, np.ndarray], updates: list[tuple[dict[str, np.ndarray], float]]):
    got = aggregate(to_torch(global_np), [WeightedUpdate(to_torch(t), w) for t, w in updates])
    return {k: v.numpy() for k, v in got.items()}


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


# ---- homogeneous ranks: plain FedAvg ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_homogeneous_ranks_equal_the_sample_weighted_mean(seed: int) -> None:
    # Given: every device trains every block at the global rank
    rng = np.random.default_rng(seed)
    global_np = make_global(rng)
    full = dict.fromkeys(range(BLOCKS), GLOBAL_RANK)
    weights = [float(w) for w in rng.integers(1, 500, size=3)]
    updates = [(make_update(rng, full), w) for w in weights]

    # When
    got = run(global_np, updates)

    # Then: per tensor, np.average with the sample counts as weights (the global plays no part)
    for k in global_np:
        want = np.average(np.stack([t[k] for t, _ in updates]), axis=0, weights=weights).astype(np.float32)
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-7, err_msg=k)


def test_single_update_replaces_everything_it_carries() -> None:
    rng = np.random.default_rng(1)
    global_np = make_global(rng)
    update = make_update(rng, dict.fromkeys(range(BLOCKS), GLOBAL_RANK))
    got = run(global_np, [(update, 37.0)])
    for k in global_np:
        np.testing.assert_array_equal(got[k], update[k], err_msg=k)


# ---- heterogeneous ranks -------------------------------------------------------------------------


def test_heterogeneous_ranks_average_rank_index_wise() -> None:
    # Given: global rank 8; three devices on block 0 with ranks 2, 4, 8
    rng = np.random.default_rng(2)
    global_np = make_global(rng)
    updates = [(make_update(rng, {0: r}), w) for r, w in ((2, 10.0), (4, 30.0), (8, 60.0))]

    # When
    got = run(global_np, updates)

    # Then: matches the element-wise oracle
    assert_close(got, oracle(global_np, updates))

    # and, spelled out for the query A factor and B factor of block 0:
    a, b = key(0, "query", "A"), key(0, "query", "B")
    (u2, w2), (u4, w4), (u8, w8) = updates
    for j in range(GLOBAL_RANK):
        contributors = [(u, w) for u, w in updates if u[a].shape[0] > j]
        total = sum(w for _, w in contributors)
        want_row = sum(w * u[a][j].astype(np.float64) for u, w in contributors) / total
        want_col = sum(w * u[b][:, j].astype(np.float64) for u, w in contributors) / total
        np.testing.assert_allclose(got[a][j], want_row, rtol=1e-6, err_msg=f"A row {j}")
        np.testing.assert_allclose(got[b][:, j], want_col, rtol=1e-6, err_msg=f"B column {j}")
    # rows 4..7 only the rank-8 device trained: they are its rows
    np.testing.assert_allclose(got[a][4:], u8[a][4:], rtol=1e-6)
    np.testing.assert_allclose(got[b][:, 4:], u8[b][:, 4:], rtol=1e-6)
    # row 0 is the mean over all three, which differs from each device's row
    mean0 = (w2 * u2[a][0] + w4 * u4[a][0] + w8 * u8[a][0]) / (w2 + w4 + w8)
    np.testing.assert_allclose(got[a][0], mean0, rtol=1e-5)


def test_rank_indices_nobody_trained_keep_the_global_value_bit_exact() -> None:
    # Given: the highest rank any device trains on block 1 is 4 < 8
    rng = np.random.default_rng(3)
    global_np = make_global(rng)
    updates = [(make_update(rng, {1: 2}), 5.0), (make_update(rng, {1: 4}), 7.0)]

    # When
    got = run(global_np, updates)

    # Then
    for module in MODULES:
        a, b = key(1, module, "A"), key(1, module, "B")
        np.testing.assert_array_equal(got[a][4:], global_np[a][4:])
        np.testing.assert_array_equal(got[b][:, 4:], global_np[b][:, 4:])
        assert not np.allclose(got[a][:4], global_np[a][:4])
    assert_close(got, oracle(global_np, updates))


@pytest.mark.parametrize("seed", range(8))
def test_random_heterogeneous_scenarios_match_the_oracle(seed: int) -> None:
    # Given: random devices, each on a random subset of blocks at random ranks, random weights
    rng = np.random.default_rng(100 + seed)
    global_np = make_global(rng)
    updates = random_updates(rng, int(rng.integers(1, 6)))

    # Then
    assert_close(run(global_np, updates), oracle(global_np, updates))


# ---- contributor-only blocks ---------------------------------------------------------------------


def test_blocks_only_some_devices_trained() -> None:
    # Given: device 1 trains blocks 0 and 1, device 2 blocks 1 and 2; nobody trains block 3
    rng = np.random.default_rng(4)
    global_np = make_global(rng)
    u1 = make_update(rng, {0: GLOBAL_RANK, 1: GLOBAL_RANK})
    u2 = make_update(rng, {1: GLOBAL_RANK, 2: GLOBAL_RANK})
    w1, w2 = 3.0, 1.0

    # When
    got = run(global_np, [(u1, w1), (u2, w2)])

    # Then
    for module in MODULES:
        for factor in ("A", "B"):
            k0, k1, k2, k3 = (key(b, module, factor) for b in range(4))
            np.testing.assert_allclose(got[k0], u1[k0], rtol=1e-6)  # only device 1: not diluted
            np.testing.assert_allclose(got[k2], u2[k2], rtol=1e-6)  # only device 2
            np.testing.assert_allclose(got[k1], (w1 * u1[k1] + w2 * u2[k1]) / (w1 + w2), rtol=1e-5)
            assert got[k3].tobytes() == global_np[k3].tobytes()  # nobody: bit-exact
    # the head: both
    for k in (HEAD_W, HEAD_B):
        np.testing.assert_allclose(got[k], (w1 * u1[k] + w2 * u2[k]) / (w1 + w2), rtol=1e-5)


def test_head_is_averaged_over_every_update() -> None:
    # Given: devices on disjoint blocks, each carrying the head
    rng = np.random.default_rng(5)
    global_np = make_global(rng)
    updates = [(make_update(rng, {b: 2}), float(b + 1)) for b in range(3)]

    # When
    got = run(global_np, updates)

    # Then
    weights = [w for _, w in updates]
    for k in (HEAD_W, HEAD_B):
        want = np.average(np.stack([u[k] for u, _ in updates]), axis=0, weights=weights)
        np.testing.assert_allclose(got[k], want, rtol=1e-6)


def test_update_without_head_leaves_it_to_those_that_carry_it() -> None:
    rng = np.random.default_rng(6)
    global_np = make_global(rng)
    with_head = make_update(rng, {0: 8})
    without = make_update(rng, {0: 8}, head=False)
    got = run(global_np, [(with_head, 1.0), (without, 100.0)])
    np.testing.assert_array_equal(got[HEAD_W], with_head[HEAD_W])


# ---- weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.001, 3.0, 1e6])
def test_scaling_every_weight_leaves_the_result_unchanged(scale: float) -> None:
    rng = np.random.default_rng(7)
    global_np = make_global(rng)
    updates = [(make_update(rng, {0: r, 2: 8}), w) for r, w in ((2, 10.0), (8, 25.0), (5, 4.0))]
    base = run(global_np, updates)
    scaled = run(global_np, [(u, w * scale) for u, w in updates])
    for k in base:
        np.testing.assert_allclose(scaled[k], base[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_changing_one_weight_changes_the_result_towards_that_device() -> None:
    rng = np.random.default_rng(8)
    global_np = make_global(rng)
    u1, u2 = make_update(rng, {0: 8}), make_update(rng, {0: 8})
    balanced = run(global_np, [(u1, 1.0), (u2, 1.0)])
    heavy = run(global_np, [(u1, 9.0), (u2, 1.0)])
    k = key(0, "value", "B")
    assert not np.allclose(balanced[k], heavy[k])
    # closer to device 1 once it weighs more
    assert np.linalg.norm(heavy[k] - u1[k]) < np.linalg.norm(balanced[k] - u1[k])


# ---- edge cases and errors -----------------------------------------------------------------------


def test_no_updates_returns_the_global_unchanged_as_copies() -> None:
    # Given
    global_t = to_torch(make_global(np.random.default_rng(9)))
    snapshot = {k: v.clone() for k, v in global_t.items()}

    # When
    got = aggregate(global_t, [])

    # Then: equal bit for bit, and not aliasing the input
    assert set(got) == set(global_t)
    for k in global_t:
        assert torch.equal(got[k], snapshot[k])
        got[k].add_(1.0)
        assert torch.equal(global_t[k], snapshot[k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_result_keeps_the_global_dtype(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(10)
    global_t = {k: v.to(dtype) for k, v in to_torch(make_global(rng)).items()}
    update = {k: v.to(dtype) for k, v in to_torch(make_update(rng, {0: 3})).items()}
    got = aggregate(global_t, [WeightedUpdate(update, 2.0)])
    assert {v.dtype for v in got.values()} == {dtype}
    assert torch.equal(got[key(0, "query", "A")][:3], update[key(0, "query", "A")])
    assert torch.equal(got[key(0, "query", "A")][3:], global_t[key(0, "query", "A")][3:])


def _error(updates: list[tuple[dict[str, np.ndarray], float]]) -> str:
    global_np = make_global(np.random.default_rng(11))
    with pytest.raises(ValueError) as info:
        run(global_np, updates)
    return str(info.value)


def test_unknown_key_is_refused() -> None:
    update = make_update(np.random.default_rng(12), {0: 8})
    update[key(BLOCKS, "query", "A")] = np.zeros((8, D_IN), np.float32)  # a block the global lacks
    assert "lacks" in _error([(update, 1.0)])


@pytest.mark.parametrize(
    ("k", "shape"),
    [
        (HEAD_W, (LABELS + 1, D_IN)),
        (HEAD_W, (LABELS,)),
        (HEAD_B, (LABELS, 1)),
        (key(0, "query", "A"), (GLOBAL_RANK, D_IN + 1)),  # wrong non-rank dimension
        (key(0, "query", "B"), (D_OUT - 1, 4)),
        (key(0, "query", "A"), (D_IN, GLOBAL_RANK)),  # transposed
        (key(0, "query", "A"), (GLOBAL_RANK, D_IN, 1)),
    ],
)
def test_wrong_shape_is_refused(k: str, shape: tuple[int, ...]) -> None:
    update = make_update(np.random.default_rng(13), {0: 8})
    update[k] = np.zeros(shape, np.float32)
    assert "does not fit" in _error([(update, 1.0)])


@pytest.mark.parametrize("factor", ["A", "B"])
def test_rank_above_the_global_rank_is_refused(factor: Factor) -> None:
    update = make_update(np.random.default_rng(14), {0: 8})
    update[key(0, "value", factor)] = np.zeros(lora_shape(factor, GLOBAL_RANK + 1), np.float32)
    assert "does not fit" in _error([(update, 1.0)])


@pytest.mark.parametrize("weight", [0.0, -1.0, -0.0, math.nan, math.inf, -math.inf])
def test_weight_must_be_positive_and_finite(weight: float) -> None:
    # A NaN or infinite weight would turn every averaged value into NaN
    rng = np.random.default_rng(15)
    good, bad = make_update(rng, {0: 8}), make_update(rng, {0: 8})
    assert "weight" in _error([(good, 1.0), (bad, weight)])


# ---- aggregator/validation.py --------------------------------------------------------------------


def _shapes_case() -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    tensors = to_torch(make_update(np.random.default_rng(16), {0: 4}))
    expected = {k: tuple(v.shape) for k, v in tensors.items()}
    return tensors, expected


def _shape_mismatch(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> str:
    with pytest.raises(DecodeError) as info:
        check_update_shapes(tensors, expected)
    assert info.value.reason == "shape_mismatch"
    return info.value.detail


def test_exact_match_passes() -> None:
    tensors, expected = _shapes_case()
    assert check_update_shapes(tensors, expected) is None


def test_empty_matches_empty() -> None:
    check_update_shapes({}, {})


def test_missing_key_is_named() -> None:
    tensors, expected = _shapes_case()
    gone = key(0, "value", "B")
    del tensors[gone]
    detail = _shape_mismatch(tensors, expected)
    assert "missing" in detail and gone in detail
    assert "unexpected" not in detail and "wrong shape" not in detail


def test_unexpected_key_is_named() -> None:
    tensors, expected = _shapes_case()
    extra = key(3, "query", "A")
    tensors[extra] = torch.zeros(4, D_IN)
    detail = _shape_mismatch(tensors, expected)
    assert "unexpected" in detail and extra in detail
    assert "missing" not in detail


def test_wrong_shape_is_named_with_both_shapes() -> None:
    tensors, expected = _shapes_case()
    k = key(0, "query", "A")
    tensors[k] = torch.zeros(2, D_IN)  # rank 2 where the task asked for 4
    detail = _shape_mismatch(tensors, expected)
    assert "wrong shape" in detail and k in detail
    assert str((2, D_IN)) in detail and str((4, D_IN)) in detail


def test_all_three_problems_reported_together() -> None:
    tensors, expected = _shapes_case()
    del tensors[HEAD_B]
    tensors["surprise"] = torch.zeros(1)
    tensors[HEAD_W] = torch.zeros(1, 1)
    detail = _shape_mismatch(tensors, expected)
    for word in ("missing", "unexpected", "wrong shape", HEAD_B, "surprise", HEAD_W):
        assert word in detail


def test_same_numel_different_shape_is_a_mismatch() -> None:
    tensors, expected = _shapes_case()
    tensors[HEAD_W] = tensors[HEAD_W].reshape(-1)
    assert HEAD_W in _shape_mismatch(tensors, expected)


# ---- coverage (aggregation_coverage): partial coverage moves part of the way -------------------------


def coverage_oracle(
    global_np: dict[str, np.ndarray], updates: list[tuple[dict[str, np.ndarray], float]], coverage: float
) -> dict[str, np.ndarray]:
    """Element by element: the global value moved (covering weight / all weight) ** coverage of the way
    to the covering updates' weighted mean."""
    total = sum(w for _, w in updates)
    means = oracle(global_np, updates)
    result = {}
    for k, g in global_np.items():
        out = g.astype(np.float64).copy()
        for idx in np.ndindex(*g.shape):
            den = sum(weight for tensors, weight in updates if covers(tensors, k, idx))
            if den > 0:
                out[idx] = g[idx] + (den / total) ** coverage * (float(means[k][idx]) - float(g[idx]))
        result[k] = out.astype(g.dtype)
    return result


@pytest.mark.parametrize("coverage", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("seed", range(4))
def test_coverage_moves_a_partly_trained_element_its_share_of_the_way(seed: int, coverage: float) -> None:
    rng = np.random.default_rng(300 + seed)
    global_np = make_global(rng)
    updates = random_updates(rng, int(rng.integers(2, 6)))
    got = aggregate(to_torch(global_np), [WeightedUpdate(to_torch(t), w) for t, w in updates], coverage)
    assert_close({k: v.numpy() for k, v in got.items()}, coverage_oracle(global_np, updates, coverage))


def test_coverage_one_is_fedavg_where_the_devices_that_did_not_train_a_block_send_it_back() -> None:
    rng = np.random.default_rng(7)
    global_np = make_global(rng)
    u1 = make_update(rng, {0: GLOBAL_RANK, 1: GLOBAL_RANK, 2: GLOBAL_RANK, 3: GLOBAL_RANK})
    u2 = make_update(rng, {3: GLOBAL_RANK})  # a shallow device: the top block only
    damped = aggregate(
        to_torch(global_np), [WeightedUpdate(to_torch(u1), 1.0), WeightedUpdate(to_torch(u2), 3.0)], 1.0
    )
    # the same shallow device, sending back the global value of every block it did not train
    u2_full = {**{k: v for k, v in global_np.items() if k not in u2}, **u2}
    fedavg = aggregate(
        to_torch(global_np), [WeightedUpdate(to_torch(u1), 1.0), WeightedUpdate(to_torch(u2_full), 3.0)]
    )
    for k in global_np:
        np.testing.assert_allclose(damped[k].numpy(), fedavg[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    k0 = key(0, "query", "A")  # device 1 alone: a quarter of the weight, a quarter of the way
    want = global_np[k0] + 0.25 * (u1[k0] - global_np[k0])
    np.testing.assert_allclose(damped[k0].numpy(), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(damped[k0].numpy(), u1[k0])  # not contributor-only any more


def test_coverage_leaves_fully_trained_elements_as_plain_fedavg() -> None:
    rng = np.random.default_rng(8)
    global_np = make_global(rng)
    ranks = {b: GLOBAL_RANK for b in range(BLOCKS)}
    updates = [(make_update(rng, ranks), 2.0), (make_update(rng, ranks), 5.0)]
    plain = run(global_np, updates)
    damped = aggregate(to_torch(global_np), [WeightedUpdate(to_torch(t), w) for t, w in updates], 1.0)
    for k in global_np:
        np.testing.assert_allclose(damped[k].numpy(), plain[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_the_configured_merge_applies_aggregation_coverage() -> None:
    rng = np.random.default_rng(9)
    global_np = make_global(rng)
    updates = [
        (make_update(rng, {0: GLOBAL_RANK, 3: GLOBAL_RANK}), 1.0),
        (make_update(rng, {3: GLOBAL_RANK}), 2.0),
    ]
    weighted = [WeightedUpdate(to_torch(t), w) for t, w in updates]
    got = merge(parse_run_config({"aggregation_coverage": 1.0}), to_torch(global_np), weighted)
    want = coverage_oracle(global_np, updates, 1.0)
    assert_close({k: v.numpy() for k, v in got.items()}, want)
    plain = merge(parse_run_config({}), to_torch(global_np), weighted)
    assert not np.allclose(plain[key(0, "query", "A")].numpy(), want[key(0, "query", "A")])
