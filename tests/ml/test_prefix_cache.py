"""The frozen-prefix activation cache: split forward vs peft, token accounting, training, memory bound."""

from __future__ import annotations

import pytest
import torch

from aggregator.evaluation import evaluate
from lorafleet.data.datasets import (
    DataError,
    EncodedDataset,
    collate,
    encode_dataset,
    iter_batches,
    load_split,
)
from lorafleet.ml.model import AdapterRuntime, forward_inputs, load_tokenizer
from lorafleet.ml.prefix_cache import BertParts, PrefixCache, forward_from
from schemas.config import ModelConfig
from schemas.messages import LoraSpec
from tests.ml.conftest import TINY, Synthetic, make_spec, make_task
from worker.trainer import LoraTrainer, epoch_batches

DEEP = ModelConfig(name="tiny", tiny_layers=5, tiny_hidden=32, max_seq_len=32)


@pytest.fixture(scope="module")
def deep() -> AdapterRuntime:
    return AdapterRuntime(DEEP, num_labels=2, seed=0)


def _subset(encoded: EncodedDataset, n: int) -> EncodedDataset:
    return EncodedDataset(encoded.input_ids[:n], encoded.labels[:n], encoded.pad_token_id)


def _random_adapter(runtime: AdapterRuntime, spec: LoraSpec, seed: int) -> dict[str, torch.Tensor]:
    """An adapter whose LoRA B factors are non-zero, so the LoRA changes the logits."""
    g = torch.Generator().manual_seed(seed)
    tensors = runtime.initial_adapter(spec, seed)
    return {k: torch.randn(v.shape, generator=g) * 0.2 if "lora_B" in k else v for k, v in tensors.items()}


def _padded_tokens(shard: EncodedDataset, batches: list[list[int]]) -> int:
    return sum(len(b) * max(len(shard.input_ids[i]) for i in b) for b in batches)


@pytest.mark.parametrize("blocks", [(0,), (1,), (4,), (1, 4), (2, 3), (0, 2, 4), (1, 2, 3, 4)])
def test_cached_forward_equals_the_peft_forward(
    deep: AdapterRuntime, synthetic: Synthetic, blocks: tuple[int, ...]
) -> None:
    spec = make_spec(dict.fromkeys(blocks, 4))
    shard = _subset(synthetic[0], 40)
    model = deep.load(spec, _random_adapter(deep, spec, 3)).eval()
    parts = BertParts.of(model)
    assert parts is not None
    cache = PrefixCache(shard, deep.hidden_size)
    lowest = min(blocks)
    assert cache.ensure(parts, lowest, range(40)) is not None
    for indices in ([0, 1, 2, 3, 4, 5, 6, 7], list(range(8, 40)), [17]):
        batch = collate(shard, indices)
        hidden, mask = cache.batch(lowest, indices)
        assert torch.equal(mask, batch["attention_mask"])
        with torch.no_grad():
            expected = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            got = forward_from(parts, lowest, hidden, mask)
        assert (got - expected).abs().max().item() < 1e-5


def test_token_accounting_and_extension(deep: AdapterRuntime, synthetic: Synthetic) -> None:
    shard = _subset(synthetic[0], 48)
    trainer = LoraTrainer(deep, shard)
    spec1 = make_spec({1: 4, 4: 4})  # non-contiguous, lowest 1
    start1 = deep.initial_adapter(spec1, 0)
    task = make_task(spec1, start1, batch_size=16)
    first = trainer.train(task, start1).metrics
    batches = epoch_batches(48, 16, _seed(task))
    assert (
        first.tokens
        == _padded_tokens(shard, batches)
        == sum(b["input_ids"].numel() for b in iter_batches(shard, 16, seed=_seed(task)))
    )
    assert first.cached and first.lowest_block == 1 and first.steps == 3
    unpadded = sum(len(r) for r in shard.input_ids)
    assert unpadded <= first.embed_tokens <= 1.1 * unpadded  # length-sorted chunks pad little
    assert first.prefix_block_tokens == first.embed_tokens * 1

    again = trainer.train(make_task(spec1, start1, batch_size=8, round=1), start1).metrics
    assert again.cached and again.embed_tokens == 0 and again.prefix_block_tokens == 0

    other = make_spec({1: 2})  # another spec, same lowest block
    assert trainer.train(make_task(other, deep.initial_adapter(other, 0)), deep.initial_adapter(other, 0))
    assert trainer.cache is not None and trainer.cache.boundaries() == [0, 1]

    spec3 = make_spec({3: 4})
    start3 = deep.initial_adapter(spec3, 0)
    deeper = trainer.train(make_task(spec3, start3, batch_size=16), start3).metrics
    assert deeper.cached and deeper.lowest_block == 3 and deeper.embed_tokens == 0
    # extended from boundary 1 in the same length-sorted chunks: 2 more blocks over the same tokens
    assert deeper.prefix_block_tokens == first.embed_tokens * (3 - 1)
    assert trainer.cache.boundaries() == [0, 1, 2, 3]

    spec2 = make_spec({2: 4})
    start2 = deep.initial_adapter(spec2, 0)
    stored = trainer.train(make_task(spec2, start2), start2).metrics  # boundary 2 was stored on the way
    assert stored.embed_tokens == 0 and stored.prefix_block_tokens == 0


def _seed(task: object) -> int:
    from worker.trainer import task_seed

    return task_seed(task.hparams.seed, task.round, task.device_id)  # type: ignore[attr-defined]


def test_lowest_block_zero_caches_the_embeddings(runtime: AdapterRuntime, synthetic: Synthetic) -> None:
    shard = _subset(synthetic[0], 32)
    trainer = LoraTrainer(runtime, shard)
    spec = make_spec({0: 4, 2: 4})
    start = runtime.initial_adapter(spec, 0)
    m = trainer.train(make_task(spec, start, batch_size=16), start).metrics
    assert m.cached and m.lowest_block == 0 and m.prefix_block_tokens == 0
    unpadded = sum(len(r) for r in shard.input_ids)
    assert unpadded <= m.embed_tokens <= 1.1 * unpadded


def test_uncached_path_counts_the_whole_prefix_every_step(deep: AdapterRuntime, synthetic: Synthetic) -> None:
    shard = _subset(synthetic[0], 40)
    trainer = LoraTrainer(deep, shard, cache=False)
    assert trainer.cache is None
    spec = make_spec({2: 4, 4: 8})
    start = deep.initial_adapter(spec, 0)
    task = make_task(spec, start, batch_size=16, local_epochs=2)
    outcome = trainer.train(task, start)
    m = outcome.metrics
    assert not m.cached and m.steps == 6 and m.examples == 80 and m.lowest_block == 2
    expected_tokens = sum(_padded_tokens(shard, epoch_batches(40, 16, _seed(task) + e)) for e in range(2))
    assert m.tokens == expected_tokens
    assert m.embed_tokens == m.tokens and m.prefix_block_tokens == m.tokens * 2
    assert all(not torch.equal(start[k], outcome.tensors[k]) for k in start)


def test_max_steps_caches_only_the_samples_used(deep: AdapterRuntime, synthetic: Synthetic) -> None:
    shard = _subset(synthetic[0], 64)
    trainer = LoraTrainer(deep, shard)
    spec = make_spec({2: 4})
    start = deep.initial_adapter(spec, 0)
    task = make_task(spec, start, batch_size=8, max_steps=2)
    m = trainer.train(task, start).metrics
    used = epoch_batches(64, 8, _seed(task))[:2]
    assert m.steps == 2 and m.tokens == _padded_tokens(shard, used)
    assert trainer.cache is not None
    assert {i for i in range(64) if trainer.cache.has(2, i)} == {i for b in used for i in b}
    unpadded = sum(len(shard.input_ids[i]) for b in used for i in b)
    assert unpadded <= m.embed_tokens <= 1.1 * unpadded and m.prefix_block_tokens == 2 * m.embed_tokens


def test_epoch_batches_follow_iter_batches(synthetic: Synthetic) -> None:
    shard = _subset(synthetic[0], 50)
    for got, want in zip(epoch_batches(50, 16, 7), iter_batches(shard, 16, seed=7), strict=True):
        assert torch.equal(collate(shard, got)["input_ids"], want["input_ids"])


def test_cached_training_changes_only_the_spec_and_is_deterministic(
    deep: AdapterRuntime, synthetic: Synthetic
) -> None:
    spec = make_spec({1: 4, 3: 2})
    start = deep.initial_adapter(spec, 0)
    deep.load(make_spec({0: 2}), _random_adapter(deep, make_spec({0: 2}), 1))  # another adapter exists
    deep.load(spec, start)
    before = {n: p.detach().clone() for n, p in deep.model.named_parameters()}
    trainer = LoraTrainer(deep, _subset(synthetic[0], 64))
    task = make_task(spec, start, batch_size=16, local_epochs=2)
    first = trainer.train(task, start)
    assert first.metrics.cached
    after = dict(deep.model.named_parameters())
    own = {id(p) for p in deep.parameters(spec).values()}
    assert all(torch.equal(after[n], before[n]) for n in before if id(after[n]) not in own)
    assert all(not torch.equal(start[k], first.tensors[k]) for k in start)  # LoRA at 1 gets gradients too

    deep.load(make_spec({0: 2}), deep.initial_adapter(make_spec({0: 2}), 9))  # something in between
    second = trainer.train(task, start)
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in start)
    assert first.metrics.train_loss == second.metrics.train_loss
    fresh = LoraTrainer(deep, _subset(synthetic[0], 64)).train(task, start)
    assert all(torch.equal(first.tensors[k], fresh.tensors[k]) for k in start)


def test_cached_training_learns_as_well_as_uncached(synthetic: Synthetic) -> None:
    train, held_out = synthetic
    shard = _subset(train, 2000)
    accuracy = {}
    for cache in (True, False):
        runtime = AdapterRuntime(TINY, num_labels=2, seed=0)
        spec = make_spec({1: 4, 2: 4})
        start = runtime.initial_adapter(spec, 0)
        task = make_task(spec, start, batch_size=32, lr=1e-2, local_epochs=2)
        outcome = LoraTrainer(runtime, shard, cache=cache).train(task, start)
        assert outcome.metrics.cached is cache
        accuracy[cache], _ = evaluate(runtime, spec, outcome.tensors, held_out)
    assert accuracy[True] >= 0.8 and accuracy[False] >= 0.8, accuracy
    assert abs(accuracy[True] - accuracy[False]) <= 0.1, accuracy


def test_memory_bound_evicts_and_falls_back(deep: AdapterRuntime, synthetic: Synthetic) -> None:
    shard = _subset(synthetic[0], 32)
    one_boundary = sum(len(r) for r in shard.input_ids) * deep.hidden_size * 4
    trainer = LoraTrainer(deep, shard, cache_max_bytes=one_boundary)
    cache = trainer.cache
    assert cache is not None
    spec1, spec3 = make_spec({1: 4}), make_spec({3: 4})
    m1 = trainer.train(make_task(spec1, deep.initial_adapter(spec1, 0)), deep.initial_adapter(spec1, 0))
    assert m1.metrics.cached and cache.boundaries() == [1] and cache.nbytes == one_boundary
    m3 = trainer.train(make_task(spec3, deep.initial_adapter(spec3, 0)), deep.initial_adapter(spec3, 0))
    assert m3.metrics.cached and m3.metrics.embed_tokens == 0  # extended from 1, then 1 evicted
    assert cache.boundaries() == [3] and cache.nbytes <= cache.max_bytes

    tiny_budget = LoraTrainer(deep, shard, cache_max_bytes=one_boundary - 1)
    m = tiny_budget.train(make_task(spec1, deep.initial_adapter(spec1, 0)), deep.initial_adapter(spec1, 0))
    assert not m.metrics.cached and m.metrics.embed_tokens == m.metrics.tokens
    assert tiny_budget.cache is not None and tiny_budget.cache.nbytes == 0


@pytest.mark.ml
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_minilm_cached_forward_equals_the_peft_forward() -> None:
    minilm = ModelConfig(name="minilm", max_seq_len=64)
    try:
        rows = load_split("sst2", None, "train").subset(range(24))
    except DataError as exc:
        pytest.skip(str(exc))
    shard = encode_dataset(load_tokenizer(minilm), rows, minilm.max_seq_len)
    runtime = AdapterRuntime(minilm, num_labels=2, seed=0)
    for blocks in ((5,), (1, 4)):
        spec = make_spec(dict.fromkeys(blocks, 8))
        model = runtime.load(spec, _random_adapter(runtime, spec, 0)).eval()
        parts = BertParts.of(model)
        assert parts is not None
        cache = PrefixCache(shard, runtime.hidden_size)
        assert cache.ensure(parts, min(blocks), range(24)) is not None
        batch = collate(shard, list(range(24)))
        with torch.no_grad():
            expected = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            got = forward_from(parts, min(blocks), *cache.batch(min(blocks), range(24)))
            split = runtime.split  # the generic split (what LoraTrainer uses) reads the same cache
            assert split is not None
            inputs = forward_inputs(batch)
            generic = split.forward(min(blocks), cache.batch(min(blocks), range(24))[0], inputs).logits
        assert (got - expected).abs().max().item() < 1e-5
        assert (generic - expected).abs().max().item() < 1e-5
