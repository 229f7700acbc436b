"""The frozen-prefix activation cache and the split forward of a transformers model.

Below the lowest LoRA block of a spec nothing trains, so the hidden states entering block ``b``
(*boundary* ``b``; boundary 0 is what the first block receives) depend only on the input. A
:class:`PrefixCache` keeps, per device shard, the **unpadded** hidden states of each sample at the
boundaries it has computed (in the base weights' dtype), computed once with the frozen prefix in
eval mode (dropout off) under ``no_grad``. Training a spec whose lowest block is ``b`` then runs
only blocks ``b..L-1`` and the head (:meth:`ModelSplit.forward`).

:class:`ModelSplit` splits any model whose blocks sit in one ``nn.ModuleList`` that its forward
walks in order, handing each block the previous one's output (every family lorafleet supports):
for the duration of one forward it swaps that list for one whose first ``b`` entries pass their
input through and whose entry ``b`` runs block ``b`` on the cached states instead. Everything else
is the model's own forward: embeddings (computed and ignored; cheap), attention masks, rotary or
relative positions, the pooling, the head and the loss, whatever the family needs. Filling the
cache is the model's own forward too, stopped at the block whose input it keeps. Before it is used
at a boundary the split checks itself once against the plain forward on a few samples
(:meth:`ModelSplit.check`); a model that fails (a forward that treats its first block specially,
e.g. DeBERTa-v2 with a convolution layer) is trained without the cache, with one log line.

Extending: a sample missing at boundary ``b`` is computed from the deepest boundary below ``b`` that
already holds it (or from the embeddings); the boundaries passed on the way are stored too (when they
fit). Samples are computed in length-sorted chunks padded by at most 10%, and the
counts (:class:`PrefixCounts`) are exactly the padded tokens that went through the embeddings and
the frozen blocks.

Memory: one boundary of one sample takes ``len x hidden x bytes`` (MiniLM in float32: 1.5 KB per
token; an SST-2 sample of ~13 tokens about 20 KB, 2,000 samples about 40 MB per boundary). The cache
holds at most ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`); to make room for the boundary a task
needs it evicts whole boundaries, least recently used first; a task whose boundary cannot fit even
alone is trained without the cache.

Differences from the plain forward: in training, the prefix runs without dropout (it is computed in
eval mode once), and the padded positions of the cached states are zeros instead of the prefix's
values at pad tokens; attention masks those keys (and batches are padded on the right, so a causal
model never attends to them), so the outputs at real tokens are the same. In eval mode the logits
equal the plain forward up to float rounding.

:class:`BertParts` is the hand-split BERT forward that the cost model's calibration times block by
block (``benchmarks/calibrate.py``); it fills the same cache.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy
from torch.nn.utils.rnn import pad_sequence
from transformers.masking_utils import create_bidirectional_mask

from lorafleet.data.datasets import EncodedDataset
from lorafleet.ml.architecture import find_blocks

log = logging.getLogger(__name__)

#: The default bound on the cached bytes of one trainer (one device shard).
DEFAULT_MAX_BYTES = 512 * 1024 * 1024

#: Samples per chunk when computing the prefix (length-sorted, so chunks are padded little).
PREFIX_CHUNK = 64

#: A prefix chunk's padded tokens are at most this factor of its real tokens.
MAX_PADDING = 1.1

#: Samples the split checks itself on before its first use at a boundary.
CHECK_SAMPLES = 4


@dataclass(frozen=True)
class PrefixCounts:
    """What computing the prefix cost: padded tokens through the embeddings and tokens x frozen blocks."""

    embed_tokens: int = 0
    prefix_block_tokens: int = 0


class Prefix(Protocol):
    """What fills a :class:`PrefixCache`: a model split at block boundaries."""

    @property
    def num_blocks(self) -> int: ...

    @property
    def root(self) -> nn.Module:
        """The module whose train/eval mode governs the prefix (set to eval while filling)."""
        ...

    def run_prefix(
        self, input_ids: Tensor, attention_mask: Tensor, start: int, stop: int, hidden: Tensor | None
    ) -> list[Tensor]:
        """The hidden states entering blocks ``start..stop`` (both included) of a right-padded batch;
        ``hidden`` is boundary ``start`` (None: computed from ``input_ids``, ``start`` must be 0)."""
        ...


class _Stop(Exception):
    """Ends a forward once the hidden states it was run for are captured."""


class _PassThrough(nn.Module):
    """Stands in for a block below the boundary: returns its input as the block would return it."""

    def __init__(self, tuple_len: int | None) -> None:
        super().__init__()
        self.tuple_len = tuple_len

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.tuple_len is None:
            return hidden_states
        return (hidden_states,) + (None,) * (self.tuple_len - 1)


class _Inject(nn.Module):
    """Runs ``block`` on the given hidden states instead of the ones the forward hands it."""

    def __init__(self, block: nn.Module, hidden: Tensor) -> None:
        super().__init__()
        self.block = block
        self.hidden = hidden

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.block(self.hidden, *args, **kwargs)


class ModelSplit:
    """A transformers task model (or the peft model around it) split at its blocks' boundaries."""

    def __init__(self, model: nn.Module, blocks_path: str) -> None:
        get_base: Any = getattr(model, "get_base_model", None)
        self.model = model
        self.base: nn.Module = model if get_base is None else get_base()
        parent, _, self._attr = blocks_path.rpartition(".")
        self._parent = self.base.get_submodule(parent) if parent else self.base
        self.layers: nn.ModuleList = getattr(self._parent, self._attr)
        self._tuple_len: int | None = None
        self._checked: dict[int, bool] = {}
        self.disabled = False

    @classmethod
    def of(cls, model: nn.Module) -> ModelSplit | None:
        """The split of ``model`` (a peft model or a task model); None if it has no block list."""
        get_base: Any = getattr(model, "get_base_model", None)
        base: nn.Module = model if get_base is None else get_base()
        try:
            path, _ = find_blocks(base)
        except ValueError:
            return None
        return cls(model, path)

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    @property
    def root(self) -> nn.Module:
        return self.base

    # ----------------------------------------------------------------------- filling

    def run_prefix(
        self, input_ids: Tensor, attention_mask: Tensor, start: int, stop: int, hidden: Tensor | None
    ) -> list[Tensor]:
        """See :class:`Prefix`; runs the model's forward up to block ``stop``'s input."""
        states: dict[int, Tensor] = {}
        if hidden is not None:
            states[start] = hidden

        def capture(index: int) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                states[index] = args[0] if args else kwargs["hidden_states"]
                if index == stop:
                    raise _Stop

            return hook

        first = start if hidden is None else start + 1
        layers = range(first, stop + 1)
        handles = [self.layers[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in layers]
        try:
            with self._spliced(start, hidden):
                self.model(input_ids=input_ids, attention_mask=attention_mask)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [states[b] for b in range(start, stop + 1)]

    # ----------------------------------------------------------------------- training

    def forward(self, boundary: int, hidden: Tensor, inputs: dict[str, Tensor]) -> Any:
        """The model's output (``loss`` with ``labels`` in ``inputs``, ``logits``) for a right-padded
        batch whose states entering block ``boundary`` are ``hidden`` (batch x width x hidden) and whose
        ``input_ids``/``attention_mask``/``labels`` are ``inputs``."""
        with self._spliced(boundary, hidden):
            return self.model(**inputs)

    @contextmanager
    def _spliced(self, boundary: int, hidden: Tensor | None) -> Iterator[None]:
        if hidden is None:
            yield
            return
        blocks: list[nn.Module] = [_PassThrough(self._tuple_len) for _ in range(boundary)]
        blocks += [_Inject(self.layers[boundary], hidden), *self.layers[boundary + 1 :]]
        setattr(self._parent, self._attr, nn.ModuleList(blocks))
        try:
            yield
        finally:
            setattr(self._parent, self._attr, self.layers)

    # ----------------------------------------------------------------------- self-check

    @torch.no_grad()
    def check(self, boundary: int, input_ids: Tensor, attention_mask: Tensor) -> bool:
        """Whether the split forward at ``boundary`` gives the plain forward's logits on this batch (in
        eval mode; remembered per boundary). The first failure turns the split off for good and logs it."""
        if self.disabled:
            return False
        if boundary not in self._checked:
            ok, why = self._compare(boundary, input_ids, attention_mask)
            self._checked[boundary] = ok
            if not ok:
                self.disabled = True
                log.warning(
                    "prefix cache off for this %s: its split forward at block %d %s; training runs the whole "
                    "model",
                    type(self.base).__name__,
                    boundary,
                    why,
                )
        return self._checked[boundary]

    def _compare(self, boundary: int, input_ids: Tensor, attention_mask: Tensor) -> tuple[bool, str]:
        was_training = self.base.training
        self.base.eval()
        outputs: list[Any] = []
        handle = self.layers[0].register_forward_hook(lambda m, a, out: outputs.append(out))
        try:
            plain = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            handle.remove()
            first = outputs[0]
            self._tuple_len = len(first) if isinstance(first, tuple) else None
            if not isinstance(first, Tensor | tuple):
                return False, f"meets blocks that return {type(first).__name__}"
            hidden = self.run_prefix(input_ids, attention_mask, 0, boundary, None)[-1]
            split = self.forward(boundary, hidden, {"input_ids": input_ids, "attention_mask": attention_mask})
        except Exception as exc:  # any failure means: this model cannot be split this way
            return False, f"failed ({type(exc).__name__}: {exc})"
        finally:
            handle.remove()
            self.base.train(was_training)
        got, want = split.logits.float(), plain.float()
        if want.dim() == 3:  # per-token logits: padded positions hold different states and do not count
            real = attention_mask.bool()
            got, want = got[real], want[real]
        tolerance = 1e-4 if plain.dtype == torch.float32 else 5e-2
        if not torch.allclose(got, want, rtol=tolerance, atol=tolerance):
            diff = (got - want).abs().max().item()
            return False, f"differs from the plain forward by up to {diff:.3g}"
        return True, ""


@dataclass(frozen=True)
class BertParts:
    """The modules of a (possibly peft-wrapped) BERT sequence classifier, split by hand: what the cost
    model's calibration times (embeddings, one block, the head). Fills a :class:`PrefixCache` as a
    :class:`ModelSplit` does."""

    bert: nn.Module
    layers: nn.ModuleList
    pooler: nn.Module
    dropout: nn.Module
    classifier: nn.Module
    num_labels: int

    @classmethod
    def of(cls, model: nn.Module) -> BertParts | None:
        """The parts of ``model`` (a peft model or a BERT classifier); None if it is not BERT-like."""
        get_base: Any = getattr(model, "get_base_model", None)
        base: Any = model if get_base is None else get_base()
        bert = getattr(base, "bert", None)
        layers = getattr(getattr(bert, "encoder", None), "layer", None)
        pooler = getattr(bert, "pooler", None)
        config = getattr(base, "config", None)
        if (
            bert is None
            or not isinstance(layers, nn.ModuleList)
            or pooler is None
            or not hasattr(bert, "embeddings")
            or not isinstance(getattr(base, "dropout", None), nn.Module)
            or not isinstance(getattr(base, "classifier", None), nn.Module)
            or config is None
            or getattr(config, "is_decoder", False)
            or int(config.num_labels) < 2
            or getattr(config, "problem_type", None) not in (None, "single_label_classification")
        ):
            return None
        return cls(bert, layers, pooler, base.dropout, base.classifier, int(config.num_labels))

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    @property
    def root(self) -> nn.Module:
        return self.bert

    def mask(self, hidden: Tensor, attention_mask: Tensor) -> Tensor | None:
        """The attention mask the blocks take for a padded batch, built as an encoder-only BERT builds
        it (``transformers.masking_utils.create_bidirectional_mask``, whose form follows the model's
        attention implementation)."""
        mask: Tensor | None = create_bidirectional_mask(
            config=self.bert.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        return mask

    def embed(self, input_ids: Tensor) -> Tensor:
        """Boundary 0: the embeddings' output (token types zero)."""
        out: Tensor = self.bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))  # type: ignore[operator]
        return out

    def blocks(self, hidden: Tensor, mask: Tensor | None, start: int, stop: int) -> Tensor:
        """Run blocks ``start..stop-1`` on ``hidden``."""
        for i in range(start, stop):
            out = self.layers[i](hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def head(self, hidden: Tensor) -> Tensor:
        """Pooler, dropout and classifier: the logits."""
        logits: Tensor = self.classifier(self.dropout(self.pooler(hidden)))
        return logits

    def run_prefix(
        self, input_ids: Tensor, attention_mask: Tensor, start: int, stop: int, hidden: Tensor | None
    ) -> list[Tensor]:
        """See :class:`Prefix`."""
        hidden = self.embed(input_ids) if hidden is None else hidden
        mask = self.mask(hidden, attention_mask)
        states = [hidden]
        for b in range(start, stop):
            hidden = self.blocks(hidden, mask, b, b + 1)
            states.append(hidden)
        return states


def forward_from(parts: BertParts, boundary: int, hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Logits of a padded batch of hidden states at ``boundary``: blocks ``boundary..L-1``, then the head."""
    mask = parts.mask(hidden, attention_mask)
    return parts.head(parts.blocks(hidden, mask, boundary, parts.num_blocks))


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy, as ``BertForSequenceClassification`` computes it for integer labels."""
    return cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


class PrefixCache:
    """Per-sample unpadded hidden states of one shard at block boundaries (``dtype``, bounded bytes)."""

    def __init__(
        self,
        shard: EncodedDataset,
        hidden_size: int,
        max_bytes: int = DEFAULT_MAX_BYTES,
        chunk: int = PREFIX_CHUNK,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_bytes < 0 or chunk < 1:
            raise ValueError(f"max_bytes must be >= 0 and chunk >= 1, got {max_bytes}, {chunk}")
        self.shard = shard
        self.hidden_size = hidden_size
        self.max_bytes = max_bytes
        self.chunk = chunk
        self.dtype = dtype
        self._value_bytes = torch.empty((), dtype=dtype).element_size()
        self._store: dict[int, dict[int, Tensor]] = {}
        self._bytes: dict[int, int] = {}
        self._used: dict[int, int] = {}
        self._tick = 0

    # ----------------------------------------------------------------------- inspection

    @property
    def nbytes(self) -> int:
        """The bytes of all cached states."""
        return sum(self._bytes.values())

    def boundaries(self) -> list[int]:
        """The boundaries that hold at least one sample, ascending."""
        return sorted(b for b, rows in self._store.items() if rows)

    def has(self, boundary: int, index: int) -> bool:
        return index in self._store.get(boundary, {})

    def sample_bytes(self, index: int) -> int:
        return len(self.shard.input_ids[index]) * self.hidden_size * self._value_bytes

    # ----------------------------------------------------------------------- filling

    @torch.no_grad()
    def ensure(self, parts: Prefix, boundary: int, indices: Sequence[int]) -> PrefixCounts | None:
        """Make boundary ``boundary`` hold every sample of ``indices``; return what computing cost.

        The prefix runs in eval mode (the mode of ``parts.root`` is restored after); the caller has
        the task's adapter active, whose LoRA is at or above ``boundary``, so the prefix is the frozen
        base model. Returns None, computing nothing, when the boundary cannot fit in ``max_bytes``
        even with every other boundary evicted.
        """
        if not 0 <= boundary < parts.num_blocks:
            raise ValueError(f"boundary {boundary} outside 0..{parts.num_blocks - 1}")
        have = self._store.get(boundary, {})
        missing = sorted({int(i) for i in indices} - set(have))
        self._touch(boundary)
        if not missing:
            return PrefixCounts()
        needed = self._bytes.get(boundary, 0) + sum(self.sample_bytes(i) for i in missing)
        if needed > self.max_bytes:
            return None
        groups: dict[int, list[int]] = {}
        for i in missing:
            source = max((b for b in self._store if b < boundary and i in self._store[b]), default=-1)
            groups.setdefault(source, []).append(i)
        computed: dict[int, dict[int, Tensor]] = {}
        embed_tokens = block_tokens = 0
        was_training = parts.root.training
        parts.root.eval()
        try:
            for source, group in sorted(groups.items()):
                for rows in self._chunks(group):
                    e, p = self._compute(parts, source, boundary, rows, computed)
                    embed_tokens += e
                    block_tokens += p
        finally:
            parts.root.train(was_training)
        self._put(boundary, computed.pop(boundary), evict=True)
        for b, states in sorted(computed.items(), reverse=True):
            self._put(b, states, evict=False)
        return PrefixCounts(embed_tokens, block_tokens)

    def _chunks(self, indices: list[int]) -> list[list[int]]:
        """``indices`` sorted by length, cut into chunks of at most ``chunk`` samples whose padded size
        stays within :data:`MAX_PADDING` of their real tokens."""
        chunks: list[list[int]] = []
        current: list[int] = []
        real = 0
        for i in sorted(indices, key=lambda i: (len(self.shard.input_ids[i]), i)):
            n = len(self.shard.input_ids[i])
            if current and (len(current) >= self.chunk or (len(current) + 1) * n > MAX_PADDING * (real + n)):
                chunks.append(current)
                current, real = [], 0
            current.append(i)
            real += n
        if current:
            chunks.append(current)
        return chunks

    def _compute(
        self, parts: Prefix, source: int, boundary: int, rows: list[int], out: dict[int, dict[int, Tensor]]
    ) -> tuple[int, int]:
        lengths = [len(self.shard.input_ids[i]) for i in rows]
        ids = pad_sequence(
            [torch.tensor(self.shard.input_ids[i], dtype=torch.long) for i in rows],
            batch_first=True,
            padding_value=self.shard.pad_token_id,
        )
        attention = _attention_mask(lengths, ids.shape[1])
        hidden = None if source < 0 else self.batch(source, rows)[0]
        level = max(source, 0)
        states = parts.run_prefix(ids, attention, level, boundary, hidden)
        for b, state in enumerate(states, start=level):
            if b != source:
                self._keep(out, b, rows, lengths, state)
        return (ids.numel() if source < 0 else 0), ids.numel() * (boundary - level)

    def _keep(
        self, out: dict[int, dict[int, Tensor]], b: int, rows: list[int], lengths: list[int], hidden: Tensor
    ) -> None:
        states = out.setdefault(b, {})
        for j, (i, n) in enumerate(zip(rows, lengths, strict=True)):
            states[i] = hidden[j, :n].detach().to(self.dtype).clone()

    def _put(self, boundary: int, states: dict[int, Tensor], *, evict: bool) -> None:
        store = self._store.setdefault(boundary, {})
        new = {i: t for i, t in states.items() if i not in store}
        size = sum(t.numel() * self._value_bytes for t in new.values())
        if evict:
            for victim in sorted(self._used, key=self._used.__getitem__):
                if self.nbytes + size <= self.max_bytes:
                    break
                if victim != boundary:
                    self._drop(victim)
        if self.nbytes + size > self.max_bytes:
            return
        store.update(new)
        self._bytes[boundary] = self._bytes.get(boundary, 0) + size
        self._touch(boundary)

    def _drop(self, boundary: int) -> None:
        self._store.pop(boundary, None)
        self._bytes.pop(boundary, None)
        self._used.pop(boundary, None)

    def _touch(self, boundary: int) -> None:
        self._tick += 1
        self._used[boundary] = self._tick

    # ----------------------------------------------------------------------- reading

    def batch(self, boundary: int, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """The cached states of ``indices`` at ``boundary``, zero-padded to the longest, and the mask.

        Raises:
            KeyError: a sample is not cached at ``boundary``.
        """
        store = self._store.get(boundary, {})
        states = [store[int(i)] for i in indices]
        hidden = pad_sequence(states, batch_first=True)
        return hidden, _attention_mask([s.shape[0] for s in states], hidden.shape[1])


def _attention_mask(lengths: Sequence[int], width: int) -> Tensor:
    return (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(torch.long)
