"""Merging the hierfedlora benchmark's JSON from parallel processes (benchmarks/hierfedlora.py)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from benchmarks.hierfedlora import VARIANTS, base_config, merge_results
from schemas.config import merge_overrides, parse_run_config

FLAGS = "--devices 21 --resume --runs runs/r"


def result(
    dataset: str, alpha: float, rows: dict[str, float], *, target: float = 0.25, out: str = "o"
) -> dict[str, Any]:
    names = ",".join(rows)
    command = (
        f"python benchmarks/hierfedlora.py --datasets {dataset} --alphas {alpha} {FLAGS}"
        f" --strategies {names} --out runs/{out}"
    )
    return {
        "command": command,
        "partial": False,
        "wall_s": 10.0,
        "runs": [
            {
                "dataset": dataset,
                "alpha": alpha,
                "target": target,
                "budget_virtual_s": 300.0,
                "command": command,
                "strategies": {name: {"accuracy_at_budget": acc} for name, acc in rows.items()},
            }
        ],
    }


def test_rows_of_one_pair_from_two_processes_come_out_together_in_benchmark_order() -> None:
    merged = merge_results(
        [
            result("sst2", 0.1, {"fedlora": 0.7, "hier_fixed_depth": 0.6}, out="a"),
            result("sst2", 0.1, {"fedlora": 0.7, "legend": 0.8, "hierfedlora": 0.75}, out="b"),
        ]
    )
    [entry] = merged["runs"]
    assert list(entry["strategies"]) == ["fedlora", "legend", "hierfedlora", "hier_fixed_depth"]
    assert entry["strategies"]["hier_fixed_depth"]["accuracy_at_budget"] == 0.6
    assert "--strategies fedlora,legend,hierfedlora,hier_fixed_depth" in entry["command"]
    assert "--out" not in entry["command"]
    assert merged["partial"]  # three strategies were never run
    assert len(merged["ran_as"]) == 2
    assert merged["wall_s"] == 20.0


def test_a_later_file_replaces_an_earlier_row_and_pairs_are_kept_apart() -> None:
    merged = merge_results(
        [
            result("sst2", 0.1, {"fedlora": 0.7, "legend": 0.5}),
            result("20newsgroups", 0.5, {"fedlora": 0.3}),
            result("sst2", 0.1, {"fedlora": 0.7, "legend": 0.9}),
        ]
    )
    assert [(e["dataset"], e["alpha"]) for e in merged["runs"]] == [("20newsgroups", 0.5), ("sst2", 0.1)]
    assert merged["runs"][1]["strategies"]["legend"]["accuracy_at_budget"] == 0.9
    assert merged["runs"][0]["command"].endswith("--strategies fedlora")  # one process, still no --out
    assert "--out" not in merged["runs"][0]["command"]
    assert "--datasets 20newsgroups,sst2 --alphas 0.1,0.5" in merged["command"]
    assert "--strategies" not in merged["command"]
    assert merged["setup"]["datasets"] == "20newsgroups,sst2"
    assert merged["setup"]["alphas"] == "0.1,0.5"
    assert merged["setup"]["strategies"] == "fedlora,legend"


def test_every_strategy_of_every_pair_makes_a_complete_result() -> None:
    rows = dict.fromkeys(VARIANTS, 0.5)
    assert not merge_results([result("sst2", 0.1, rows)])["partial"]


def test_a_partial_result_completed_by_the_rows_it_lacked_is_complete() -> None:
    # Given a partial result (a cut-short process) missing two strategies
    first = [n for n in VARIANTS if n not in ("hier_fixed_frequency", "hier_fixed_depth")]
    partial = result("sst2", 0.5, dict.fromkeys(first, 0.5)) | {"partial": True}
    # When the two processes that ran the missing rows are merged after it
    rest = [
        result("sst2", 0.5, {"fedlora": 0.5, name: 0.7})
        for name in ("hier_fixed_frequency", "hier_fixed_depth")
    ]
    merged = merge_results([partial, *rest])
    # Then every row is there and the result is no longer partial
    assert list(merged["runs"][0]["strategies"]) == list(VARIANTS)
    assert not merged["partial"]
    assert merge_results([partial, rest[0]])["partial"]  # without the second, one row is missing


def test_rows_measured_against_different_fedlora_runs_are_refused() -> None:
    with pytest.raises(ValueError, match="sst2 alpha 0.1: target"):
        merge_results(
            [result("sst2", 0.1, {"fedlora": 0.7}), result("sst2", 0.1, {"legend": 0.8}, target=0.3)]
        )


def test_reference_rows_from_one_process_join_the_rows_of_the_others() -> None:
    # Given the federated rows measured without references and the references by a third process
    rows = result("20newsgroups", 0.1, {"fedlora": 0.1, "legend": 0.2}, out="a")
    rows["command"] += " --no-references"
    rows["runs"][0]["command"] += " --no-references"
    refs = result("20newsgroups", 0.1, {"fedlora": 0.1}, out="r")
    refs["runs"][0]["references"] = {"centralized": {"final_accuracy": 0.5}}
    # When they are merged, either way round
    for merged in (merge_results([rows, refs]), merge_results([refs, rows])):
        [entry] = merged["runs"]
        # Then the pair has both, and no command says the references were skipped
        assert entry["references"] == {"centralized": {"final_accuracy": 0.5}}
        assert list(entry["strategies"]) == ["fedlora", "legend"]
        assert "--no-references" not in entry["command"] and "--no-references" not in merged["command"]


def test_held_from_is_when_a_curve_stays_at_or_above_the_target() -> None:
    from benchmarks.hierfedlora import held_from

    curve = [[1.0, 0.10], [2.0, 0.08], [3.0, 0.12], [4.0, 0.10], [5.0, 0.30]]
    assert held_from(curve, 0.10) == 3.0  # the crossing at 1.0 fell back below
    assert held_from(curve, 0.05) == 1.0
    assert held_from(curve, 0.31) is None
    assert held_from([[1.0, 0.2], [2.0, 0.05]], 0.1) is None  # ended below it


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_is_a_valid_run_configuration(name: str) -> None:
    """A row's overrides name real fields (a typo would fail only hours into a benchmark)."""
    args = argparse.Namespace(
        seed=0, quick=True, threads=1, samples_per_device=10, eval_samples=40, max_seq_len=64,
        coverage="auto", groups="auto", max_frequency=3, lr=0.5, optimizer="sgd", local_epochs=1,
        max_grad_norm=1.0, devices=80,
    )  # fmt: skip
    strategy, overrides = VARIANTS[name]
    config = parse_run_config(
        merge_overrides(base_config(args, "sst2", 0.1), overrides | {"strategy": strategy})
    )
    assert config.strategy.value == strategy
    if "training" in overrides:  # the unclipped rows really are unclipped
        assert config.training.max_grad_norm is None
