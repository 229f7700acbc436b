"""AdapterRuntime on the tiny model: adapter layout, validation, spec switching, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from lorafleet.data.datasets import iter_batches
from lorafleet.ml.model import AdapterRuntime, configure_torch_threads, load_base_model, model_path, spec_key
from schemas.config import ModelConfig
from tests.ml.conftest import TINY, Synthetic, make_spec

PREFIX = "base_model.model.bert.encoder.layer"
HEAD = {"base_model.model.classifier.weight": (2, 32), "base_model.model.classifier.bias": (2,)}


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_num_blocks(runtime: AdapterRuntime) -> None:
    assert runtime.num_blocks == 3


def test_initial_adapter_has_the_spec_blocks_and_ranks(runtime: AdapterRuntime) -> None:
    spec = make_spec({0: 2, 2: 8})
    tensors = runtime.initial_adapter(spec, seed=1)
    expected = dict(HEAD)
    for block, rank in ((0, 2), (2, 8)):
        for target in ("query", "value"):
            expected[f"{PREFIX}.{block}.attention.self.{target}.lora_A.weight"] = (rank, 32)
            expected[f"{PREFIX}.{block}.attention.self.{target}.lora_B.weight"] = (32, rank)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert all(not v.any() for k, v in tensors.items() if "lora_B" in k or k.endswith("bias"))
    assert all(v.abs().sum() > 0 for k, v in tensors.items() if "lora_A" in k)


def test_initial_adapter_is_deterministic_given_seed(runtime: AdapterRuntime) -> None:
    spec = make_spec({1: 4})
    a, b, c = (runtime.initial_adapter(spec, seed=s) for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a[f"{PREFIX}.1.attention.self.query.lora_A.weight"],
        c[f"{PREFIX}.1.attention.self.query.lora_A.weight"],
    )


def test_spec_key_ignores_ordering() -> None:
    assert spec_key(make_spec({0: 2, 2: 8})) == spec_key(make_spec({2: 8, 0: 2}, ("value", "query")))


def test_load_then_export_round_trips(runtime: AdapterRuntime) -> None:
    spec = make_spec({0: 4, 1: 4})
    tensors = {k: torch.randn_like(v) for k, v in runtime.initial_adapter(spec, 0).items()}
    runtime.load(spec, tensors)
    exported = runtime.export(spec)
    assert exported.keys() == tensors.keys()
    assert all(torch.equal(exported[k], tensors[k]) for k in tensors)
    assert all(not t.requires_grad and t.device.type == "cpu" for t in exported.values())


def test_load_rejects_missing_unexpected_and_misshapen(runtime: AdapterRuntime) -> None:
    spec = make_spec({0: 4})
    good = runtime.initial_adapter(spec, 0)
    missing_key = f"{PREFIX}.0.attention.self.query.lora_A.weight"
    bad = dict(good)
    del bad[missing_key]
    bad["base_model.model.bogus.weight"] = torch.zeros(1)
    bad["base_model.model.classifier.weight"] = torch.zeros(3, 32)
    with pytest.raises(ValueError) as err:
        runtime.load(spec, bad)
    message = str(err.value)
    assert missing_key in message
    assert "base_model.model.bogus.weight" in message
    assert "base_model.model.classifier.weight: got (3, 32), expected (2, 32)" in message


def test_load_rejects_blocks_the_model_lacks(runtime: AdapterRuntime) -> None:
    with pytest.raises(ValueError, match="blocks"):
        runtime.initial_adapter(make_spec({7: 4}), 0)


def test_switching_specs_does_not_leak(runtime: AdapterRuntime, synthetic: Synthetic) -> None:
    batch = next(iter_batches(synthetic[1], 8, seed=None))
    spec_a, spec_b = make_spec({0: 4, 1: 4}), make_spec({2: 2})
    tensors_b = {k: torch.randn_like(v) * 0.5 for k, v in runtime.initial_adapter(spec_b, 1).items()}
    alone = AdapterRuntime(TINY, num_labels=2, seed=0)
    expected_b = _logits(alone.load(spec_b, tensors_b), batch)

    tensors_a = {k: torch.randn_like(v) * 0.5 for k, v in runtime.initial_adapter(spec_a, 2).items()}
    logits_a = _logits(runtime.load(spec_a, tensors_a), batch)
    assert torch.equal(_logits(runtime.load(spec_b, tensors_b), batch), expected_b)
    assert torch.equal(_logits(runtime.load(spec_a, tensors_a), batch), logits_a)
    assert not torch.allclose(logits_a, expected_b)


def test_only_the_active_adapter_is_trainable(runtime: AdapterRuntime) -> None:
    spec_a, spec_b = make_spec({0: 4}), make_spec({1: 4})
    runtime.load(spec_a, runtime.initial_adapter(spec_a, 0))
    model = runtime.load(spec_b, runtime.initial_adapter(spec_b, 0))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in runtime.parameters(spec_b).values()}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_save_peft_checkpoint_round_trips_logits(
    runtime: AdapterRuntime, synthetic: Synthetic, tmp_path: Path
) -> None:
    spec = make_spec({0: 2, 2: 4})
    tensors = {k: torch.randn_like(v) * 0.3 for k, v in runtime.initial_adapter(spec, 3).items()}
    runtime.save_peft_checkpoint(spec, tensors, tmp_path, dataset="synthetic")
    batch = next(iter_batches(synthetic[1], 16, seed=None))
    expected = _logits(runtime.load(spec, tensors), batch)

    restored = PeftModel.from_pretrained(load_base_model(TINY, num_labels=2, seed=0), tmp_path)
    assert torch.equal(_logits(restored, batch), expected)
    meta = json.loads((tmp_path / "lorafleet.json").read_text())
    assert meta["num_labels"] == 2 and meta["dataset"] == "synthetic"
    assert meta["model"]["name"] == "tiny" and meta["spec"]["layer_ranks"] == {"0": 2, "2": 4}


def test_save_peft_checkpoint_validates(runtime: AdapterRuntime, tmp_path: Path) -> None:
    spec = make_spec({0: 2})
    with pytest.raises(ValueError, match="do not fit the LoRA spec: missing"):
        runtime.save_peft_checkpoint(spec, {}, tmp_path)


def test_base_model_is_deterministic_given_seed() -> None:
    a, b = load_base_model(TINY, 2, seed=4), load_base_model(TINY, 2, seed=4)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = load_base_model(TINY, 2, seed=5)
    assert not torch.equal(sa["classifier.weight"], c.state_dict()["classifier.weight"])


def test_model_path_refuses_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nowhere"):
        model_path(ModelConfig(name=str(tmp_path / "nowhere")))
    assert model_path(ModelConfig(name=str(tmp_path))) == str(tmp_path)


def test_configure_torch_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_torch_threads(3) == 3 == torch.get_num_threads()
        assert configure_torch_threads(0, share=10_000) == 1
        with pytest.raises(ValueError):
            configure_torch_threads(-1)
    finally:
        torch.set_num_threads(before)
