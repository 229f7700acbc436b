"""What ``lorafleet validate`` checks against the model: the parts of a configuration that the file
alone cannot validate, because they depend on the model's blocks, projections and positions.

Errors are what would stop the run at startup or at its first plan (``lora.layers`` beyond the
model's blocks, ``lora.target_modules`` that name no projection of a block, ``model.max_seq_len``
beyond its positions, a model that cannot be found); notes are settings the run corrects by itself
(a fixed depth deeper than the model, clamped; ``hier.depths`` beyond it, dropped). Each check is
the one the run itself makes (the planners' :func:`lora_blocks`, the architecture's
``resolve_targets``, the model loader's :func:`check_max_seq_len`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.data.datasets import num_labels
from lorafleet.ml.model import check_max_seq_len
from lorafleet.ml.skeleton import ModelShape, model_shape
from orchestrator.planners.specs import lora_blocks
from schemas.config import RunConfig
from schemas.errors import LorafleetError
from schemas.strategies import StrategyName


@dataclass(frozen=True)
class Finding:
    field: str
    message: str
    error: bool  # False: a note, the run corrects it by itself


def model_findings(config: RunConfig, shape: ModelShape) -> list[Finding]:
    """What ``config`` gets wrong, or the run will correct, about the model of ``shape``."""
    blocks = shape.architecture.num_blocks
    found = []
    checks = (
        ("lora.layers", lambda: lora_blocks(config.lora, blocks)),
        ("lora.target_modules", lambda: shape.architecture.resolve_targets(config.lora.targets)),
        ("model.max_seq_len", lambda: check_max_seq_len(config.model.max_seq_len, shape.max_positions)),
    )
    for field, check in checks:
        try:
            check()
        except ValueError as exc:
            found.append(Finding(field, str(exc), error=True))
    return found + _depth_notes(config, blocks)


def _depth_notes(config: RunConfig, blocks: int) -> list[Finding]:
    notes = []
    fixed = {
        StrategyName.LEGEND_FIXED_DEPTH: ("legend.fixed_depth", config.legend.fixed_depth),
        StrategyName.HIER_FIXED_DEPTH: ("hier.fixed_depth", config.hier.fixed_depth),
    }.get(config.strategy)
    if fixed is not None and fixed[1] > blocks:
        notes.append(
            Finding(fixed[0], f"{fixed[1]} exceeds the model's {blocks} blocks: {blocks} is used", False)
        )
    depths = config.hier.depths
    if config.hierarchical and depths and any(d > blocks for d in depths):
        kept = [d for d in depths if d <= blocks]
        what = f"only {kept} are used" if kept else f"none is left: every depth 1..{blocks} is used"
        notes.append(
            Finding("hier.depths", f"{depths}: depths beyond the model's {blocks} blocks; {what}", False)
        )
    return notes


def check_model(config: RunConfig) -> tuple[ModelShape | None, list[Finding]]:
    """The model's shape (None when it cannot be inspected) and the findings about ``config``."""
    try:
        shape = model_shape(config.model, num_labels(config.data.dataset))
    except (ValueError, OSError, LorafleetError) as exc:
        return None, [Finding("model.name", str(exc), error=True)]
    return shape, model_findings(config, shape)
