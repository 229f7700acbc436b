"""Tiny random models of every tested family, for tests, benchmarks and ``model.name: tiny``.

:func:`tiny_config` builds a small transformers config of a family (2 attention heads, MLP width
twice the hidden width); :func:`train_tokenizer` trains a small tokenizer on a few texts, offline;
:func:`save_tiny_model` writes both to a folder that ``model.name`` can point at, exactly as a
downloaded checkpoint would be laid out (``config.json``, ``model.safetensors``, tokenizer files).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from lorafleet.ml.architecture import Task

#: The families lorafleet is tested with (transformers ``model_type`` names).
ENCODER_FAMILIES = ("bert", "roberta", "distilbert", "deberta-v2", "electra")
DECODER_FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "phi")
TINY_FAMILIES = ENCODER_FAMILIES + DECODER_FAMILIES

#: A chat template in the usual shape (role markers, an end marker, a generation prompt).
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
_CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
_BPE_MERGES = 256  # merges learnt on top of the byte alphabet (fewer if the texts have fewer pairs)


def tiny_config(
    family: str,
    *,
    vocab_size: int,
    hidden: int = 32,
    layers: int = 2,
    pad_token_id: int = 0,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    max_positions: int = 512,
    num_labels: int = 2,
    init_std: float = 0.02,
) -> PretrainedConfig:
    """A small config of ``family`` (a transformers ``model_type``).

    Raises:
        ValueError: ``family`` is not one of :data:`TINY_FAMILIES`.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny config for {family!r}; known: {list(TINY_FAMILIES)}")
    sizes: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": max_positions,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "num_labels": num_labels,
        "initializer_range": init_std,
    }
    if family == "distilbert":
        sizes["hidden_dim"] = 2 * hidden
    elif family == "gpt2":
        sizes["n_inner"] = 2 * hidden
    elif family == "deberta-v2":  # as DeBERTa-v3: disentangled relative attention, no absolute positions
        sizes.update(relative_attention=True, pos_att_type=["p2c", "c2p"], position_biased_input=False)
        sizes.update(max_relative_positions=-1, position_buckets=16, norm_rel_ebd="layer_norm")
    elif (
        family in DECODER_FAMILIES
    ):  # Llama-likes: as many key/value heads as query heads (Qwen2 defaults to 32)
        sizes["num_key_value_heads"] = sizes["num_attention_heads"]
    config: PretrainedConfig = AutoConfig.for_model(family, **sizes)
    return config


def train_tokenizer(
    texts: Iterable[str], *, encoder: bool, chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """A tokenizer trained on ``texts``, offline: for encoders a lower-casing word-level one that puts
    ``<s> ... </s>`` around every text (as RoBERTa), for decoders a byte-level BPE (as GPT-2, Llama 3,
    Qwen2) with a leading ``<s>``.

    Special tokens: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, then the chat markers when
    ``chat_template`` is given.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["<pad>", "<unk>", "<s>", "</s>"] + (_CHAT_TOKENS if chat_template else [])
    rows = list(texts)
    if encoder:
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(rows, trainers.WordLevelTrainer(special_tokens=specials))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(
            vocab_size=len(alphabet) + len(specials) + _BPE_MERGES,
            special_tokens=specials,
            initial_alphabet=alphabet,
        )
        tok.train_from_iterator(rows, trainer)
    template = "<s> $A </s>" if encoder else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    roles: dict[str, Any] = {"cls_token": "<s>", "sep_token": "</s>"} if encoder else {}
    out = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=512,
        **roles,
    )
    if chat_template:
        out.chat_template = chat_template
    return out


def build_tiny_model(config: PretrainedConfig, task: Task, seed: int) -> PreTrainedModel:
    """A randomly initialised task model of ``config``, its weights given by ``seed`` only (the global
    torch RNG is left untouched)."""
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = auto.from_config(config)  # type: ignore[no-untyped-call]
    return model


def save_tiny_model(
    family: str,
    out_dir: Path,
    *,
    texts: Iterable[str],
    task: Task = "sequence_classification",
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    chat_template: str | None = None,
    init_std: float = 0.02,
) -> Path:
    """Write a random ``family`` model and a word-level tokenizer of ``texts`` to ``out_dir``.

    A causal LM is saved as a causal LM, a classifier as the family's base model plus a head (the head
    is re-initialised when lorafleet loads it anyway). Returns ``out_dir``.
    """
    tokenizer = train_tokenizer(texts, encoder=family in ENCODER_FAMILIES, chat_template=chat_template)
    config = tiny_config(
        family,
        vocab_size=len(tokenizer),
        hidden=hidden,
        layers=layers,
        pad_token_id=int(tokenizer.pad_token_id),
        bos_token_id=int(tokenizer.bos_token_id),
        eos_token_id=int(tokenizer.eos_token_id),
        init_std=init_std,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tiny_model(config, task, seed).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
