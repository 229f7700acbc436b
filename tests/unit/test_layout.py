"""The layout rules: who may import whom, and one registry each for strategy and aggregation names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from aggregator.merge.registry import MERGES
from orchestrator.planners.registry import STRATEGIES, round_planner
from schemas.strategies import HIERARCHICAL_STRATEGIES, AggregationName, StrategyName

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("lorafleet", "schemas", "orchestrator", "aggregator", "worker")
SERVICES = ("orchestrator", "aggregator", "worker")
COMPOSITION_ROOT = "lorafleet/app/"


def _imports(path: Path) -> set[str]:
    """Top-level packages of this repository that ``path`` imports, at any depth of the module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_the_walk_sees_every_package() -> None:
    # the rules below pass vacuously if the walk finds nothing
    assert all(len(_modules(p)) >= 4 for p in PACKAGES)
    assert "aggregator" in _imports(REPO / "lorafleet/app/wiring.py")


def test_only_the_composition_root_imports_the_services() -> None:
    offenders = [
        f"{_rel(path)} imports {sorted(_imports(path) & set(SERVICES))}"
        for path in _modules("lorafleet")
        if not _rel(path).startswith(COMPOSITION_ROOT) and _imports(path) & set(SERVICES)
    ]
    assert offenders == []


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_imports_another(service: str) -> None:
    others = set(SERVICES) - {service}
    offenders = [_rel(p) for p in _modules(service) if _imports(p) & others]
    assert offenders == []


def test_schemas_import_only_schemas() -> None:
    offenders = [_rel(p) for p in _modules("schemas") if _imports(p) - {"schemas"}]
    assert offenders == []


def test_every_strategy_name_has_exactly_one_planner() -> None:
    flat = set(STRATEGIES)
    assert flat | HIERARCHICAL_STRATEGIES == set(StrategyName)
    assert not flat & HIERARCHICAL_STRATEGIES
    for name in HIERARCHICAL_STRATEGIES:
        with pytest.raises(ValueError, match="global rounds"):
            round_planner(name)


def test_every_aggregation_name_has_one_merge_and_auto_resolves() -> None:
    assert set(MERGES) == set(AggregationName) - {AggregationName.AUTO}
    from schemas.config import parse_run_config

    for strategy in StrategyName:
        assert parse_run_config({"strategy": strategy.value}).merge_rule in MERGES


def test_names_are_written_once() -> None:
    """No strategy or aggregation name appears as a string literal outside schemas/strategies.py
    (``legend`` is also a value of ``hier.within_group``, and ``auto`` of ``hier.groups``: different
    settings)."""
    names = {n.value for n in StrategyName} | {n.value for n in AggregationName}
    names -= {"legend", "auto"}
    offenders = []
    for package in PACKAGES:
        for path in _modules(package):
            if _rel(path) == "schemas/strategies.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                    offenders.append(f"{_rel(path)}:{node.lineno} {node.value!r}")
    assert offenders == []
