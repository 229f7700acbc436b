"""Strategies (planners behind one signature) and the baseline merge rules, against oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aggregator.merge.hetlora import aggregate_hetlora
from aggregator.merge.rankwise import WeightedUpdate
from aggregator.merge.svd import aggregate_svd
from lorafleet.devices.costmodel import CostModel
from orchestrator.capacity import DeviceEstimate
from orchestrator.planners.context import PlanningContext, RoundPlan, size_model
from orchestrator.planners.legend import DeviceInput
from orchestrator.planners.registry import STRATEGIES
from orchestrator.planners.specs import global_spec
from schemas.config import parse_run_config

COST = CostModel("test", 6, embed_s=1e-6, prefix_block_s=2e-6, train_block_s=6e-6, head_s=1e-6, step_s=0.0)
HEAD_W, HEAD_B = "base_model.model.classifier.weight", "base_model.model.classifier.bias"


def key(block: int, module: str, factor: str) -> str:
    return f"base_model.model.bert.encoder.layer.{block}.attention.self.{module}.lora_{factor}.weight"


def global_adapter(blocks: int = 6, rank: int = 16, d_in: int = 8, d_out: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for b in range(blocks):
        for m in ("query", "value"):
            out[key(b, m, "A")] = torch.randn(rank, d_in, generator=gen)
            out[key(b, m, "B")] = torch.randn(d_out, rank, generator=gen)
    out[HEAD_W] = torch.randn(2, d_out, generator=gen)
    out[HEAD_B] = torch.randn(2, generator=gen)
    return out


def context(strategy: str, slowdowns: list[float | None], round_no: int = 2) -> PlanningContext:
    config = parse_run_config(
        {"strategy": strategy, "devices": {"count": len(slowdowns)}, "lora": {"rank": 8}}
    )
    devices = [
        DeviceInput(f"d{i}", 100, None if s is None else DeviceEstimate(s, 1e9, 1e9, 20.0))
        for i, s in enumerate(slowdowns)
    ]
    return PlanningContext(round_no, devices, 6, config, COST, size_model(global_adapter()))


def test_size_model_counts_bytes_per_rank_and_fixed_bytes() -> None:
    sizes = size_model(global_adapter(d_in=8, d_out=10))
    assert sizes.per_rank_bytes == dict.fromkeys(range(6), 2 * (8 + 10) * 4)
    assert sizes.payload_bytes({5: 3}) == sizes.fixed_bytes + 3 * 2 * 18 * 4
    assert sizes.fixed_bytes > (2 * 10 + 2) * 4


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_plans_every_device_within_the_global_adapter(name: str) -> None:
    ctx = context(name, [1.0, 1.0, 2.5, 2.5, 6.0, 6.0])
    plan = STRATEGIES[name](ctx)
    assert isinstance(plan, RoundPlan)
    assert [p.device_id for p in plan.plans] == [d.device_id for d in ctx.devices]
    top = global_spec(ctx.config, 6).layer_ranks
    for p in plan.plans:
        assert all(b in top and r <= top[b] for b, r in p.lora.layer_ranks.items())


def test_hetlora_gives_the_fastest_third_the_highest_rank_on_every_block() -> None:
    plan = STRATEGIES["hetlora"](context("hetlora", [6.0, 1.0, 2.5, 1.0, 6.0, 2.5, None]))
    ranks = {p.device_id: set(p.lora.layer_ranks.values()) for p in plan.plans}
    assert all(len(p.lora.layer_ranks) == 6 for p in plan.plans)
    assert ranks["d1"] == ranks["d3"] == {16}
    assert ranks["d2"] == ranks["d5"] == {8}
    assert ranks["d0"] == ranks["d4"] == ranks["d6"] == {4}  # slowest and unmeasured: lowest rank


def test_fedra_uses_legends_budget_with_random_blocks_that_change_by_round() -> None:
    slowdowns = [1.0, 2.5, 6.0] * 4
    budget = STRATEGIES["legend_uniform_rank"](context("fedra", slowdowns))
    first = STRATEGIES["fedra"](context("fedra", slowdowns, round_no=2))
    again = STRATEGIES["fedra"](context("fedra", slowdowns, round_no=2))
    later = STRATEGIES["fedra"](context("fedra", slowdowns, round_no=3))
    assert [len(p.lora.layer_ranks) for p in first.plans] == [len(p.lora.layer_ranks) for p in budget.plans]
    assert first == again
    assert [p.lora.layer_ranks for p in first.plans] != [p.lora.layer_ranks for p in later.plans]
    assert all(set(p.lora.layer_ranks.values()) == {8} for p in first.plans)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def test_hetlora_merge_is_zero_padded_and_norm_weighted() -> None:
    # Given a global rank-4 block and two devices with ranks 2 and 4
    g = {
        key(0, "query", "A"): torch.zeros(4, 3),
        key(0, "query", "B"): torch.zeros(5, 4),
        HEAD_W: torch.zeros(2, 5),
    }
    gen = torch.Generator().manual_seed(1)
    ups = [
        WeightedUpdate(
            {
                key(0, "query", "A"): torch.randn(r, 3, generator=gen),
                key(0, "query", "B"): torch.randn(5, r, generator=gen),
                HEAD_W: torch.randn(2, 5, generator=gen),
            },
            w,
        )
        for r, w in ((2, 1.0), (4, 3.0))
    ]
    merged = aggregate_hetlora(g, ups)
    # Then (oracle): weights n_i * ||B_i A_i||_F, ranks a device lacks count as zeros
    ws = [
        u.weight * np.linalg.norm(_np(u.tensors[key(0, "query", "B")]) @ _np(u.tensors[key(0, "query", "A")]))
        for u in ups
    ]
    a = np.zeros((4, 3))
    b = np.zeros((5, 4))
    for w, u in zip(ws, ups, strict=True):
        ua, ub = _np(u.tensors[key(0, "query", "A")]), _np(u.tensors[key(0, "query", "B")])
        a[: ua.shape[0]] += w * ua
        b[:, : ub.shape[1]] += w * ub
    np.testing.assert_allclose(_np(merged[key(0, "query", "A")]), a / sum(ws), atol=1e-6)
    np.testing.assert_allclose(_np(merged[key(0, "query", "B")]), b / sum(ws), atol=1e-6)
    head = (1.0 * _np(ups[0].tensors[HEAD_W]) + 3.0 * _np(ups[1].tensors[HEAD_W])) / 4.0
    np.testing.assert_allclose(_np(merged[HEAD_W]), head, atol=1e-6)


def test_svd_merge_reproduces_the_averaged_product_when_its_rank_fits() -> None:
    # Given devices that share A (so the weighted mean of B_i A is of rank <= 3)
    gen = torch.Generator().manual_seed(2)
    shared_a = torch.randn(3, 6, generator=gen)
    g = {
        key(1, "value", "A"): torch.zeros(4, 6),
        key(1, "value", "B"): torch.zeros(7, 4),
        HEAD_W: torch.zeros(2, 7),
    }
    ups = [
        WeightedUpdate(
            {
                key(1, "value", "A"): shared_a,
                key(1, "value", "B"): torch.randn(7, 3, generator=gen),
                HEAD_W: torch.randn(2, 7, generator=gen),
            },
            w,
        )
        for w in (2.0, 5.0)
    ]
    merged = aggregate_svd(g, ups)
    target = sum(u.weight * _np(u.tensors[key(1, "value", "B")]) @ _np(shared_a) for u in ups) / 7.0
    got = _np(merged[key(1, "value", "B")]) @ _np(merged[key(1, "value", "A")])
    np.testing.assert_allclose(got, target, atol=1e-5)
    assert merged[key(1, "value", "A")].shape == (4, 6)
