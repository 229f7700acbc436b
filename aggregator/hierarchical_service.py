"""The aggregator of hierarchical (HierFedLoRA-style) runs: group rounds, then global rounds.

An intra-group round closes like any round (quorum or deadline, exactly once); its updates are merged
into the *group's* adapter (the configured merge: per block over the devices that trained it,
rank-aware, optionally robust), and the group's aggregation is counted in the state store, atomically
with the check whether every group has reached its target frequency. The call that completes the
last group makes the global round ready (once); the global aggregation then merges the group
adapters per block over the groups that trained it, weighted by the groups' samples
(:func:`merge_groups`), evaluates, checkpoints and asks the orchestrator to replan.

An intra-group round whose measured time drifts from the planned one by more than
``legend.replan_drift`` also asks for a replan (before its ``RoundClosed``, so the orchestrator can
change the group's target before it opens the next round).

Crash safety follows the flat aggregator: the group adapter is stored with the round's number as its
version before anything is counted, so a restarted aggregator that finds the round still pending
does not merge it again; counting and marking are idempotent in the state store; a ready global
round waits in the state store's outbox until it is marked aggregated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from aggregator.merge.rankwise import WeightedUpdate, aggregate
from aggregator.merge.registry import merge
from aggregator.service import AggregatorService, checkpoint_dir
from lorafleet.ml.lora import Tensors, parse_key
from lorafleet.run.round_numbers import IntraRound, parse_round
from lorafleet.run.start_adapter import start_adapter
from schemas.config import RunConfig
from schemas.messages import LoraSpec, ReplanRequest, RoundClosed
from schemas.tensors import tensors_from_bytes, tensors_to_bytes

log = logging.getLogger(__name__)


def trained_part(tensors: Tensors, blocks: set[int]) -> Tensors:
    """The tensors of ``blocks`` and the shared ones (head): what a group trained."""
    out = {}
    for key, tensor in tensors.items():
        block = parse_key(key).block
        if block is None or block in blocks:
            out[key] = tensor
    return out


def merge_groups(current: Tensors, groups: Sequence[WeightedUpdate], coverage: float = 0.0) -> Tensors:
    """The global adapter from the groups' adapters (each restricted to what the group trained):
    per key, the weighted mean over the groups that trained it; keys nobody trained keep ``current``.
    ``coverage`` (``aggregation_coverage``): a key only some groups trained moves their share of the
    samples, to that power, of the way (aggregator/merge/rankwise.py)."""
    return aggregate(current, groups, coverage)


class HierarchicalAggregator(AggregatorService):
    """The aggregator of hierarchical runs: intra-group rounds into group adapters, then global rounds."""

    @property
    def open_window(self) -> int:  # type: ignore[override]
        return 3 * self.config.hier.most_groups + 3  # every group's round may be open at once

    # -- intra-group rounds -----------------------------------------------------------------------
    def _aggregate(self, round_no: int) -> None:
        parsed = parse_round(round_no)
        if parsed is None:
            raise RuntimeError(f"round {round_no} is not an intra-group round of a hierarchical run")
        started = time.perf_counter()
        stored, messages = self._round_updates(round_no)
        group_stored = self.state.get_group_adapter(self.run_id, parsed.group)
        if group_stored is None or group_stored[0] < round_no:
            start = start_adapter(self.state, self.run_id, round_no)
            merged = merge(self.config, start, self._weighted(round_no, messages))
            self.state.put_group_adapter(self.run_id, parsed.group, round_no, tensors_to_bytes(merged))
        closed = self._record_round_metrics(round_no, stored, messages, started, extra=parsed._asdict())
        virtual = max((m.metrics.device_time_s for m in messages), default=0.0)
        self._check_drift(round_no, parsed, virtual)
        progress = self.state.record_group_aggregation(
            self.run_id, parsed.global_round, parsed.group, round_no
        )
        self._publish(closed.model_copy(update={"global_version": parsed.global_round - 1}))
        self.state.mark_aggregated(self.run_id, round_no, parsed.global_round - 1)
        self._compact(round_no, stored, messages)
        log.info(
            "aggregator: global round %d group %d round %d closed (%s) with %d/%d updates; group at %d/%d",
            parsed.global_round,
            parsed.group,
            parsed.step,
            closed.reason,
            closed.devices_reported,
            closed.tasks_issued,
            progress.count,
            progress.target,
        )

    def _check_drift(self, round_no: int, parsed: IntraRound, measured_s: float) -> None:
        """Ask for a replan when the round took much longer or shorter than planned."""
        planned = float(self.state.get_round_metrics(self.run_id).get(round_no, {}).get("planned_round_s", 0))
        if planned <= 0 or measured_s <= 0:
            return  # a profiling round, or nothing measured
        drift = abs(measured_s - planned) / planned
        if drift > self.config.legend.replan_drift:
            self._publish(
                ReplanRequest(
                    run_id=self.run_id,
                    round=round_no,
                    reason=(
                        f"drift: group {parsed.group} round took {measured_s:.3f} s, planned {planned:.3f} s"
                    ),
                )
            )
            self.state.incr_counter(self.run_id, "replan_drift")

    # -- global rounds ----------------------------------------------------------------------------
    def _after_aggregations(self) -> bool:
        pending = self.state.pending_global_aggregations(self.run_id)
        for global_round in pending:
            self._aggregate_global(global_round)
        return bool(pending)

    def _group_rounds(self, global_round: int) -> dict[int, list[int]]:
        """The intra-group rounds each group ran in ``global_round`` (aggregated ones), in order."""
        out: dict[int, list[int]] = {}
        for r in self.state.list_rounds(self.run_id):
            parsed = parse_round(r)
            if parsed is not None and parsed.global_round == global_round:
                info = self.state.get_round(self.run_id, r)
                if info is not None and info.status == "aggregated":
                    out.setdefault(parsed.group, []).append(r)
        return {g: sorted(rs) for g, rs in out.items()}

    def _group_contribution(self, group: int, last_round: int) -> WeightedUpdate | None:
        """A group's adapter restricted to the blocks its last round trained, weighted by its devices'
        samples; None when the group's adapter is not from this global round."""
        stored = self.state.get_group_adapter(self.run_id, group)
        if stored is None or stored[0] < last_round:
            return None
        info = self.state.get_round(self.run_id, last_round)
        assert info is not None
        blocks: set[int] = set()
        for task in info.tasks:
            spec = self.state.get_task_spec(self.run_id, last_round, task)
            if spec is not None:
                blocks |= set(LoraSpec.model_validate_json(spec).layer_ranks)
        registered = self.state.get_devices(self.run_id)
        samples = sum(int(registered.get(d, {}).get("num_samples", 0)) for d in info.tasks.values())
        return WeightedUpdate(trained_part(tensors_from_bytes(stored[1]), blocks), float(max(1, samples)))

    def _aggregate_global(self, global_round: int) -> None:
        started = time.perf_counter()
        version, current = self._global()
        per_group = self._group_rounds(global_round)
        metrics = self.state.get_round_metrics(self.run_id)
        if version >= global_round:
            merged = current  # aggregated before a crash; the stored result stands
        else:
            trained = {  # a group none of whose devices reported kept the old adapter: it does not pull
                g: rs
                for g, rs in per_group.items()
                if any(metrics.get(r, {}).get("devices_reported") for r in rs)
            }
            contributions = [
                c
                for g, rs in sorted(trained.items())
                if (c := self._group_contribution(g, rs[-1])) is not None
            ]
            merged = merge_groups(current, contributions, self.config.coverage)
            self.state.put_global_adapter(self.run_id, global_round, tensors_to_bytes(merged))
        if self.out_dir is not None and self.write_checkpoint is not None:
            self.write_checkpoint(self._global_spec(), merged, checkpoint_dir(self.out_dir, global_round))
        intra = [metrics.get(r, {}) for rs in per_group.values() for r in rs]
        group_time = {
            g: sum(float(metrics.get(r, {}).get("virtual_round_s", 0.0)) for r in rs)
            for g, rs in per_group.items()
        }
        devices: dict[str, object] = {}
        for rs in per_group.values():
            for r in rs:  # the latest measurement of each device
                devices.update(metrics.get(r, {}).get("devices", {}))
        tasks_issued = sum(int(m.get("tasks_issued", 0)) for m in intra)
        devices_reported = sum(int(m.get("devices_reported", 0)) for m in intra)
        bytes_up = sum(int(m.get("bytes_up", 0)) for m in intra)
        self.state.put_round_metrics(
            self.run_id,
            global_round,
            {
                "devices_reported": devices_reported,
                "virtual_round_s": max(group_time.values(), default=0.0),
                "group_virtual_s": {str(g): t for g, t in sorted(group_time.items())},
                "group_rounds": {str(g): len(rs) for g, rs in sorted(per_group.items())},
                "devices": devices,
                "reports": sum(int(m.get("reports", 0)) for m in intra),
                "tasks_issued": tasks_issued,
                "bytes_up": bytes_up,
                "bytes_down": sum(int(m.get("bytes_down", 0)) for m in intra),
                "close_reason": "global",
                "closed_at": self.clock.now(),
                "aggregation_s": time.perf_counter() - started,
            },
        )
        self._publish(
            RoundClosed(
                run_id=self.run_id,
                round=global_round,
                reason="global",
                tasks_issued=tasks_issued,
                devices_reported=devices_reported,
                bytes_up=bytes_up,
                global_version=global_round,
            )
        )
        self.state.mark_global_aggregated(self.run_id, global_round)
        self._publish(
            ReplanRequest(run_id=self.run_id, round=global_round, reason=f"global aggregation {global_round}")
        )
        self._to_evaluate.append(global_round)
        self._checkpointed(global_round)
        log.info(
            "aggregator: global round %d aggregated over %d groups (%s intra-group rounds)",
            global_round,
            len(per_group),
            ", ".join(f"g{g}: {len(rs)}" for g, rs in sorted(per_group.items())),
        )


def aggregator_class(config: RunConfig) -> type[AggregatorService]:
    """The aggregator for a run's strategy."""
    return HierarchicalAggregator if config.hierarchical else AggregatorService
