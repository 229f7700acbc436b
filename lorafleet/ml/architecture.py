"""What lorafleet needs to know of a loaded transformers model, read from the model itself.

:func:`describe` finds, in any task model that transformers builds (``*ForSequenceClassification``,
``*ForCausalLM``):

* the transformer blocks: the ``nn.ModuleList`` named like a block container
  (:data:`~lorafleet.ml.lora.BLOCK_CONTAINERS`: ``layer``, ``h``, ``layers``, ...) with the most
  parameters, its attribute path (``bert.encoder.layer``, ``transformer.h``, ``model.layers``) and
  its length; LoRA depth counts these blocks from the output;
* the linear projections of a block (``nn.Linear`` and GPT-2's ``Conv1D``), by path within the block;
* the task head: for a sequence classifier, the children of the task model outside its body
  (``base_model_prefix``): ``classifier`` (BERT, RoBERTa, ELECTRA), ``pre_classifier`` and
  ``classifier`` (DistilBERT), ``pooler`` and ``classifier`` (DeBERTa-v2), ``score`` (decoders); they
  are trained with the LoRA and travel as shared tensors. A causal LM trains no head (``lm_head``
  stays frozen);
* the default LoRA targets of the family: peft's own table
  (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``) by ``model_type``, else the block's query and
  value projections (or its fused query-key-value projection) found by name, else every projection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from lorafleet.ml.lora import BLOCK_CONTAINERS, matches_target

Task = Literal["sequence_classification", "causal_lm"]

_QUERY = re.compile(r"^(q|query|q_proj|query_proj|q_lin|wq)$")
_VALUE = re.compile(r"^(v|value|v_proj|value_proj|v_lin|wv)$")
_FUSED_QKV = re.compile(r"^(c_attn|qkv|qkv_proj|query_key_value|wqkv|in_proj|Wqkv)$")


@dataclass(frozen=True)
class Architecture:
    """The parts of one loaded model that LoRA, the head and the prefix cache work with."""

    model_type: str
    task: Task
    blocks_path: str  # attribute path of the blocks' ModuleList from the task model
    num_blocks: int
    hidden_size: int
    projections: tuple[str, ...]  # paths within a block of its linear projections, in module order
    conv1d: tuple[str, ...]  # those of them that are transformers' Conv1D (weights stored transposed)
    head: tuple[str, ...]  # modules_to_save: the task model's children outside its body ((): none)
    default_targets: tuple[str, ...]

    @property
    def blocks_attr(self) -> str:
        """The blocks' attribute name (peft's ``layers_pattern``)."""
        return self.blocks_path.rsplit(".", 1)[-1]

    def block_regex(self, index: int) -> str:
        """A peft ``rank_pattern``/``alpha_pattern`` key for every module of block ``index``."""
        return rf"{re.escape(self.blocks_path)}\.{index}\..*"

    def resolve_targets(self, targets: list[str] | None) -> list[str]:
        """``targets`` checked against the block's projections, or the family's default for None.

        Raises:
            ValueError: a target names no linear projection of a block.
        """
        if targets is None:
            return list(self.default_targets)
        unknown = [t for t in targets if not any(matches_target(p, [t]) for p in self.projections)]
        if unknown:
            raise ValueError(
                f"lora.target_modules {unknown} name no linear module of a {self.model_type} block; "
                f"its projections are {list(self.projections)}"
            )
        return list(targets)

    def uses_conv1d(self, targets: list[str]) -> bool:
        """Whether any of ``targets`` is a Conv1D (peft then needs ``fan_in_fan_out``)."""
        return any(matches_target(p, targets) for p in self.conv1d)


def describe(model: nn.Module, task: Task) -> Architecture:
    """The :class:`Architecture` of a (not peft-wrapped) transformers task model.

    Raises:
        ValueError: no block container is found, or a classifier has no head outside its body.
    """
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", type(model).__name__))
    blocks_path, blocks = find_blocks(model)
    projections, conv1d = _projections(blocks[0])
    head = head_modules(model) if task == "sequence_classification" else ()
    if task == "sequence_classification" and not head:
        raise ValueError(f"the {type(model).__name__} has no classification head outside its body")
    return Architecture(
        model_type=model_type,
        task=task,
        blocks_path=blocks_path,
        num_blocks=len(blocks),
        hidden_size=int(getattr(config, "hidden_size", 0)),
        projections=projections,
        conv1d=conv1d,
        head=head,
        default_targets=default_targets(model_type, projections),
    )


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(attribute path, module list) of the model's transformer blocks: the largest ModuleList named
    like a block container whose items are all of one class.

    Raises:
        ValueError: there is none.
    """
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if name.rsplit(".", 1)[-1] not in BLOCK_CONTAINERS or len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[2]:
            best = (name, module, size)
    if best is None:
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        raise ValueError(
            f"{type(model).__name__}: no transformer blocks in a ModuleList named one of "
            f"{list(BLOCK_CONTAINERS)} (its module lists: {lists[:5]})"
        )
    return best[0], best[1]


def head_modules(model: nn.Module) -> tuple[str, ...]:
    """The task model's children with parameters other than its body (``base_model_prefix``)."""
    body = getattr(model, "base_model_prefix", "")
    return tuple(
        name
        for name, child in model.named_children()
        if name != body and any(True for _ in child.parameters())
    )


def default_targets(model_type: str, projections: tuple[str, ...]) -> tuple[str, ...]:
    """The family's default LoRA targets: peft's table entry if every name in it is a projection of the
    block, else the query and value projections, else a fused query-key-value projection, else all."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    known = PEFT_DEFAULTS.get(model_type)
    if known and all(any(matches_target(p, [t]) for p in projections) for t in known):
        return tuple(known)
    leaves = [p.rsplit(".", 1)[-1] for p in projections]
    query = [n for n in leaves if _QUERY.match(n)]
    value = [n for n in leaves if _VALUE.match(n)]
    if query and value:
        return (query[0], value[0])
    fused = [n for n in leaves if _FUSED_QKV.match(n)]
    if fused:
        return (fused[0],)
    return tuple(dict.fromkeys(leaves))


def _projections(block: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    from transformers.pytorch_utils import Conv1D

    linear, conv = [], []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear | Conv1D) and name:
            linear.append(name)
            if isinstance(module, Conv1D):
                conv.append(name)
    return tuple(linear), tuple(conv)
