"""Federated evaluation, the aggregator's side: send each evaluated global adapter to the devices,
check and keep what they report.

After a round is aggregated (flat: every round; hierarchical: every global round) the aggregator
publishes one ``EvalTask`` to the ``lf.eval`` fanout, which the broker copies into every registered
device's evaluation queue; it goes out next to the next round's training tasks and nothing waits for
it. A device's ``EvalResult`` comes back over ``lf.updates`` and is kept only if it is signed (where
signatures are required), names a round whose task went out, a device of the run, and no more rows than
the device registered as held out (``eval_samples``), with as many loss terms as those rows can have;
what fails is dead-lettered with its reason. The first result of a device for a round stands.

The scores live in the round's metrics (lorafleet/run/federated.py), so a restarted aggregator and the
report see them. At the end of the run the aggregator waits up to ``eval.wait_s`` for the final round's
results.
"""

from __future__ import annotations

import logging

from lorafleet.ml.lora import Tensors
from lorafleet.run.clock import Clock
from lorafleet.run.federated import EVAL_SCORES, EVAL_SENT, pooled
from lorafleet.security.signing import verify
from lorafleet.state.base import StateStore
from lorafleet.transport import topology
from lorafleet.transport.base import Transport, TransportError
from lorafleet.transport.messaging import publish_message
from schemas.config import RunConfig
from schemas.errors import Rejected
from schemas.messages import EvalResult, EvalTask, LoraSpec, Message
from schemas.tensors import encode_tensors

log = logging.getLogger(__name__)


class FederatedEvaluation:
    """The aggregator's federated evaluation of one run (inactive unless ``eval.device_fraction > 0``)."""

    def __init__(
        self,
        transport: Transport,
        state: StateStore,
        config: RunConfig,
        *,
        clock: Clock,
        fleet_key: bytes | None = None,
    ) -> None:
        self.transport = transport
        self.state = state
        self.config = config
        self.run_id = config.run_id
        self.clock = clock
        self.fleet_key = fleet_key
        self._finish_seen_at: float | None = None

    @property
    def enabled(self) -> bool:
        return self.config.eval.federated

    def publish_task(self, round_no: int, spec: LoraSpec, tensors: Tensors) -> None:
        """Send the global adapter of ``round_no`` to every registered device that holds rows out, and
        note where it went. Best effort: an unreachable fanout is logged, never raised."""
        if not self.enabled:
            return
        devices = sorted(
            d for d, info in self.state.get_devices(self.run_id).items() if info.get("eval_samples")
        )
        if not devices:
            return
        task = EvalTask(
            run_id=self.run_id,
            round=round_no,
            lora=spec,
            adapter=encode_tensors(tensors),
            issued_at=self.clock.now(),
        )
        try:
            size = publish_message(self.transport, topology.EVAL_EXCHANGE, topology.EVAL_KEY, task)
        except TransportError as exc:  # no queue bound, no exchange, a nack: the round goes on unevaluated
            log.warning("aggregator: round %d not sent for federated evaluation: %s", round_no, exc)
            return
        self.state.put_round_metrics(self.run_id, round_no, {EVAL_SENT: {"devices": devices, "bytes": size}})

    def took(self, message: Message) -> bool:
        """Whether ``message`` is an evaluation result, which :meth:`record` then kept.

        Raises:
            Rejected: as :meth:`record`.
        """
        if not isinstance(message, EvalResult):
            return False
        self.record(message)
        return True

    def record(self, result: EvalResult) -> None:
        """Keep a device's result (the first for its round stands).

        Raises:
            Rejected: ``bad_signature``, ``unknown_round``, ``unknown_device`` or ``samples_exceeded``.
        """
        if self.config.security.require_signatures and (
            self.fleet_key is None or not verify(self.fleet_key, result)
        ):
            what = "no signature" if result.signature is None else "a signature that does not verify"
            raise Rejected(
                "bad_signature", f"evaluation of round {result.round} by {result.device_id} with {what}"
            )
        metrics = self.state.get_round_metrics(self.run_id).get(result.round, {})
        if EVAL_SENT not in metrics:
            raise Rejected("unknown_round", f"{result.device_id} reports round {result.round}; none was sent")
        device = self.state.get_device(self.run_id, result.device_id)
        if device is None:
            raise Rejected("unknown_device", f"{result.device_id} is not a registered device of the run")
        self._check_counts(result, int(device.get("eval_samples", 0)))
        scores = dict(metrics.get(EVAL_SCORES, {}))
        if result.device_id in scores:
            return  # a redelivery, or a second opinion: the first result stands
        scores[result.device_id] = result.score.model_dump(mode="json")
        self.state.put_round_metrics(self.run_id, result.round, {EVAL_SCORES: scores})
        total = pooled({EVAL_SCORES: scores})
        assert total is not None
        log.info(
            "aggregator: round %d federated accuracy %.4f loss %.4f over %d held-out rows of %d/%d devices",
            result.round,
            total.accuracy,
            total.loss,
            total.num_samples,
            len(scores),
            len(metrics[EVAL_SENT]["devices"]),
        )

    def _check_counts(self, result: EvalResult, held_out: int) -> None:
        """A result weighs as many rows as it claims (and its loss as many terms): never more rows than
        its device holds out, and per row one loss term (a classifier) or at most ``max_seq_len`` (the
        response tokens of a causal LM)."""
        score = result.score
        if score.num_samples > held_out:
            claim = f"{result.device_id} claims {score.num_samples} evaluated rows"
            raise Rejected("samples_exceeded", f"{claim}, it registered {held_out} held out")
        causal = self.config.model.task == "causal_lm"
        most = score.num_samples * self.config.model.max_seq_len if causal else score.num_samples
        if not (0 < score.loss_count <= most if causal else score.loss_count == most):
            raise Rejected(
                "samples_exceeded",
                f"{result.device_id} claims {score.loss_count} loss terms over {score.num_samples} rows",
            )

    def settled(self) -> bool:
        """At the end of the run: whether every device the final round's task went to has reported, or
        ``eval.wait_s`` passed since this was first asked."""
        if not self.enabled:
            return True
        final = int(self.state.get_run_fields(self.run_id).get("final_round", 0))
        metrics = self.state.get_round_metrics(self.run_id).get(final, {})
        missing = set(metrics.get(EVAL_SENT, {}).get("devices", [])) - set(metrics.get(EVAL_SCORES, {}))
        if not missing:
            return True
        now = self.clock.now()
        if self._finish_seen_at is None:
            self._finish_seen_at = now
            log.info(
                "aggregator: waiting up to %.0f s for round %d's evaluation by %s",
                self.config.eval.wait_s,
                final,
                ", ".join(sorted(missing)),
            )
        return now - self._finish_seen_at >= self.config.eval.wait_s
