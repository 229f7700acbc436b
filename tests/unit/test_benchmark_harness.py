"""The benchmarks' resume (benchmarks/harness.py): a finished run is reused only when it ran the
configuration asked for, with ``aggregation_coverage: auto`` settled to what it means."""

from __future__ import annotations

from benchmarks.harness import _comparable, _settled
from schemas.config import parse_run_config


def test_a_run_recorded_before_coverage_was_auto_is_reused_only_where_auto_means_the_same() -> None:
    for strategy, same in (("fedlora", True), ("legend", True), ("hierfedlora", False)):
        today = parse_run_config({"strategy": strategy})
        # the report.json of a run made when the setting was a number, 0 by default
        recorded = today.model_dump(mode="json") | {"aggregation_coverage": 0.0}
        assert (_comparable(_settled(recorded)) == _comparable(_settled(today))) is same, strategy
    hier = parse_run_config({"strategy": "hierfedlora"})
    assert _settled(hier.model_dump(mode="json")) == _settled(hier)  # a run of today's code
    assert _settled({"no_such_field": 1}) == {"no_such_field": 1}  # another schema: never equal
