"""A calibrated cost model of one LoRA training task, for the virtual clock and the planners.

Host seconds are modelled per token, by where the token goes:

* the *frozen prefix* (embeddings and the blocks below the lowest LoRA block) runs forward only;
  with the frozen-prefix activation cache a device pays for it once per sample, not every step;
* every block from the lowest LoRA block up is on the gradient path (forward and backward);
* the head (pooler, classifier, loss) and a constant per optimiser step.

Rank does not enter: measured on this host, ranks 4-16 cost the same within noise
(``benchmarks/calibrate.py`` measures it). The constants come from ``benchmarks/calibrate.py`` and live in
``lorafleet/devices/costmodels/*.json``; because the clock uses counted tokens, not measured seconds, the
same seed gives the same virtual times however loaded the machine is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafleet.settings import load_settings

_PACKAGED = Path(__file__).parent / "costmodels"


@dataclass(frozen=True)
class CostModel:
    name: str
    num_blocks: int
    embed_s: float  # per token: embeddings
    prefix_block_s: float  # per token and block: forward of a frozen block below the LoRA
    train_block_s: float  # per token and block on the gradient path: forward + backward
    head_s: float  # per token: pooler, classifier, loss
    step_s: float  # per optimiser step
    source: str = ""

    def train_seconds(
        self, *, tokens: int, lowest_block: int, steps: int, embed_tokens: int, prefix_block_tokens: int
    ) -> float:
        """Host seconds of a task.

        ``tokens`` went through the gradient path from ``lowest_block`` up over ``steps`` steps;
        ``embed_tokens`` through the embeddings and ``prefix_block_tokens`` (tokens x blocks) through
        frozen blocks below it. Without the activation cache every step pays the prefix
        (``embed_tokens = tokens``, ``prefix_block_tokens = tokens * lowest_block``); with it only
        samples not cached yet do.

        Raises:
            ValueError: ``lowest_block`` outside the model.
        """
        if not 0 <= lowest_block < self.num_blocks:
            raise ValueError(f"lowest_block {lowest_block} outside 0..{self.num_blocks - 1}")
        grad_blocks = self.num_blocks - lowest_block
        gradient_path = tokens * (grad_blocks * self.train_block_s + self.head_s)
        prefix = embed_tokens * self.embed_s + prefix_block_tokens * self.prefix_block_s
        return gradient_path + prefix + steps * self.step_s

    def task_seconds(self, *, tokens: int, lowest_block: int, steps: int, cached: bool) -> float:
        """Host seconds of a task in steady state: with the cache the prefix is already paid."""
        embed, prefix = (0, 0) if cached else (tokens, tokens * lowest_block)
        return self.train_seconds(
            tokens=tokens,
            lowest_block=lowest_block,
            steps=steps,
            embed_tokens=embed,
            prefix_block_tokens=prefix,
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> CostModel:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def cost_model_for(model_name: str, num_blocks: int, hidden: int) -> CostModel:
    """The calibrated model for MiniLM; for other models, MiniLM's constants scaled by size.

    The scaled model is nominal (it keeps relative costs of depths right, not absolute seconds).
    """
    override = load_settings().cost_model  # a pinned copy (benchmarks), else the packaged one
    base = CostModel.load(override if override is not None else _PACKAGED / "minilm-cpu.json")
    if model_name == "minilm" and num_blocks == base.num_blocks:
        return base
    scale = (hidden / 384.0) ** 2
    return CostModel(
        name=f"{model_name}-nominal",
        num_blocks=num_blocks,
        embed_s=base.embed_s * scale,
        prefix_block_s=base.prefix_block_s * scale,
        train_block_s=base.train_block_s * scale,
        head_s=base.head_s * scale,
        step_s=base.step_s,
        source=f"minilm-cpu scaled by (hidden/384)^2 = {scale:.4f}",
    )
