"""Robust aggregation against numpy oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aggregator.merge.rankwise import WeightedUpdate
from aggregator.merge.robust import aggregate_robust, clip_updates

HEAD = "base_model.model.classifier.weight"
A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"


def _updates(values: list[np.ndarray], weights: list[float], key: str = HEAD) -> list[WeightedUpdate]:
    return [
        WeightedUpdate({key: torch.tensor(v, dtype=torch.float32)}, w)
        for v, w in zip(values, weights, strict=True)
    ]


def _trimmed(values: np.ndarray, weights: np.ndarray, trim: float) -> np.ndarray:
    n = values.shape[0]
    cut = int(np.floor(trim * n))
    out = np.empty(values.shape[1:])
    for idx in np.ndindex(values.shape[1:]):
        column = values[(slice(None), *idx)]
        order = np.argsort(column, kind="stable")[cut : n - cut]
        out[idx] = np.average(column[order], weights=weights[order])
    return out


@pytest.mark.parametrize("n", [3, 5, 8])
@pytest.mark.parametrize("trim", [0.0, 0.2, 0.34])
def test_trimmed_mean_matches_the_oracle(n: int, trim: float) -> None:
    rng = np.random.default_rng(n)
    values = rng.normal(size=(n, 2, 3))
    weights = rng.uniform(1, 10, size=n)
    merged = aggregate_robust(
        {HEAD: torch.zeros(2, 3)}, _updates(list(values), list(weights)), method="trimmed_mean", trim=trim
    )
    np.testing.assert_allclose(merged[HEAD].numpy(), _trimmed(values, weights, trim), atol=1e-5)


@pytest.mark.parametrize("n", [4, 5])
def test_median_matches_numpy(n: int) -> None:
    values = np.random.default_rng(7).normal(size=(n, 3, 2))
    merged = aggregate_robust({HEAD: torch.zeros(3, 2)}, _updates(list(values), [1.0] * n), method="median")
    np.testing.assert_allclose(merged[HEAD].numpy(), np.median(values, axis=0), atol=1e-6)


def test_a_scaled_update_moves_the_median_little_and_the_mean_a_lot() -> None:
    clean = [np.full((2, 3), v) for v in (1.0, 1.1, 0.9, 1.05)]
    poisoned = [*clean, np.full((2, 3), 100.0)]
    median = aggregate_robust({HEAD: torch.zeros(2, 3)}, _updates(poisoned, [1.0] * 5), method="median")
    assert float(median[HEAD].max()) <= 1.1


def test_rank_wise_robust_statistic_uses_only_devices_covering_each_rank_index() -> None:
    # Given rank-1 and rank-2 updates of a rank-2 A factor
    g = {A: torch.full((2, 3), 7.0)}
    ups = [
        WeightedUpdate({A: torch.full((1, 3), 1.0)}, 1.0),
        WeightedUpdate({A: torch.full((2, 3), 3.0)}, 1.0),
        WeightedUpdate({A: torch.full((2, 3), 5.0)}, 1.0),
    ]
    merged = aggregate_robust(g, ups, method="median")[A]
    assert merged[0].tolist() == [3.0, 3.0, 3.0]  # median of 1, 3, 5
    assert merged[1].tolist() == [4.0, 4.0, 4.0]  # median of 3, 5 (the rank-1 device does not cover it)


def test_clipping_bounds_the_change_and_keeps_its_direction() -> None:
    g = {HEAD: torch.ones(2, 2)}
    ups = [
        WeightedUpdate({HEAD: torch.ones(2, 2) + 30.0}, 1.0),
        WeightedUpdate({HEAD: torch.ones(2, 2) + 0.1}, 1.0),
    ]
    clipped = clip_updates(g, ups, clip_norm=2.0)
    big = (clipped[0].tensors[HEAD] - 1.0).double()
    assert float(big.norm()) == pytest.approx(2.0, rel=1e-6)
    assert torch.allclose(big / big.norm(), torch.full((2, 2), 0.5, dtype=torch.float64))
    assert torch.allclose(clipped[1].tensors[HEAD], ups[1].tensors[HEAD])  # under the bound: unchanged


def test_bad_parameters_are_refused() -> None:
    g = {HEAD: torch.zeros(1)}
    with pytest.raises(ValueError, match="unknown robust method"):
        aggregate_robust(g, [], method="mode")
    with pytest.raises(ValueError, match="trim"):
        aggregate_robust(g, [], method="trimmed_mean", trim=0.5)
    with pytest.raises(ValueError, match="clip_norm"):
        clip_updates(g, [], clip_norm=float("nan"))
