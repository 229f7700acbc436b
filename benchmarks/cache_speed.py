"""Frozen-prefix activation cache vs the plain forward on the real all-MiniLM-L6-v2 (not a test).

Step time: SST-2 training rows, batch 16 with dynamic padding, LoRA r=8 on query/value of the top
``k`` blocks (k = 1, 2, 3, 6); both modes go through ``LoraTrainer`` (cached: the prefix of every row
is computed beforehand, so the tasks time training steps only). Cached and uncached tasks alternate,
each repeat trains the same batches in both modes; s/step is the median over repeats. Each timed
task waits for a quiet moment on the shared machine and is redone if other processes used more
than ``--max-foreign`` cores while it ran (see ``benchmarks/calibrate.py``).

Accuracy: 2,000 SST-2 rows x 1 epoch at k=2 (blocks 4, 5), lr 1e-3, cached vs uncached (the cached
time includes computing the cache), dev accuracy on the 872 SST-2 dev rows.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cache_speed.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aggregator.evaluation import evaluate  # noqa: E402
from benchmarks.calibrate import QuietRunner  # noqa: E402
from benchmarks.provenance import provenance  # noqa: E402
from lorafleet.data.datasets import EncodedDataset, encode_dataset, load_split  # noqa: E402
from lorafleet.ml.model import AdapterRuntime, load_tokenizer  # noqa: E402
from lorafleet.ml.prefix_cache import BertParts  # noqa: E402
from schemas.config import ModelConfig  # noqa: E402
from schemas.messages import LoraSpec, TrainHyperParams, TrainTask  # noqa: E402
from schemas.tensors import encode_tensors  # noqa: E402
from worker.trainer import LoraTrainer  # noqa: E402

MINILM = ModelConfig(name="minilm", max_seq_len=64)
OUT = Path(__file__).parent / "results" / "cache_speed.json"
COMMAND = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cache_speed.py"


def spec_top(k: int, rank: int = 8) -> LoraSpec:
    return LoraSpec(target_modules=["query", "value"], layer_ranks={i: rank for i in range(6 - k, 6)})


def make_task(spec: LoraSpec, start: dict[str, torch.Tensor], round_: int, **hp: object) -> TrainTask:
    return TrainTask(
        task_id=f"t{round_}",
        run_id="bench",
        round=round_,
        device_id="dev-0000",
        plan_version=0,
        lora=spec,
        hparams=TrainHyperParams(**hp),  # type: ignore[arg-type]
        adapter=encode_tensors(start),
        issued_at=0.0,
        deadline_at=1.0,
    )


def rows(data: EncodedDataset, n: int, seed: int) -> EncodedDataset:
    order = random.Random(seed).sample(range(len(data)), n)
    return EncodedDataset(
        [data.input_ids[i] for i in order], [data.labels[i] for i in order], data.pad_token_id
    )


def step_times(
    runtime: AdapterRuntime,
    shard: EncodedDataset,
    depths: list[int],
    steps: int,
    repeats: int,
    quiet: QuietRunner,
) -> list[dict[str, object]]:
    cached_trainer = LoraTrainer(runtime, shard, cache=True)
    plain_trainer = LoraTrainer(runtime, shard, cache=False)
    out = []
    for k in depths:
        spec = spec_top(k)
        start = runtime.initial_adapter(spec, 0)
        model = runtime.load(spec, start).eval()
        parts = BertParts.of(model)
        assert parts is not None and cached_trainer.cache is not None
        fill_started = time.perf_counter()
        counts = cached_trainer.cache.ensure(parts, 6 - k, range(len(shard)))
        fill_s = time.perf_counter() - fill_started
        per_step: dict[str, list[float]] = {"cached": [], "uncached": []}
        tokens: list[int] = []
        for rep in range(repeats + 1):  # repeat 0 is the warm-up
            for mode, trainer in (("cached", cached_trainer), ("uncached", plain_trainer)):
                task = make_task(spec, start, rep, batch_size=16, max_steps=steps, lr=1e-3)
                m = quiet.run(
                    f"k {k} rep {rep} {mode}", lambda t=trainer, task=task, s=start: t.train(task, s)
                ).metrics
                assert m.cached is (mode == "cached") and m.steps == steps
                if rep:
                    per_step[mode].append(m.compute_s / m.steps)
                    if mode == "cached":
                        tokens.append(m.tokens // m.steps)
        row = {
            "k": k,
            "lowest_block": 6 - k,
            "cached_s_per_step": statistics.median(per_step["cached"]),
            "uncached_s_per_step": statistics.median(per_step["uncached"]),
            "cached_runs": per_step["cached"],
            "uncached_runs": per_step["uncached"],
            "tokens_per_step": statistics.mean(tokens),
            "cache_fill_s": fill_s,
            "cache_fill_embed_tokens": counts.embed_tokens if counts else None,
            "cache_fill_prefix_block_tokens": counts.prefix_block_tokens if counts else None,
        }
        row["speedup"] = row["uncached_s_per_step"] / row["cached_s_per_step"]  # type: ignore[operator]
        print(
            f"k={k}: cached {row['cached_s_per_step']:.4f} s/step, uncached {row['uncached_s_per_step']:.4f}"
            f" s/step, x{row['speedup']:.2f}",
            file=sys.stderr,
        )
        out.append(row)
    return out


def accuracy_check(
    train: EncodedDataset, dev: EncodedDataset, n_rows: int, k: int
) -> list[dict[str, object]]:
    shard = rows(train, n_rows, seed=0)
    out = []
    for cache in (True, False):
        runtime = AdapterRuntime(MINILM, num_labels=2, seed=0)
        spec = spec_top(k)
        start = runtime.initial_adapter(spec, 0)
        outcome = LoraTrainer(runtime, shard, cache=cache).train(
            make_task(spec, start, 0, batch_size=16, local_epochs=1, lr=1e-3), start
        )
        acc, loss = evaluate(runtime, spec, outcome.tensors, dev)
        m = outcome.metrics
        out.append(
            {
                "cached": cache,
                "dev_accuracy": acc,
                "dev_loss": loss,
                "train_loss": m.train_loss,
                "steps": m.steps,
                "train_s_incl_cache": m.compute_s,
                "tokens": m.tokens,
                "embed_tokens": m.embed_tokens,
                "prefix_block_tokens": m.prefix_block_tokens,
            }
        )
        print(f"cache={cache}: dev acc {acc:.4f}, {m.compute_s:.1f} s", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1,2,3,6")
    parser.add_argument("--steps", type=int, default=8, help="steps per timed task")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2000, help="rows for the accuracy check")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-foreign", type=float, default=0.25, help="retry a unit above this load")
    parser.add_argument("--wait-budget-s", type=float, default=240.0, help="total wait for quiet windows")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(MINILM)
    train = encode_dataset(tokenizer, load_split("sst2", None, "train"), MINILM.max_seq_len)
    dev = encode_dataset(tokenizer, load_split("sst2", None, "eval"), MINILM.max_seq_len)
    load_before = os.getloadavg()
    runtime = AdapterRuntime(MINILM, num_labels=2, seed=0)
    quiet = QuietRunner(args.max_foreign, wait_budget_s=args.wait_budget_s)
    depths = [int(d) for d in args.depths.split(",")]
    timing = step_times(
        runtime,
        rows(train, 16 * args.steps * (args.repeats + 1), seed=1),
        depths,
        args.steps,
        args.repeats,
        quiet,
    )
    accuracy = [] if args.skip_accuracy else accuracy_check(train, dev, args.rows, k=2)
    result = {
        **provenance(f"{COMMAND} {' '.join(sys.argv[1:])}", load_before, quiet),
        "threads": args.threads,
        "setup": "all-MiniLM-L6-v2, SST-2 train rows, batch 16 dynamic padding (max_len 64), LoRA r=8 "
        "alpha 16 q/v on the top k blocks, AdamW lr 1e-3; s/step = compute_s/steps of a LoraTrainer "
        f"task of {args.steps} steps, median over {args.repeats} repeats after 1 warm-up, modes alternate",
        "step_time": timing,
        "accuracy": accuracy,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("| k (LoRA blocks) | tokens/step | uncached s/step | cached s/step | speed-up |")
    print("|---|---|---|---|---|")
    for r in timing:
        print(
            f"| {r['k']} | {r['tokens_per_step']:.0f} | {r['uncached_s_per_step']:.4f} | "
            f"{r['cached_s_per_step']:.4f} | {r['speedup']:.2f}x |"
        )
    if accuracy:
        print()
        print("| mode | dev accuracy | train time (s, incl. cache) | steps |")
        print("|---|---|---|---|")
        for a in accuracy:
            mode = "cached" if a["cached"] else "uncached"
            print(f"| {mode} | {a['dev_accuracy']:.4f} | {a['train_s_incl_cache']:.1f} | {a['steps']} |")


if __name__ == "__main__":
    main()
