"""Pure helpers over adapter tensor dicts (keys as ``get_peft_model_state_dict`` returns them).

A LoRA key names its transformer block, module and factor, e.g.
``base_model.model.bert.encoder.layer.5.attention.self.query.lora_A.weight``: block 5, module
``query``, factor A of shape (rank, d_in); factor B has shape (d_out, rank). The block is the index
after the first block container on the path (:data:`BLOCK_CONTAINERS`), whatever the family calls
it: ``transformer.h.3.attn.c_attn`` (GPT-2), ``model.layers.3.self_attn.q_proj`` (Llama, Qwen2,
Mistral, Phi), ``distilbert.transformer.layer.3.attention.q_lin``. Every other key (the
classification head, whatever it is called) is a *shared* tensor that every device trains.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from schemas.messages import LoraSpec

#: The attribute names of the ``nn.ModuleList`` that holds a model's transformer blocks, as peft's
#: ``layers_pattern`` knows them: BERT-likes ``layer``, GPT-2 ``h``, Llama-likes ``layers``, T5 ``block``.
BLOCK_CONTAINERS = ("layers", "layer", "h", "blocks", "block")

_LORA_KEY = re.compile(
    rf"(?:^|\.)(?:{'|'.join(BLOCK_CONTAINERS)})\.(?P<block>\d+)\."
    r"(?P<path>(?:\w+\.)*?(?P<module>[A-Za-z_]\w*))\.lora_(?P<factor>[AB])\.weight$"
)

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class KeyInfo:
    """What a key of an adapter state dict holds; ``block`` is None for shared (head) tensors.

    ``module`` is the LoRA module's own name (``query``, ``c_attn``, ``q_proj``); ``path`` its dotted
    path within the block (``attention.self.query``), which tells apart modules of one block that
    share a name (BERT's three ``dense``). ``path`` is left out of comparisons: two infos are equal
    when block, module and factor are.
    """

    block: int | None
    module: str | None
    factor: Literal["A", "B"] | None
    path: str | None = field(default=None, compare=False)

    @property
    def rank_axis(self) -> int | None:
        """The axis that indexes LoRA rank: 0 for A (r x d_in), 1 for B (d_out x r), None otherwise."""
        if self.factor == "A":
            return 0
        if self.factor == "B":
            return 1
        return None


def parse_key(key: str) -> KeyInfo:
    """Classify an adapter key."""
    match = _LORA_KEY.search(key)
    if match is None:
        return KeyInfo(None, None, None)
    factor: Literal["A", "B"] = "A" if match["factor"] == "A" else "B"
    return KeyInfo(int(match["block"]), match["module"], factor, match["path"])


def matches_target(path: str, targets: Iterable[str]) -> str | None:
    """The first of ``targets`` that names the module at ``path`` within a block, as peft matches
    ``target_modules`` (the whole path or a dotted suffix of it: ``query``, ``self.query``), or None."""
    return next((t for t in targets if path == t or path.endswith("." + t)), None)


def key_rank(key: str, tensor: torch.Tensor) -> int | None:
    """The LoRA rank a tensor carries, or None for shared tensors."""
    axis = parse_key(key).rank_axis
    return None if axis is None else int(tensor.shape[axis])


def blocks_of(tensors: Tensors) -> dict[int, int]:
    """Block -> rank of the LoRA carried in ``tensors``."""
    out: dict[int, int] = {}
    for key, tensor in tensors.items():
        info = parse_key(key)
        if info.block is not None and info.rank_axis is not None:
            out[info.block] = max(out.get(info.block, 0), int(tensor.shape[info.rank_axis]))
    return out


def select_for_spec(tensors: Tensors, spec: LoraSpec) -> Tensors:
    """The part of a global adapter a device with ``spec`` starts from.

    Shared tensors are kept whole; LoRA tensors are kept for the spec's blocks and target modules
    and truncated to the block's rank (the first ``r`` rank indices, HetLoRA-style).

    Raises:
        ValueError: a block or module of the spec is missing from ``tensors``, or the spec asks for
            a higher rank than the global adapter carries.
    """
    out: Tensors = {}
    found: set[tuple[int, str]] = set()
    for key, tensor in tensors.items():
        info = parse_key(key)
        if info.block is None:
            out[key] = tensor
            continue
        target = None if info.path is None else matches_target(info.path, spec.target_modules)
        if info.block not in spec.layer_ranks or target is None:
            continue
        rank = spec.layer_ranks[info.block]
        axis = info.rank_axis
        assert axis is not None
        if tensor.shape[axis] < rank:
            raise ValueError(f"{key}: spec asks for rank {rank}, the global adapter has {tensor.shape[axis]}")
        out[key] = tensor.narrow(axis, 0, rank).clone()
        found.add((info.block, target))
    wanted = {(b, m) for b in spec.layer_ranks for m in spec.target_modules}
    missing = sorted(wanted - found)
    if missing:
        raise ValueError(f"global adapter has no LoRA for (block, module) {missing}")
    return out


def shapes(tensors: Tensors) -> dict[str, tuple[int, ...]]:
    """Key -> shape."""
    return {key: tuple(int(d) for d in t.shape) for key, t in tensors.items()}


def nbytes(tensors: Tensors) -> int:
    """Raw tensor bytes (no container overhead)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def factor_pairs(tensors: Tensors) -> dict[tuple[int, str], tuple[str, str]]:
    """(block, module path within the block) -> (A key, B key)."""
    found: dict[tuple[int, str], dict[str, str]] = defaultdict(dict)
    for key in tensors:
        info = parse_key(key)
        if info.block is not None and info.path is not None and info.factor is not None:
            found[(info.block, info.path)][info.factor] = key
    return {bm: (keys["A"], keys["B"]) for bm, keys in found.items() if "A" in keys and "B" in keys}


def shape_mismatch(tensors: Tensors, expected: dict[str, tuple[int, ...]]) -> str | None:
    """What keeps ``tensors`` from having exactly the ``expected`` names and shapes (None: nothing),
    naming the first few missing keys, unexpected keys and wrong shapes."""
    got = shapes(tensors)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}")
    if extra:
        parts.append(f"unexpected {extra[:3]}")
    if wrong:
        named = (f"{k}: got {got[k]}, expected {expected[k]}" for k in wrong[:3])
        parts.append("wrong shape " + ", ".join(named))
    return "; ".join(parts) or None
