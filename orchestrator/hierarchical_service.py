"""The orchestrator of hierarchical (HierFedLoRA-style) runs: global rounds over near-IID groups.

Each global round ``h``: the registered devices are grouped (orchestrator/planners/grouping.py; regrouped
only when the members change, or once when every member has a speed estimate), a depth and an
intra-group aggregation frequency are planned per group (orchestrator/planners/hierfedlora.py), the global
round is opened in the state store with each group's target frequency, and every group's first
intra-group round is opened. From then on the groups run at their own pace: when the aggregator
closes one of a group's rounds, the group's next round opens at once (from the group's adapter),
until the group has reached its target. The aggregator merges the groups when the last one gets
there and asks for a replan, which opens global round ``h + 1`` from fresh measurements.

A drift ``ReplanRequest`` for an intra-group round (its measured time far from the planned one)
re-fits that group's frequency to what is left of the period.

The plan of a global round is stored with its metrics (``groups``: members, depth, frequency and
predicted times per group), so a restarted orchestrator resumes it instead of planning again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

from lorafleet.run.clock import to_ms
from lorafleet.run.round_numbers import intra_round, parse_round
from orchestrator.planners.context import PlanningContext
from orchestrator.planners.global_round import form_groups, plan_global_round
from orchestrator.planners.grouping import far_from_iid
from orchestrator.planners.specs import DevicePlan, lora_spec, top_ranks
from orchestrator.service import OrchestratorService
from schemas.config import RunConfig
from schemas.messages import LoraSpec, ReplanRequest, RoundClosed

log = logging.getLogger(__name__)


def refit_frequency(
    *, period_s: float, elapsed_s: float, round_s: float, done: int, opened: int, max_frequency: int
) -> int:
    """A group's new target after a drift: the rounds done, plus as many more as fit what is left of
    the period at the measured round time; never fewer than the rounds already opened."""
    more = math.floor(max(0.0, period_s - elapsed_s) / round_s * (1 + 1e-9)) if round_s > 0 else 0
    return max(opened, min(max_frequency, done + more), 1)


class HierarchicalOrchestrator(OrchestratorService):
    """:class:`OrchestratorService` whose rounds are global rounds over groups (module docstring)."""

    # -- planning ---------------------------------------------------------------------------------
    def _planning_context(self, round_no: int) -> PlanningContext:
        """The registered devices, less those whose lease has run out when ``plan_live_only`` (a
        vanished device would hold up each of its group's rounds until its lease ran out; it is
        planned again, and the groups formed again, once it heartbeats)."""
        ctx = super()._planning_context(round_no)
        if not self.plan_live_only:
            return ctx
        gone = set(self.state.expired_devices(self.run_id, to_ms(self.clock.now())))
        live = [d for d in ctx.devices if d.device_id not in gone]
        return replace(ctx, devices=live) if live else ctx

    def _groups(self, ctx: PlanningContext) -> tuple[list[list[str]], list[float]]:
        """The groups for this global round: the stored ones while their members and the knowledge
        of their speeds are unchanged, else new ones."""
        members = sorted(d.device_id for d in ctx.devices)
        speeds_known = all(d.estimate is not None for d in ctx.devices)
        saved = self.state.get_run_fields(self.run_id).get("grouping")
        if (
            isinstance(saved, dict)
            and saved.get("members") == members
            and saved.get("speeds_known") == speeds_known
        ):
            return saved["groups"], saved["divergence"]
        registered = self.state.get_devices(self.run_id)
        histograms = {d: list(registered[d].get("label_histogram") or []) for d in members}
        groups, divergence = form_groups(ctx, histograms)
        self.state.put_run_field(
            self.run_id,
            "grouping",
            {"members": members, "speeds_known": speeds_known, "groups": groups, "divergence": divergence},
        )
        log.info("orchestrator: %d groups of %s devices", len(groups), [len(g) for g in groups])
        threshold = self.config.hier.warn_divergence
        far = far_from_iid(divergence, threshold)
        if far:  # one group is the fleet itself (KL 0): only a split can be far from IID
            log.warning(
                "orchestrator: %d of %d groups are far from IID (label KL from the fleet's: %s, above "
                "hier.warn_divergence %.3g); such groups train worse than one flat fleet, fewer "
                "groups (hier.groups is %s) or more devices per group bring them nearer",
                len(far),
                len(groups),
                ", ".join(f"group {g} {divergence[g]:.3f}" for g in far),
                threshold,
                self.config.hier.groups,
            )
        return groups, divergence

    def _open_round(self, round_no: int) -> None:
        """Open global round ``round_no`` (planned now, or as planned before a restart)."""
        plan = self._stored_plan(round_no)
        if plan is None:
            ctx = self._planning_context(round_no)
            groups, divergence = self._groups(ctx)
            planned = plan_global_round(ctx, groups, divergence)
            plan = {
                str(g.group): {
                    "devices": g.devices,
                    "depth": g.depth,
                    "frequency": g.frequency,
                    "round_s": g.round_s,
                    "divergence": g.divergence,
                    "depths": {p.device_id: len(p.lora.layer_ranks) for p in g.plans},
                }
                for g in planned.groups
            }
            self.state.put_round_metrics(
                self.run_id,
                round_no,
                {
                    "opened_at": self.clock.now(),
                    "planned_round_s": planned.period_s,
                    "groups": plan,
                    "depths": {d: n for g in plan.values() for d, n in g["depths"].items()},
                },
            )
        self.state.open_global_round(
            self.run_id, round_no, {int(g): int(p["frequency"]) for g, p in plan.items()}
        )
        self.state.put_run_field(self.run_id, "round", round_no)
        self.round = round_no
        self.reporter.round_opened(round_no, sum(len(p["devices"]) for p in plan.values()))
        for group in sorted(plan, key=int):
            self._continue_group(round_no, int(group))

    def _stored_plan(self, global_round: int) -> dict[str, Any] | None:
        plan = self.state.get_round_metrics(self.run_id).get(global_round, {}).get("groups")
        return plan if isinstance(plan, dict) and plan else None

    def _spec(self, depth: int) -> LoraSpec:
        return lora_spec(self.config.lora, top_ranks(self.num_blocks, depth, self.config.lora.rank))

    # -- intra-group rounds ----------------------------------------------------------------------
    def _continue_group(self, global_round: int, group: int) -> None:
        """Open the group's next intra-group round, if it has not reached its target (idempotent)."""
        info = self.state.get_global_round(self.run_id, global_round)
        plan = self._stored_plan(global_round)
        if info is None or info.status != "open" or plan is None or group not in info.targets:
            return
        count, target = info.counts[group], info.targets[group]
        step = count + 1
        if count >= target:
            return
        round_no = intra_round(global_round, group, step)
        existing = self.state.get_round(self.run_id, round_no)
        if existing is not None:
            if existing.status == "open":
                self._publish_tasks(round_no)  # after a restart: its tasks may not all have gone out
            return
        entry = plan[str(group)]
        plans = [DevicePlan(d, self._spec(int(entry["depths"][d]))) for d in entry["devices"]]
        now = self.clock.now()
        self._open_state_round(round_no, plans, now)
        self.state.put_round_metrics(
            self.run_id,
            round_no,
            {
                "opened_at": now,
                "global_round": global_round,
                "group": group,
                "step": step,
                "tasks_issued": len(plans),
                "planned_round_s": float(entry["round_s"]),
                "depths": {p.device_id: len(p.lora.layer_ranks) for p in plans},
            },
        )
        self._publish_tasks(round_no)

    def _report_opened(self, round_no: int, tasks: int) -> None:
        parsed = parse_round(round_no)
        if parsed is None:
            super()._report_opened(round_no, tasks)
        else:
            log.info(
                "orchestrator: global round %d group %d round %d: %d tasks out",
                parsed.global_round,
                parsed.group,
                parsed.step,
                tasks,
            )

    # -- messages ---------------------------------------------------------------------------------
    def _poll_round_closed(self) -> None:
        """Go on when the store shows what no message announced (a ``RoundClosed`` that died with an
        aggregator between its write and its publish, or was announced from a state the store lost):
        the global round aggregated, or a group whose latest intra-group round is aggregated and whose
        next one, due, was never opened."""
        info = self.state.get_global_round(self.run_id, self.round)
        if info is None:
            return
        if info.status == "aggregated":
            if self._account_round(self.round):
                self._after_round(self.round)
            return
        for group in sorted(info.targets):
            step = info.counts[group] + 1
            due = step <= info.targets[group]
            if due and self.state.get_round(self.run_id, intra_round(self.round, group, step)) is None:
                self._continue_group(self.round, group)

    def _on_round_closed(self, message: RoundClosed) -> None:
        parsed = parse_round(message.round)
        if parsed is None:
            super()._on_round_closed(message)  # a global round: account it and go on (replan)
        elif parsed.global_round == self.round and self.phase == "running":
            self._continue_group(parsed.global_round, parsed.group)

    def _on_replan(self, message: ReplanRequest) -> None:
        parsed = parse_round(message.round)
        if parsed is None:
            # a global aggregation: the same as its RoundClosed (whichever comes first replans)
            current = message.round == self.round and self.phase in ("running", "finishing")
            if current and self._round_aggregated(message.round) and self._account_round(message.round):
                self._after_round(message.round)
            return
        if parsed.global_round != self.round or self.phase != "running":
            return
        self._refit_group(parsed.global_round, parsed.group)

    def _refit_group(self, global_round: int, group: int) -> None:
        """Re-fit a group's frequency to the rest of the period at its measured round time."""
        info = self.state.get_global_round(self.run_id, global_round)
        metrics = self.state.get_round_metrics(self.run_id)
        period = float(metrics.get(global_round, {}).get("planned_round_s", 0.0))
        if info is None or info.status != "open" or period <= 0:
            return
        done = info.counts[group]
        rounds = [intra_round(global_round, group, k) for k in range(1, done + 1)]
        elapsed = sum(float(metrics.get(r, {}).get("virtual_round_s", 0.0)) for r in rounds)
        last = float(metrics.get(rounds[-1], {}).get("virtual_round_s", 0.0)) if rounds else 0.0
        opened = sum(
            1
            for k in range(1, done + 2)
            if self.state.get_round(self.run_id, intra_round(global_round, group, k))
        )
        target = refit_frequency(
            period_s=period,
            elapsed_s=elapsed,
            round_s=last,
            done=done,
            opened=opened,
            max_frequency=self.config.hier.max_frequency,
        )
        progress = self.state.set_group_target(self.run_id, global_round, group, target)
        log.info(
            "orchestrator: drift in global round %d group %d: target %d -> %d",
            global_round,
            group,
            info.targets[group],
            progress.target,
        )

    # -- rounds over, restarts ----------------------------------------------------------------------
    def _round_aggregated(self, round_no: int) -> bool:
        info = self.state.get_global_round(self.run_id, round_no)
        return info is None or info.status == "aggregated"

    def _resume_round(self) -> None:
        info = self.state.get_global_round(self.run_id, self.round)
        if info is None:
            self._open_round(self.round)  # planned (and stored) before the crash, never opened
        elif info.status == "aggregated":
            self._account_round(self.round)
            self._after_round(self.round)
        else:
            for group in sorted(info.targets):
                self._continue_group(self.round, group)


def orchestrator_class(config: RunConfig) -> type[OrchestratorService]:
    """The orchestrator for a run's strategy."""
    return HierarchicalOrchestrator if config.hierarchical else OrchestratorService
