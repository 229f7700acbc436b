"""The frozen-prefix cache on every family: the split forward from cached states gives the plain
forward's logits and gradients; a model it cannot split is trained without it, saying so once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from lorafleet.data.datasets import EncodedDataset, collate, encode_dataset, load_split
from lorafleet.data.instructions import as_instructions
from lorafleet.ml.architecture import Task
from lorafleet.ml.model import AdapterRuntime, forward_inputs
from lorafleet.ml.prefix_cache import ModelSplit, PrefixCache
from lorafleet.ml.tiny import TINY_FAMILIES, build_tiny_model, train_tokenizer
from schemas.config import ModelConfig
from schemas.messages import LoraSpec
from tests.ml.conftest import ModelFolder, make_task
from worker.trainer import LoraTrainer

ROWS = 24


def _runtime(folder: Path, task: Task = "sequence_classification") -> AdapterRuntime:
    return AdapterRuntime(ModelConfig(name=str(folder), max_seq_len=32, task=task), num_labels=2, seed=0)


def _shard(runtime: AdapterRuntime, causal: bool = False) -> EncodedDataset:
    rows = load_split("synthetic", None, "train").subset(range(ROWS))
    return encode_dataset(runtime.tokenizer, as_instructions(rows) if causal else rows, 32)


def _load_random(runtime: AdapterRuntime, blocks: tuple[int, ...]) -> tuple[LoraSpec, torch.nn.Module]:
    """Load an adapter whose LoRA B factors are non-zero, so the LoRA changes the outputs."""
    spec = LoraSpec(target_modules=runtime.target_modules(None), layer_ranks=dict.fromkeys(blocks, 4))
    g = torch.Generator().manual_seed(3)
    start = runtime.initial_adapter(spec, 0)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.2 if "lora_B" in k else v for k, v in start.items()}
    return spec, runtime.load(spec, tensors).eval()


def _outputs_and_grads(
    runtime: AdapterRuntime, spec: LoraSpec, forward: object
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = runtime.parameters(spec)
    for p in params.values():
        p.grad = None
    out = forward()  # type: ignore[operator]
    out.loss.backward()
    return out.logits.detach(), {k: p.grad.clone() for k, p in params.items() if p.grad is not None}


def _assert_split_matches_plain(
    runtime: AdapterRuntime, shard: EncodedDataset, blocks: tuple[int, ...]
) -> None:
    spec, model = _load_random(runtime, blocks)
    split, boundary = runtime.split, min(blocks)
    assert split is not None
    batch = forward_inputs(collate(shard, range(ROWS)))
    assert split.check(boundary, batch["input_ids"][:4], batch["attention_mask"][:4])
    cache = PrefixCache(shard, runtime.hidden_size)
    assert cache.ensure(split, boundary, range(ROWS)) is not None
    hidden, mask = cache.batch(boundary, range(ROWS))
    assert torch.equal(mask, batch["attention_mask"])
    plain_logits, plain_grads = _outputs_and_grads(runtime, spec, lambda: model(**batch))
    split_logits, split_grads = _outputs_and_grads(
        runtime, spec, lambda: split.forward(boundary, hidden, batch)
    )
    real = batch["attention_mask"].bool() if plain_logits.dim() == 3 else slice(None)  # tokens, not padding
    assert (split_logits[real] - plain_logits[real]).abs().max().item() < 1e-4
    assert split_grads.keys() == plain_grads.keys() and len(plain_grads) == len(runtime.parameters(spec))
    for key, grad in plain_grads.items():
        assert torch.allclose(split_grads[key], grad, rtol=1e-4, atol=1e-6), key


@pytest.mark.parametrize("blocks", [(0, 2), (1, 2), (2,)])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_split_forward_gives_the_plain_logits_and_gradients(
    family: str, blocks: tuple[int, ...], model_folder: ModelFolder
) -> None:
    runtime = _runtime(model_folder(family))
    _assert_split_matches_plain(runtime, _shard(runtime), blocks)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_the_split_forward_of_a_causal_lm_gives_the_plain_loss_and_gradients(
    family: str, model_folder: ModelFolder
) -> None:
    runtime = _runtime(model_folder(family, task="causal_lm"), task="causal_lm")
    shard = _shard(runtime, causal=True)
    assert shard.causal
    for blocks in ((1, 2), (2,)):
        _assert_split_matches_plain(runtime, shard, blocks)


def test_cached_training_of_a_decoder_follows_the_uncached_one(model_folder: ModelFolder) -> None:
    # Llama has no dropout, so training from the cache is the same computation as without it
    folder = model_folder("llama")
    runs = {}
    for cache in (True, False):
        runtime = _runtime(folder)
        spec = LoraSpec(target_modules=runtime.target_modules(None), layer_ranks={1: 4, 2: 4})
        start = runtime.initial_adapter(spec, 0)
        outcome = LoraTrainer(runtime, _shard(runtime), cache=cache).train(
            make_task(spec, start, batch_size=8, local_epochs=2, lr=1e-2), start
        )
        assert outcome.metrics.cached is cache and outcome.metrics.lowest_block == 1
        runs[cache] = outcome
    assert runs[True].metrics.tokens == runs[False].metrics.tokens
    assert runs[True].metrics.prefix_block_tokens < runs[False].metrics.prefix_block_tokens
    assert all(
        torch.allclose(runs[True].tensors[k], runs[False].tensors[k], atol=1e-5) for k in runs[True].tensors
    )


def _t5_folder(tmp_path: Path) -> Path:
    """A tiny T5 classifier: its first block computes the relative position bias that later blocks reuse,
    so skipping blocks changes the result."""
    texts = load_split("synthetic", None, "train").texts[:200]
    tokenizer = train_tokenizer(texts, encoder=True)
    config = AutoConfig.for_model(
        "t5",
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=3,
        num_heads=2,
        initializer_factor=5.0,
    )
    config.pad_token_id, config.eos_token_id, config.decoder_start_token_id = 0, 3, 0
    build_tiny_model(config, "sequence_classification", 0).save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    return tmp_path


def test_a_model_the_split_cannot_reproduce_trains_without_the_cache_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = _runtime(_t5_folder(tmp_path))
    spec = LoraSpec(target_modules=runtime.target_modules(None), layer_ranks={1: 4, 2: 4})
    start = runtime.initial_adapter(spec, 0)
    trainer = LoraTrainer(runtime, _shard(runtime))
    with caplog.at_level(logging.WARNING, logger="lorafleet.ml.prefix_cache"):
        first = trainer.train(make_task(spec, start, batch_size=8), start)
        again = LoraTrainer(runtime, _shard(runtime)).train(
            make_task(spec, start, batch_size=8, round=1), start
        )
    assert not first.metrics.cached and not again.metrics.cached
    assert trainer.cache is not None and trainer.cache.nbytes == 0
    assert any(not torch.equal(start[k], first.tensors[k]) for k in start)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "prefix cache off for this T5ForSequenceClassification" in lines[0], lines


def test_a_split_of_a_model_without_blocks_is_none() -> None:
    assert ModelSplit.of(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None
