"""The frozen-prefix activation cache and the split forward of a BERT classifier.

Below the lowest LoRA block of a spec nothing trains, so the hidden states entering block ``b``
(*boundary* ``b``; boundary 0 is the embeddings' output) depend only on the input. A
:class:`PrefixCache` keeps, per device shard, the **unpadded** hidden states of each sample at the
boundaries it has computed, in float32, computed once with the frozen prefix in eval mode (dropout
off) under ``no_grad``. Training a spec whose lowest block is ``b`` then runs only blocks
``b..L-1``, the pooler, dropout, the classifier and the loss (:func:`forward_from`).

Extending: a sample missing at boundary ``b`` is computed from the deepest boundary below ``b`` that
already holds it (or from the embeddings); the boundaries passed on the way are stored too (when they
fit). Samples are computed in length-sorted chunks padded by at most 10%, and the
counts (:class:`PrefixCounts`) are exactly the padded tokens that went through the embeddings and
the frozen blocks.

Memory: one boundary of one sample takes ``len x hidden x 4`` bytes (MiniLM: 1.5 KB per token; an
SST-2 sample of ~13 tokens about 20 KB, 2,000 samples about 40 MB per boundary). The cache holds at
most ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`); to make room for the boundary a task needs
it evicts whole boundaries, least recently used first; a task whose boundary cannot fit even alone
is trained without the cache.

Differences from the plain forward: in training, the prefix runs without dropout (it is computed in
eval mode once), and the padded positions of the cached states are zeros instead of the prefix's
values at pad tokens; attention masks those keys, so the outputs at real tokens are the same. In
eval mode the logits equal the plain forward up to float rounding.

The split forward uses the BERT modules of transformers 5.x (``bert.embeddings``,
``bert.encoder.layer[i](h, mask)``, ``bert.pooler``, ``dropout``, ``classifier``) and the public
mask builder ``transformers.masking_utils.create_bidirectional_mask`` (not the model's private
``_create_attention_masks``, whose signature changed within 5.x); models without these parts are
trained without the cache (:meth:`BertParts.of` gives None).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy
from torch.nn.utils.rnn import pad_sequence
from transformers.masking_utils import create_bidirectional_mask

from lorafleet.data.datasets import EncodedDataset

#: The default bound on the cached bytes of one trainer (one device shard).
DEFAULT_MAX_BYTES = 512 * 1024 * 1024

#: Samples per chunk when computing the prefix (length-sorted, so chunks are padded little).
PREFIX_CHUNK = 64

#: A prefix chunk's padded tokens are at most this factor of its real tokens.
MAX_PADDING = 1.1

_FLOAT_BYTES = 4


@dataclass(frozen=True)
class PrefixCounts:
    """What computing the prefix cost: padded tokens through the embeddings and tokens x frozen blocks."""

    embed_tokens: int = 0
    prefix_block_tokens: int = 0


@dataclass(frozen=True)
class BertParts:
    """The modules of a (possibly peft-wrapped) BERT sequence classifier that the split forward uses."""

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


def forward_from(parts: BertParts, boundary: int, hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Logits of a padded batch of hidden states at ``boundary``: blocks ``boundary..L-1``, then the head."""
    mask = parts.mask(hidden, attention_mask)
    return parts.head(parts.blocks(hidden, mask, boundary, parts.num_blocks))


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy, as ``BertForSequenceClassification`` computes it for integer labels."""
    return cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


class PrefixCache:
    """Per-sample unpadded hidden states of one shard at block boundaries (float32, bounded bytes)."""

    def __init__(
        self,
        shard: EncodedDataset,
        hidden_size: int,
        max_bytes: int = DEFAULT_MAX_BYTES,
        chunk: int = PREFIX_CHUNK,
    ) -> None:
        if max_bytes < 0 or chunk < 1:
            raise ValueError(f"max_bytes must be >= 0 and chunk >= 1, got {max_bytes}, {chunk}")
        self.shard = shard
        self.hidden_size = hidden_size
        self.max_bytes = max_bytes
        self.chunk = chunk
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
        return len(self.shard.input_ids[index]) * self.hidden_size * _FLOAT_BYTES

    # ----------------------------------------------------------------------- filling

    @torch.no_grad()
    def ensure(self, parts: BertParts, boundary: int, indices: Sequence[int]) -> PrefixCounts | None:
        """Make boundary ``boundary`` hold every sample of ``indices``; return what computing cost.

        The prefix runs in eval mode (the mode of ``parts.bert`` is restored after); the caller has
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
        was_training = parts.bert.training
        parts.bert.eval()
        try:
            for source, group in sorted(groups.items()):
                for rows in self._chunks(group):
                    e, p = self._compute(parts, source, boundary, rows, computed)
                    embed_tokens += e
                    block_tokens += p
        finally:
            parts.bert.train(was_training)
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
        self, parts: BertParts, source: int, boundary: int, rows: list[int], out: dict[int, dict[int, Tensor]]
    ) -> tuple[int, int]:
        lengths = [len(self.shard.input_ids[i]) for i in rows]
        if source < 0:
            ids = pad_sequence(
                [torch.tensor(self.shard.input_ids[i], dtype=torch.long) for i in rows],
                batch_first=True,
                padding_value=self.shard.pad_token_id,
            )
            hidden, level, embed = parts.embed(ids), 0, ids.numel()
            attention = _attention_mask(lengths, ids.shape[1])
        else:
            hidden, attention = self.batch(source, rows)
            level, embed = source, 0
        if source < 0 and boundary > 0:
            self._keep(out, 0, rows, lengths, hidden)
        mask = parts.mask(hidden, attention)
        tokens = hidden.shape[0] * hidden.shape[1]
        for b in range(level, boundary):
            hidden = parts.blocks(hidden, mask, b, b + 1)
            if b + 1 < boundary:
                self._keep(out, b + 1, rows, lengths, hidden)
        self._keep(out, boundary, rows, lengths, hidden)
        return embed, tokens * (boundary - level)

    def _keep(
        self, out: dict[int, dict[int, Tensor]], b: int, rows: list[int], lengths: list[int], hidden: Tensor
    ) -> None:
        states = out.setdefault(b, {})
        for j, (i, n) in enumerate(zip(rows, lengths, strict=True)):
            states[i] = hidden[j, :n].detach().to(torch.float32).clone()

    def _put(self, boundary: int, states: dict[int, Tensor], *, evict: bool) -> None:
        store = self._store.setdefault(boundary, {})
        new = {i: t for i, t in states.items() if i not in store}
        size = sum(t.numel() * _FLOAT_BYTES for t in new.values())
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
