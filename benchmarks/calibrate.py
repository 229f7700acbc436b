"""Calibrate the cost model (``lorafleet/costmodels/minilm-cpu.json``) on this host.

Measures all-MiniLM-L6-v2 with realistic SST-2 batches (random training rows, dynamic padding,
batch sizes 8/16/32) and torch threads 2:

* embeddings forward and one frozen block forward (per token, averaged over the 6 blocks), both
  as the prefix cache computes them (eval, ``no_grad``) and as an uncached training step runs them
  (train mode: dropout on, autograd on but nothing below the LoRA requires grad);
* cached training steps (``LoraTrainer``'s cached step: batch from the cache, blocks ``b..5``, head,
  loss, backward, AdamW) at depths ``k = 6 - b = 1..6``:
  ``time = tokens * (k * train_block_s + head_s) + step_s``.

The machine is shared: every measurement unit (one repeat of the frozen forwards, one repeat of
one depth's steps) waits for a moment when other processes use < ``--max-foreign`` cores and is
redone (up to 4 times) if they used more while it ran (CPU time from ``/proc/stat`` minus this
process's own); the foreign load of every unit is recorded. Waiting stops after ``--wait-budget-s``.

Every fit is a least-squares fit of relative errors (each equation divided by its measured time)
over the medians of many (depth, batch) cells. Uncached steps (the plain peft forward) are measured
on the same batches to check the model: predicted
``tokens * (embed_s + b * prefix_block_s + k * train_block_s + head_s) + step_s`` vs measured.

The cost model has one ``embed_s``/``prefix_block_s`` for both uses of the frozen prefix: a cache
fill (eval, once per sample) and the uncached step (train mode, every step). ``--prefix-mode``
picks which measurement is packaged (default ``train``: the prefix cost that recurs, so uncached
step times are right; a cache fill is then over-estimated by the train/eval ratio, reported).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/calibrate.py

Writes ``lorafleet/costmodels/minilm-cpu.json`` and ``benchmarks/results/calibration.json`` (raw
medians, fit, residuals, command); ``--dry-run`` writes only the results file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import provenance  # noqa: E402
from lorafleet.data.datasets import EncodedDataset, collate, encode_dataset, load_split  # noqa: E402
from lorafleet.devices.costmodel import CostModel  # noqa: E402
from lorafleet.ml.model import AdapterRuntime, load_tokenizer  # noqa: E402
from lorafleet.ml.prefix_cache import BertParts, PrefixCache, classification_loss, forward_from  # noqa: E402
from schemas.config import ModelConfig  # noqa: E402
from schemas.messages import LoraSpec  # noqa: E402

MINILM = ModelConfig(name="minilm", max_seq_len=64)
BLOCKS = 6
T = TypeVar("T")
RESULTS = Path(__file__).parent / "results" / "calibration.json"
COSTMODEL = Path(__file__).resolve().parents[1] / "lorafleet/devices/costmodels/minilm-cpu.json"


def spec_top(k: int) -> LoraSpec:
    return LoraSpec(target_modules=["query", "value"], layer_ranks={i: 8 for i in range(BLOCKS - k, BLOCKS)})


def timed(fn: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def cached_step(
    parts: BertParts,
    cache: PrefixCache,
    opt: torch.optim.Optimizer,
    lowest: int,
    b: list[int],
    y: torch.Tensor,
) -> None:
    """One step as ``LoraTrainer`` runs it with the cache."""
    opt.zero_grad(set_to_none=True)
    hidden, am = cache.batch(lowest, b)
    classification_loss(forward_from(parts, lowest, hidden, am), y).backward()
    opt.step()


def plain_step(
    model: torch.nn.Module, shard: EncodedDataset, opt: torch.optim.Optimizer, b: list[int]
) -> None:
    """One step as ``LoraTrainer`` runs it without the cache."""
    opt.zero_grad(set_to_none=True)
    model(**collate(shard, b)).loss.backward()
    opt.step()


def _busy_cpu_s() -> float:
    """CPU seconds all processes of this machine have used (``/proc/stat``, idle and iowait excluded)."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(x) for x in f.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class ForeignLoad:
    """The cores other processes used while the ``with`` block ran (the machine is shared)."""

    cores = 0.0

    def __enter__(self) -> ForeignLoad:
        self._busy, self._own, self._wall = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(time.perf_counter() - self._wall, 1e-6)
        other = (_busy_cpu_s() - self._busy) - (_own_cpu_s() - self._own)
        self.cores = max(0.0, other) / wall


class QuietRunner:
    """Runs measurement units when other processes are (nearly) idle, and retries a unit during which
    they used more than ``max_foreign`` cores; a unit waits at most ``unit_wait_s`` per attempt and
    waiting stops after ``wait_budget_s`` in all, after which units run as they come (their foreign
    load is still recorded)."""

    def __init__(
        self,
        max_foreign: float = 0.25,
        attempts: int = 4,
        wait_budget_s: float = 180.0,
        unit_wait_s: float = 20.0,
    ) -> None:
        self.max_foreign = max_foreign
        self.attempts = attempts
        self.wait_left = wait_budget_s
        self.unit_wait_s = unit_wait_s
        self.log: list[dict[str, object]] = []

    def _wait(self) -> None:
        deadline = time.perf_counter() + self.unit_wait_s
        while self.wait_left > 0 and time.perf_counter() < deadline:
            started = time.perf_counter()
            with ForeignLoad() as load:
                time.sleep(0.5)
            self.wait_left -= time.perf_counter() - started
            if load.cores < self.max_foreign:
                return

    def run(self, name: str, unit: Callable[[], T]) -> T:
        for attempt in range(1, self.attempts + 1):
            self._wait()
            with ForeignLoad() as load:
                out = unit()
            if load.cores <= self.max_foreign or attempt == self.attempts or self.wait_left <= 0:
                self.log.append({"unit": name, "attempts": attempt, "foreign_cores": round(load.cores, 3)})
                return out
        raise AssertionError("unreachable")

    def summary(self) -> dict[str, object]:
        loads = [float(e["foreign_cores"]) for e in self.log]  # type: ignore[arg-type]
        return {
            "units": len(self.log),
            "retried_units": sum(1 for e in self.log if e["attempts"] != 1),
            "foreign_cores_median": statistics.median(loads) if loads else None,
            "foreign_cores_max": max(loads) if loads else None,
            "units_over_threshold": sum(1 for x in loads if x > self.max_foreign),
            "threshold_cores": self.max_foreign,
            "wait_budget_left_s": round(max(self.wait_left, 0.0), 1),
        }


def relative_lstsq(features: np.ndarray, times: np.ndarray, nonneg: bool = True) -> np.ndarray:
    """Least squares of relative errors; with ``nonneg`` a negative coefficient is pinned to 0 and the
    rest refitted."""
    active = list(range(features.shape[1]))
    while True:
        a = features[:, active] / times[:, None]
        coef, *_ = np.linalg.lstsq(a, np.ones_like(times), rcond=None)
        if not nonneg or (coef >= 0).all():
            out = np.zeros(features.shape[1])
            out[active] = coef
            return out
        active.pop(int(np.argmin(coef)))


def make_batches(train: EncodedDataset, sizes: list[int], per_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    order = rng.sample(range(len(train)), sum(sizes) * per_size)
    batches, at = [], 0
    for _ in range(per_size):
        for size in sizes:
            batches.append(order[at : at + size])
            at += size
    return batches


def frozen_times(
    parts: BertParts,
    cache: PrefixCache,
    model: torch.nn.Module,
    batches: list[list[int]],
    ids: list[torch.Tensor],
) -> list[tuple[float, float, float, float]]:
    """Per batch: embeddings and mean block forward, in eval/no_grad and in train mode/grad enabled."""
    out = []
    for b, input_ids in zip(batches, ids, strict=True):
        row = []
        for train in (False, True):
            model.train(train)
            with torch.set_grad_enabled(train):
                t_embed = timed(parts.embed, input_ids)
                hidden, am = cache.batch(0, b)
                mask = parts.mask(hidden, am)
                t_block = statistics.mean(timed(parts.blocks, hidden, mask, i, i + 1) for i in range(BLOCKS))
            row += [t_embed, t_block]
        out.append((row[0], row[1], row[2], row[3]))
    model.eval()
    return out


def per_token(tokens: list[int], times: list[float]) -> float:
    return float(relative_lstsq(np.array(tokens, dtype=float)[:, None], np.array(times))[0])


def residuals(
    cost: CostModel, tokens: list[int], med: dict[str, dict[int, list[float]]]
) -> tuple[list[dict[str, object]], dict[str, float]]:
    """Per depth and mode: mean predicted vs mean measured s/step, and the worst batch."""
    rows, worst = [], {"cached": 0.0, "uncached": 0.0}
    for k in range(1, BLOCKS + 1):
        for mode in ("cached", "uncached"):
            pred = [
                cost.task_seconds(tokens=t, lowest_block=BLOCKS - k, steps=1, cached=mode == "cached")
                for t in tokens
            ]
            meas = med[mode][k]
            per_batch = max(abs(p / t - 1) for p, t in zip(pred, meas, strict=True))
            worst[mode] = max(worst[mode], per_batch)
            rows.append(
                {
                    "k": k,
                    "lowest_block": BLOCKS - k,
                    "mode": mode,
                    "measured_s_per_step": sum(meas) / len(meas),
                    "predicted_s_per_step": sum(pred) / len(pred),
                    "relative_error": sum(pred) / sum(meas) - 1,
                    "max_abs_relative_error_per_batch": per_batch,
                }
            )
    return rows, worst


def main() -> None:  # noqa: C901
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,16,32", help="batch sizes")
    parser.add_argument("--per-size", type=int, default=3, help="batches per batch size")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefix-mode", choices=("train", "eval"), default="train")
    parser.add_argument("--max-foreign", type=float, default=0.25, help="retry a unit above this load")
    parser.add_argument("--wait-budget-s", type=float, default=240.0, help="total wait for quiet windows")
    parser.add_argument("--dry-run", action="store_true", help="do not overwrite the packaged cost model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    quiet = QuietRunner(args.max_foreign, wait_budget_s=args.wait_budget_s)

    tokenizer = load_tokenizer(MINILM)
    full = encode_dataset(tokenizer, load_split("sst2", None, "train"), MINILM.max_seq_len)
    index_batches = make_batches(full, [int(s) for s in args.sizes.split(",")], args.per_size, seed=0)
    used = sorted({i for b in index_batches for i in b})
    remap = {i: j for j, i in enumerate(used)}
    shard = EncodedDataset(
        [full.input_ids[i] for i in used], [full.labels[i] for i in used], full.pad_token_id
    )
    batches = [[remap[i] for i in b] for b in index_batches]
    tokens = [len(b) * max(len(shard.input_ids[i]) for i in b) for b in batches]
    ids = [collate(shard, b)["input_ids"] for b in batches]
    labels = [torch.tensor([shard.labels[i] for i in b], dtype=torch.long) for b in batches]

    runtime = AdapterRuntime(MINILM, num_labels=2, seed=0)
    specs = {k: spec_top(k) for k in range(1, BLOCKS + 1)}
    starts = {k: runtime.initial_adapter(s, 0) for k, s in specs.items()}
    model = runtime.load(specs[BLOCKS], starts[BLOCKS])
    parts = BertParts.of(model)
    assert parts is not None
    cache = PrefixCache(shard, runtime.hidden_size)
    for b in range(BLOCKS):
        runtime.load(specs[BLOCKS - b], starts[BLOCKS - b])
        assert cache.ensure(parts, b, range(len(shard))) is not None
    optimizers = {
        k: torch.optim.AdamW(list(runtime.parameters(s).values()), lr=1e-3) for k, s in specs.items()
    }

    def train_unit(k: int) -> list[tuple[float, float]]:
        lowest = BLOCKS - k
        m = runtime.load(specs[k], starts[k])
        m.train()
        opt = optimizers[k]
        return [
            (
                timed(cached_step, parts, cache, opt, lowest, b, labels[j]),
                timed(plain_step, m, shard, opt, b),
            )
            for j, b in enumerate(batches)
        ]

    def frozen_unit() -> list[tuple[float, float, float, float]]:
        runtime.load(specs[1], starts[1])
        return frozen_times(parts, cache, model, batches, ids)

    # ---- interleaved repeats: frozen forwards, then cached/uncached steps per depth (same batches)
    frozen_raw: list[list[tuple[float, float, float, float]]] = [[] for _ in batches]
    raw: dict[str, dict[int, list[list[float]]]] = {
        m: {k: [[] for _ in batches] for k in specs} for m in ("cached", "uncached")
    }
    for rep in range(args.repeats + 1):
        for j, times in enumerate(quiet.run(f"frozen rep {rep}", frozen_unit)):
            if rep:
                frozen_raw[j].append(times)
        for k in specs:
            for j, (t_c, t_u) in enumerate(quiet.run(f"train rep {rep} k {k}", lambda k=k: train_unit(k))):
                if rep:
                    raw["cached"][k][j].append(t_c)
                    raw["uncached"][k][j].append(t_u)
        print(f"repeat {rep} done at {time.perf_counter() - started:.0f} s", file=sys.stderr)

    med = {m: {k: [statistics.median(r) for r in rows] for k, rows in d.items()} for m, d in raw.items()}
    frozen_med = {
        name: [statistics.median(t[c] for t in runs) for runs in frozen_raw]
        for c, name in enumerate(("embed_eval", "block_eval", "embed_train", "block_train"))
    }
    frozen = {name: per_token(tokens, times) for name, times in frozen_med.items()}

    # ---- the gradient path from cached steps: time = tokens*k*train_block_s + tokens*head_s + step_s
    feats = [[tokens[j] * k, tokens[j], 1.0] for k in specs for j in range(len(batches))]
    times = [med["cached"][k][j] for k in specs for j in range(len(batches))]
    train_block_s, head_s, step_s = (float(c) for c in relative_lstsq(np.array(feats), np.array(times)))

    def model_with(mode: str, source: str = "") -> CostModel:
        return CostModel(
            name="minilm-cpu",
            num_blocks=BLOCKS,
            embed_s=frozen[f"embed_{mode}"],
            prefix_block_s=frozen[f"block_{mode}"],
            train_block_s=train_block_s,
            head_s=head_s,
            step_s=step_s,
            source=source,
        )

    command = ("HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/calibrate.py " + " ".join(sys.argv[1:])).strip()
    cost = model_with(
        args.prefix_mode,
        f"benchmarks/calibrate.py on this host, {time.strftime('%Y-%m-%d')}, torch {torch.__version__} CPU, "
        f"{args.threads} threads, SST-2 batches {args.sizes} with dynamic padding "
        f"(mean {statistics.mean(tokens):.0f} tokens/step); gradient path: relative least squares over "
        f"(depth 1-6, batch) medians of {args.repeats} cached-step repeats in quiet windows; embed/prefix: "
        f"frozen forwards in {args.prefix_mode} mode; eval-mode prefix (cache fill) is "
        f"{frozen['block_eval'] / frozen['block_train']:.2f}x the train-mode one; residuals in "
        f"benchmarks/results/calibration.json; command: {command}",
    )
    rows, worst = residuals(cost, tokens, med)
    other = "eval" if args.prefix_mode == "train" else "train"
    other_rows, other_worst = residuals(model_with(other), tokens, med)
    wall = time.perf_counter() - started
    result = {
        **provenance(command, load_before, quiet),
        "threads": args.threads,
        "wall_s": wall,
        "batches": [{"size": len(b), "tokens": t} for b, t in zip(batches, tokens, strict=True)],
        "raw_medians": {
            **{f"{name}_s": v for name, v in frozen_med.items()},
            "cached_step_s": {str(k): v for k, v in med["cached"].items()},
            "uncached_step_s": {str(k): v for k, v in med["uncached"].items()},
        },
        "raw_minimums": {
            "cached_step_s": {str(k): [min(r) for r in v] for k, v in raw["cached"].items()},
            "uncached_step_s": {str(k): [min(r) for r in v] for k, v in raw["uncached"].items()},
        },
        "frozen_per_token_s": frozen,
        "prefix_mode": args.prefix_mode,
        "fit": cost.__dict__,
        "residuals": rows,
        "worst_batch_relative_error": worst,
        f"residuals_with_{other}_mode_prefix": other_rows,
        f"worst_batch_relative_error_with_{other}_mode_prefix": other_worst,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not args.dry_run:
        cost.save(COSTMODEL)
    print(json.dumps(cost.__dict__, indent=2))
    print("frozen per token: " + ", ".join(f"{k} {v:.3e}" for k, v in frozen.items()))
    print(f"| k | lowest | mode | measured s/step | predicted s/step | error | error ({other}-mode prefix) |")
    print("|---|---|---|---|---|---|---|")
    for r, o in zip(rows, other_rows, strict=True):
        print(
            f"| {r['k']} | {r['lowest_block']} | {r['mode']} | {r['measured_s_per_step']:.4f} | "
            f"{r['predicted_s_per_step']:.4f} | {100 * r['relative_error']:+.1f}% | "
            f"{100 * o['relative_error']:+.1f}% |"
        )
    print(f"wall {wall:.0f} s; foreign load {quiet.summary()}")


if __name__ == "__main__":
    main()
