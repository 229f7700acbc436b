"""A model's structure without its weights: what ``lorafleet validate`` checks a configuration against.

The task model of a :class:`~schemas.config.ModelConfig` is built from its transformers config on
torch's ``meta`` device (no weights are read or allocated, so a checkpoint of any size is inspected in
seconds) and described like a loaded one (:func:`lorafleet.ml.architecture.describe`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
)

from lorafleet.ml.architecture import Architecture, describe
from lorafleet.ml.model import model_path
from lorafleet.ml.tiny import tiny_config
from schemas.config import ModelConfig

#: any vocabulary: a tiny model's structure does not depend on it (the real one is its tokenizer's)
_TINY_VOCAB = 1024


@dataclass(frozen=True)
class ModelShape:
    architecture: Architecture
    max_positions: int | None  # positions the model can embed (None: no limit it states)


def transformers_config(cfg: ModelConfig, num_labels: int) -> PretrainedConfig:
    """The transformers config of ``cfg``'s model: a tiny one built, any other read from its folder.

    Raises:
        ValueError: ``cfg.name`` is not a model lorafleet can load (as :func:`model_path`).
    """
    if cfg.name == "tiny":
        return tiny_config(
            cfg.tiny_family,
            vocab_size=_TINY_VOCAB,
            hidden=cfg.tiny_hidden,
            layers=cfg.tiny_layers,
            num_labels=num_labels,
        )
    config: PretrainedConfig = AutoConfig.from_pretrained(model_path(cfg), local_files_only=True)
    config.num_labels = num_labels
    return config


def model_shape(cfg: ModelConfig, num_labels: int) -> ModelShape:
    """The blocks, projections and head of ``cfg``'s task model, and its positions, without weights.

    Raises:
        ValueError: no such model, or one whose blocks or head lorafleet cannot find.
    """
    config = transformers_config(cfg, num_labels)
    auto = AutoModelForCausalLM if cfg.task == "causal_lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config)  # type: ignore[no-untyped-call]
    positions = getattr(config, "max_position_embeddings", None)
    return ModelShape(describe(model, cfg.task), positions if isinstance(positions, int) else None)
