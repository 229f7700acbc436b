"""Federated evaluation's pure parts: the held-out draw, the eval: section, scores and their pooling,
what a signature covers, and the aggregator's checks of a device's result."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from aggregator.federated_eval import FederatedEvaluation
from lorafleet.data.datasets import TextDataset
from lorafleet.data.held_out import held_out_count, held_out_seed, split_held_out
from lorafleet.run.clock import FakeClock
from lorafleet.run.federated import EVAL_SCORES, EVAL_SENT, federated_entry, pooled
from lorafleet.security.signing import derive_device_key, sign, verify
from lorafleet.state.memory import InMemoryStateStore
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from lorafleet.transport.topology import declare_static_topology, device_eval_queue, eval_queue_name
from schemas.config import parse_run_config
from schemas.envelope import decode
from schemas.errors import ConfigError, Rejected
from schemas.messages import EvalResult, EvalScore, EvalTask, LoraSpec

FLEET = b"fleet-key-of-the-eval-tests-0123"


def _rows(n: int) -> TextDataset:
    return TextDataset([f"row {i}" for i in range(n)], [i % 2 for i in range(n)], 2, "synthetic")


# --------------------------------------------------------------------------- the held-out draw


@pytest.mark.parametrize(
    ("rows", "fraction", "held"),
    [(100, 0.2, 20), (10, 0.25, 2), (3, 0.1, 1), (2, 0.5, 1), (1, 0.5, 0), (0, 0.2, 0), (50, 0.0, 0)],
)
def test_held_out_count(rows: int, fraction: float, held: int) -> None:
    assert held_out_count(rows, fraction) == held


def test_the_draw_is_disjoint_seeded_and_per_device() -> None:
    rows = _rows(40)
    train, held = split_held_out(rows, 0.25, held_out_seed(7, "dev-0001"))
    # Then: 10 rows held out, the rest trained on, none in both, each part in the rows' order
    assert (len(train), len(held)) == (30, 10)
    assert set(train.texts).isdisjoint(held.texts)
    assert sorted(train.texts + held.texts) == sorted(rows.texts)
    assert held.texts == sorted(held.texts, key=rows.texts.index)
    assert held.labels == [int(t.split()[1]) % 2 for t in held.texts]
    # the same draw in any process (sha256, not hash()), another for another device or run seed
    assert split_held_out(rows, 0.25, held_out_seed(7, "dev-0001")) == (train, held)
    assert held_out_seed(7, "dev-0001") == held_out_seed(7, "dev-0001")
    others = {
        tuple(split_held_out(rows, 0.25, held_out_seed(s, d))[1].texts)
        for s, d in ((7, "dev-0002"), (8, "dev-0001"))
    }
    assert tuple(held.texts) not in others
    # fraction 0: everything trains
    assert split_held_out(rows, 0.0, 1) == (rows, rows.subset([]))


# --------------------------------------------------------------------------- configuration


def test_the_eval_section() -> None:
    config = parse_run_config({})
    assert config.eval.device_fraction == 0.0 and not config.eval.federated
    assert parse_run_config({"eval": {"device_fraction": 0.2}}).eval.federated
    for bad in (-0.1, 0.6, "0.2"):
        with pytest.raises(ConfigError, match="eval.device_fraction"):
            parse_run_config({"eval": {"device_fraction": bad}})
    with pytest.raises(ConfigError, match="eval.wait_s"):
        parse_run_config({"eval": {"wait_s": 0}})


def test_instruction_rows_as_device_local_data_need_the_aggregators_eval_file() -> None:
    base: dict[str, Any] = {"model": {"task": "causal_lm"}}
    local = {"dataset": "jsonl", "source": "local"}
    config = parse_run_config({**base, "data": {**local, "eval_path": "eval.jsonl"}})
    assert (config.data.source, config.data.dataset, config.data.path) == ("local", "jsonl", None)
    with pytest.raises(ConfigError, match="data.source local with data.dataset jsonl needs data.eval_path"):
        parse_run_config({**base, "data": local})
    with pytest.raises(ConfigError, match="data.path is the central file of data.source partition"):
        parse_run_config({**base, "data": {**local, "eval_path": "e.jsonl", "path": "train.jsonl"}})
    with pytest.raises(ConfigError, match="data.dataset jsonl needs data.path"):
        parse_run_config({**base, "data": {"dataset": "jsonl"}})


# --------------------------------------------------------------------------- scores


def test_scores_add_up_to_the_union_and_pool_by_rows() -> None:
    a = EvalScore(num_samples=10, correct=9, loss_sum=2.0, loss_count=10)
    b = EvalScore(num_samples=30, correct=15, loss_sum=24.0, loss_count=30)
    total = EvalScore.total([a, b])
    assert total == EvalScore(num_samples=40, correct=24, loss_sum=26.0, loss_count=40)
    # weighted by rows: (0.9 * 10 + 0.5 * 30) / 40, not the plain mean of 0.9 and 0.5
    assert total.accuracy == pytest.approx(0.6) and (a.accuracy + b.accuracy) / 2 == pytest.approx(0.7)
    assert total.loss == pytest.approx(0.65)
    causal = EvalScore(num_samples=4, correct=1, loss_sum=30.0, loss_count=12)  # per response token
    assert causal.loss == pytest.approx(2.5)
    metrics = {EVAL_SCORES: {"dev-0001": b.model_dump(), "dev-0000": a.model_dump()}}
    assert pooled(metrics) == total
    entry = federated_entry(metrics)
    assert entry["federated_accuracy"] == pytest.approx(0.6)
    assert entry["federated_devices"] == {"dev-0000": 10, "dev-0001": 30}
    assert federated_entry({}) == {
        "federated_accuracy": None,
        "federated_loss": None,
        "federated_devices": {},
    }


@pytest.mark.parametrize(
    "score",
    [
        {"num_samples": 5, "correct": 6, "loss_sum": 1.0, "loss_count": 5},  # more right than rows
        {"num_samples": 0, "correct": 0, "loss_sum": 0.0, "loss_count": 0},  # nothing evaluated
        {"num_samples": 5, "correct": 1, "loss_sum": -1.0, "loss_count": 5},
        {"num_samples": 5, "correct": 1, "loss_sum": math.inf, "loss_count": 5},
    ],
)
def test_an_impossible_result_does_not_decode(score: dict[str, Any]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        EvalResult.model_validate({"run_id": "r", "round": 1, "device_id": "dev-0001", "score": score})
    assert (
        EvalResult.model_validate(
            {
                "run_id": "r",
                "round": 1,
                "device_id": "dev-0001",
                "score": {**score, "num_samples": 6, "correct": 1, "loss_sum": 1.0},
            }
        ).score.num_samples
        == 6
    )


def test_a_signature_covers_the_result() -> None:
    result = EvalResult(
        run_id="r",
        round=2,
        device_id="dev-0001",
        score=EvalScore(num_samples=8, correct=6, loss_sum=3.0, loss_count=8),
    )
    signed = result.model_copy(update={"signature": sign(derive_device_key(FLEET, "dev-0001"), result)})
    assert verify(FLEET, signed)
    inflated = EvalScore(num_samples=8, correct=8, loss_sum=3.0, loss_count=8)
    for tamper in ({"score": inflated}, {"round": 3}, {"device_id": "dev-0002"}, {"run_id": "s"}):
        assert not verify(FLEET, signed.model_copy(update=tamper)), tamper
    assert not verify(FLEET, result)  # unsigned


# --------------------------------------------------------------------------- the aggregator's side

SPEC = LoraSpec(target_modules=["query"], layer_ranks={0: 2})


def _federated(
    task: str = "sequence_classification", **security: Any
) -> tuple[FederatedEvaluation, InMemoryBroker]:
    config = parse_run_config(
        {
            "run_id": "r",
            "model": {"name": "tiny", "task": task, "max_seq_len": 16},
            "data": {"dataset": "synthetic"},
            "devices": {"count": 3},
            "eval": {"device_fraction": 0.2, "wait_s": 10},
            "security": security,
        }
    )
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker)
    declare_static_topology(transport)
    state = InMemoryStateStore()
    for device, held in (("dev-0000", 5), ("dev-0001", 8), ("dev-0002", 0)):
        state.register_device("r", device, {"num_samples": 20, "eval_samples": held})
        transport.declare_queue(device_eval_queue(device))
    federated = FederatedEvaluation(transport, state, config, clock=FakeClock(), fleet_key=FLEET)
    return federated, broker


def _result(device: str = "dev-0001", round_no: int = 1, **score: Any) -> EvalResult:
    counts = {"num_samples": 8, "correct": 5, "loss_sum": 4.0, "loss_count": 8, **score}
    return EvalResult(run_id="r", round=round_no, device_id=device, score=EvalScore(**counts))


def test_the_task_goes_to_the_devices_that_hold_rows_out() -> None:
    federated, broker = _federated()
    federated.publish_task(1, SPEC, {"w": torch.ones(2)})
    sent = federated.state.get_round_metrics("r")[1][EVAL_SENT]
    assert sent["devices"] == ["dev-0000", "dev-0001"]  # dev-0002 holds nothing out
    for device in ("dev-0000", "dev-0001", "dev-0002"):  # the fanout reaches every bound queue
        ((body, _),) = broker.peek(eval_queue_name(device))
        task = decode(body)
        assert isinstance(task, EvalTask) and (task.round, task.lora) == (1, SPEC)
        assert len(body) == sent["bytes"]


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        (_result(round_no=2), "unknown_round"),
        (_result(device="dev-0009"), "unknown_device"),
        (_result(num_samples=9, loss_count=9), "samples_exceeded"),  # registered 8 held out
        (_result(device="dev-0002", num_samples=1, correct=0, loss_count=1), "samples_exceeded"),
        (_result(loss_count=80), "samples_exceeded"),  # a classifier has one loss term per row
    ],
)
def test_a_result_the_aggregator_cannot_vouch_for_is_refused(result: EvalResult, reason: str) -> None:
    federated, _ = _federated()
    federated.publish_task(1, SPEC, {"w": torch.ones(2)})
    with pytest.raises(Rejected) as info:
        federated.record(result)
    assert info.value.reason == reason
    assert EVAL_SCORES not in federated.state.get_round_metrics("r")[1]


def test_kept_results_first_one_stands_and_the_end_waits_for_the_missing_device() -> None:
    federated, _ = _federated()
    federated.publish_task(1, SPEC, {"w": torch.ones(2)})
    federated.state.put_run_field("r", "final_round", 1)
    federated.record(_result())
    federated.record(_result(correct=8))  # a second opinion changes nothing
    assert pooled(federated.state.get_round_metrics("r")[1]) == _result().score
    # dev-0000 was sent the task and has not reported: wait, up to eval.wait_s
    assert not federated.settled()
    clock = federated.clock
    assert isinstance(clock, FakeClock)
    clock.advance(9.0)
    assert not federated.settled()
    clock.advance(1.0)
    assert federated.settled()
    # ... or until it reports
    federated, _ = _federated()
    federated.publish_task(1, SPEC, {"w": torch.ones(2)})
    federated.state.put_run_field("r", "final_round", 1)
    federated.record(_result())
    federated.record(_result(device="dev-0000", num_samples=5, correct=5, loss_count=5))
    assert federated.settled()


def test_causal_results_count_response_tokens_within_the_rows() -> None:
    federated, _ = _federated(task="causal_lm")
    federated.publish_task(1, SPEC, {"w": torch.ones(2)})
    federated.record(_result(loss_count=30))  # 8 rows of at most 16 tokens
    for bad in (0, 8 * 16 + 1):
        with pytest.raises(Rejected, match="samples_exceeded"):
            federated.record(_result(device="dev-0000", num_samples=5, loss_count=bad))


def test_signatures_when_required() -> None:
    federated, _ = _federated(require_signatures=True)
    federated.publish_task(1, SPEC, {"w": torch.ones(2)})
    unsigned = _result()
    with pytest.raises(Rejected, match="bad_signature"):
        federated.record(unsigned)
    wrong_key = unsigned.model_copy(
        update={"signature": sign(derive_device_key(FLEET, "dev-0000"), unsigned)}
    )
    with pytest.raises(Rejected, match="bad_signature"):
        federated.record(wrong_key)
    signed = unsigned.model_copy(update={"signature": sign(derive_device_key(FLEET, "dev-0001"), unsigned)})
    federated.record(signed)
    assert pooled(federated.state.get_round_metrics("r")[1]) == unsigned.score


def test_an_evaluation_task_the_broker_refuses_is_skipped_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    federated, broker = _federated()
    federated.transport = InMemoryTransport(InMemoryBroker())  # no lf.eval exchange there
    federated.publish_task(1, SPEC, {"w": torch.ones(2)})
    assert EVAL_SENT not in federated.state.get_round_metrics("r").get(1, {})
    assert "round 1 not sent for federated evaluation" in caplog.text
    with pytest.raises(Rejected, match="unknown_round"):  # and no result for it is taken
        federated.record(_result())
