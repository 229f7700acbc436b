"""Every tested family end to end: embedded runs on tiny random models saved to folders (as downloaded
checkpoints are), and adapters that plain transformers + peft reload to the reported metric."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lorafleet.app.embedded import run_embedded
from lorafleet.app.wiring import with_model_defaults
from lorafleet.data.datasets import encode_dataset, eval_set
from lorafleet.ml.architecture import describe
from lorafleet.ml.lora import parse_key
from lorafleet.ml.model import AdapterRuntime
from lorafleet.ml.tiny import TINY_FAMILIES, build_tiny_model, tiny_config
from schemas.config import ModelConfig, RunConfig, parse_run_config
from schemas.errors import ConfigError
from tests.ml.conftest import ModelFolder, plain_peft_metrics

#: The families the acceptance runs cover (every one of TINY_FAMILIES is checked for its architecture
#: and, in test_prefix_split.py, for the prefix cache).
RUN_FAMILIES = ("bert", "roberta", "distilbert", "gpt2", "llama", "qwen2")

#: What lorafleet must find in each family (blocks, head, default LoRA targets): the oracle.
EXPECTED = {
    "bert": ("bert.encoder.layer", ("classifier",), ("query", "value")),
    "roberta": ("roberta.encoder.layer", ("classifier",), ("query", "value")),
    "distilbert": ("distilbert.transformer.layer", ("pre_classifier", "classifier"), ("q_lin", "v_lin")),
    "deberta-v2": ("deberta.encoder.layer", ("pooler", "classifier"), ("query_proj", "value_proj")),
    "electra": ("electra.encoder.layer", ("classifier",), ("query", "value")),
    "gpt2": ("transformer.h", ("score",), ("c_attn",)),
    "llama": ("model.layers", ("score",), ("q_proj", "v_proj")),
    "qwen2": ("model.layers", ("score",), ("q_proj", "v_proj")),
    "mistral": ("model.layers", ("score",), ("q_proj", "v_proj")),
    "phi": ("model.layers", ("score",), ("q_proj", "v_proj", "fc1", "fc2")),
}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_architecture_is_read_from_the_model(family: str) -> None:
    config = tiny_config(family, vocab_size=50, layers=3)
    classifier = describe(build_tiny_model(config, "sequence_classification", 0), "sequence_classification")
    assert (classifier.blocks_path, classifier.head, classifier.default_targets) == EXPECTED[family]
    assert classifier.num_blocks == 3 and classifier.hidden_size == 32
    assert set(classifier.default_targets) <= {p.rsplit(".", 1)[-1] for p in classifier.projections}
    if family in ("gpt2", "llama"):  # a causal LM trains no head: lm_head stays frozen
        causal = describe(build_tiny_model(config, "causal_lm", 0), "causal_lm")
        assert causal.head == () and causal.blocks_path == classifier.blocks_path


def _run_config(folder: Path, strategy: str, **model: Any) -> RunConfig:
    return parse_run_config(
        {
            "run_id": "family",
            "strategy": strategy,
            "model": {"name": str(folder), "max_seq_len": 32, "torch_threads": 1, **model},
            "data": {"dataset": "synthetic", "samples_per_device": 48, "eval_samples": 64},
            "devices": {"count": 3},
            "lora": {"rank": 4},
            "training": {"lr": 1.0e-2, "batch_size": 16},
            "rounds": {"max_rounds": 2},
        }
    )


@pytest.mark.parametrize("strategy", ["fedlora", "legend"])
@pytest.mark.parametrize("family", RUN_FAMILIES)
@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads a deprecated transformers flag
def test_an_embedded_run_exports_an_adapter_that_peft_reloads_to_the_reported_metric(
    family: str, strategy: str, model_folder: ModelFolder, tmp_path: Path
) -> None:
    # Given a tiny random model of the family in a folder with its tokenizer, and no target modules set
    folder = model_folder(family)
    config = _run_config(folder, strategy)
    assert config.lora.targets is None
    # When a whole federated run goes through the embedded services
    report = run_embedded(config, tmp_path, quiet=True)
    # Then every round heard from every device, and the family's default targets and head were trained
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(r["devices_reported"] == 3 for r in report["rounds"])
    blocks_path, head, targets = EXPECTED[family]
    tensors = _adapter_keys(tmp_path / "adapter")
    lora = [parse_key(k) for k in tensors if "lora_" in k]
    assert {i.module for i in lora} == set(targets) and {i.block for i in lora} == {0, 1, 2}
    assert all(f".{blocks_path}." in k for k in tensors if "lora_" in k)
    shared = {k.split(".")[2] for k in tensors if "lora_" not in k}  # base_model.model.<head>...
    assert shared == set(head)
    # and plain transformers + peft reload the adapter and measure the reported accuracy and loss
    accuracy, loss = plain_peft_metrics(tmp_path, folder)
    assert accuracy == report["final_accuracy"]
    assert loss == pytest.approx(report["rounds"][-1]["loss"], abs=1e-5)


def _adapter_keys(adapter: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def test_target_modules_can_be_overridden_and_are_checked(model_folder: ModelFolder) -> None:
    folder = model_folder("gpt2")
    runtime = AdapterRuntime(ModelConfig(name=str(folder), max_seq_len=32), num_labels=2)
    # the MLP instead of the attention: a name peft matches by suffix
    config = with_model_defaults(_run_config(folder, "fedlora"), runtime)
    assert config.lora.target_modules == ["c_attn"]
    mlp = parse_run_config(
        {**config.model_dump(), "lora": {"rank": 4, "target_modules": ["mlp.c_proj", "c_fc"]}}
    )
    assert with_model_defaults(mlp, runtime).lora.target_modules == ["mlp.c_proj", "c_fc"]
    spec_keys = runtime.initial_adapter(_spec(["mlp.c_proj", "c_fc"], {2: 4}), 0)
    assert {parse_key(k).path for k in spec_keys if "lora_" in k} == {"mlp.c_proj", "mlp.c_fc"}
    wrong = parse_run_config({**config.model_dump(), "lora": {"rank": 4, "target_modules": ["query"]}})
    with pytest.raises(ConfigError, match=r"\['query'\] name no linear module of a gpt2 block.*c_attn"):
        with_model_defaults(wrong, runtime)


def test_sequences_longer_than_the_model_s_positions_are_refused(model_folder: ModelFolder) -> None:
    with pytest.raises(ValueError, match="max_seq_len 1024 exceeds the model's 512 positions"):
        AdapterRuntime(ModelConfig(name=str(model_folder("bert")), max_seq_len=1024), num_labels=2)


def _spec(targets: list[str], ranks: dict[int, int]) -> Any:
    from schemas.messages import LoraSpec

    return LoraSpec(target_modules=targets, layer_ranks=ranks)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_half_precision_base_weights_train_float32_adapters(family: str, model_folder: ModelFolder) -> None:
    from tests.ml.conftest import make_task
    from worker.trainer import LoraTrainer

    folder = model_folder(family)
    runtime = AdapterRuntime(ModelConfig(name=str(folder), max_seq_len=32, dtype="bfloat16"), num_labels=2)
    spec = _spec(runtime.target_modules(None), {1: 4, 2: 4})
    start = runtime.initial_adapter(spec, 0)
    config = _run_config(folder, "fedlora")
    shard = encode_dataset(runtime.tokenizer, eval_set(config), 32)
    outcome = LoraTrainer(runtime, shard).train(make_task(spec, start, batch_size=16, lr=1e-2), start)
    assert outcome.metrics.cached and torch.isfinite(torch.tensor(outcome.metrics.train_loss))
    frozen = {p.dtype for n, p in runtime.model.named_parameters() if ".base_layer." in n}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in runtime.parameters(spec).values()} == {torch.float32}
    assert all(t.dtype == torch.float32 for t in outcome.tensors.values())
    assert any(not torch.equal(start[k], outcome.tensors[k]) for k in start)
    assert next(iter(runtime.split.layers.parameters())).dtype == torch.bfloat16  # type: ignore[union-attr]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_checkpointing_trains_the_same_adapter(family: str, model_folder: ModelFolder) -> None:
    from tests.ml.conftest import make_task
    from worker.trainer import LoraTrainer

    folder = model_folder(family)
    config = _run_config(folder, "fedlora")
    out = {}
    for checkpointing in (False, True):
        model_cfg = ModelConfig(name=str(folder), max_seq_len=32, gradient_checkpointing=checkpointing)
        runtime = AdapterRuntime(model_cfg, num_labels=2)
        spec = _spec(runtime.target_modules(None), {0: 4, 2: 4})
        start = runtime.initial_adapter(spec, 0)
        shard = encode_dataset(runtime.tokenizer, eval_set(config), 32)
        trainer = LoraTrainer(runtime, shard, cache=False)  # the whole model, checkpointed block by block
        out[checkpointing] = trainer.train(make_task(spec, start, batch_size=16, lr=1e-2), start).tensors
        assert runtime.base.is_activation_checkpointing is checkpointing
    assert all(torch.allclose(out[False][k], out[True][k], atol=1e-6) for k in out[False])
    assert any(not torch.equal(start[k], out[True][k]) for k in start)
