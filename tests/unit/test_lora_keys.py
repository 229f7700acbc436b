"""Adapter keys of every model family: block, module and factor parsed the same way, so the per-block
merges, the spec selection and the size model work unchanged whatever the family calls its blocks."""

from __future__ import annotations

import pytest
import torch

from lorafleet.ml.lora import BLOCK_CONTAINERS, KeyInfo, blocks_of, factor_pairs, parse_key, select_for_spec
from schemas.messages import LoraSpec

P = "base_model.model."


@pytest.mark.parametrize(
    ("key", "block", "module", "path"),
    [
        (f"{P}bert.encoder.layer.5.attention.self.query", 5, "query", "attention.self.query"),
        (f"{P}roberta.encoder.layer.0.attention.self.value", 0, "value", "attention.self.value"),
        (f"{P}distilbert.transformer.layer.3.attention.q_lin", 3, "q_lin", "attention.q_lin"),
        (
            f"{P}deberta.encoder.layer.11.attention.self.query_proj",
            11,
            "query_proj",
            "attention.self.query_proj",
        ),
        (f"{P}electra.encoder.layer.2.output.dense", 2, "dense", "output.dense"),
        (f"{P}transformer.h.3.attn.c_attn", 3, "c_attn", "attn.c_attn"),
        (f"{P}transformer.h.3.mlp.c_proj", 3, "c_proj", "mlp.c_proj"),
        (f"{P}model.layers.3.self_attn.q_proj", 3, "q_proj", "self_attn.q_proj"),
        (f"{P}model.layers.27.mlp.down_proj", 27, "down_proj", "mlp.down_proj"),
        (
            f"{P}model.layers.1.mlp.experts.0.w1",
            1,
            "w1",
            "mlp.experts.0.w1",
        ),  # MoE: the block, not the expert
        (f"{P}model.decoder.block.4.layer.0.SelfAttention.q", 4, "q", "layer.0.SelfAttention.q"),  # T5
    ],
)
@pytest.mark.parametrize("factor", ["A", "B"])
def test_every_family_s_lora_keys_parse(key: str, block: int, module: str, path: str, factor: str) -> None:
    info = parse_key(f"{key}.lora_{factor}.weight")
    assert info == KeyInfo(block, module, "A" if factor == "A" else "B")
    assert info.path == path
    assert info.rank_axis == (0 if factor == "A" else 1)


@pytest.mark.parametrize(
    "key",
    [
        f"{P}classifier.weight",
        f"{P}classifier.dense.weight",  # RoBERTa, ELECTRA
        f"{P}pre_classifier.bias",  # DistilBERT
        f"{P}pooler.dense.weight",  # DeBERTa-v2
        f"{P}score.weight",  # decoders
        f"{P}model.layers.3.self_attn.q_proj.weight",  # a base weight, not LoRA
        f"{P}model.layers.3.self_attn.q_proj.lora_A.bias",
        f"{P}model.layer_norm.lora_A.weight",  # no block index
    ],
)
def test_heads_and_other_tensors_are_shared(key: str) -> None:
    assert parse_key(key) == KeyInfo(None, None, None)


def test_the_block_containers_are_peft_s_layer_patterns() -> None:
    assert set(BLOCK_CONTAINERS) == {"layers", "layer", "h", "blocks", "block"}


def _gpt2_adapter(rank: int) -> dict[str, torch.Tensor]:
    out = {f"{P}score.weight": torch.ones(2, 8)}
    for block in range(3):
        for path in ("attn.c_attn", "attn.c_proj", "mlp.c_proj"):
            out[f"{P}transformer.h.{block}.{path}.lora_A.weight"] = torch.randn(rank, 8)
            out[f"{P}transformer.h.{block}.{path}.lora_B.weight"] = torch.randn(24, rank)
    return out


def test_dotted_targets_tell_apart_modules_that_share_a_name() -> None:
    tensors = _gpt2_adapter(rank=8)
    spec = LoraSpec(target_modules=["attn.c_attn", "mlp.c_proj"], layer_ranks={1: 2, 2: 4})
    out = select_for_spec(tensors, spec)
    lora = {(parse_key(k).block, parse_key(k).path) for k in out if parse_key(k).block is not None}
    assert lora == {(b, p) for b in (1, 2) for p in ("attn.c_attn", "mlp.c_proj")}
    assert f"{P}score.weight" in out and blocks_of(out) == {1: 2, 2: 4}
    # a leaf name matches every module of that name, as peft's target_modules does
    both = select_for_spec(tensors, LoraSpec(target_modules=["c_proj"], layer_ranks={0: 8}))
    assert {parse_key(k).path for k in both if "lora_" in k} == {"attn.c_proj", "mlp.c_proj"}


def test_factor_pairs_are_per_module_path() -> None:
    pairs = factor_pairs(_gpt2_adapter(rank=4))
    assert len(pairs) == 9 and (0, "attn.c_proj") in pairs and (0, "mlp.c_proj") in pairs
    a, b = pairs[(2, "mlp.c_proj")]
    assert a.endswith("h.2.mlp.c_proj.lora_A.weight") and b.endswith("h.2.mlp.c_proj.lora_B.weight")
