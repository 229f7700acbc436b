"""Per model family: seconds per local step, peak resident memory per worker, and the frozen-prefix
cache's speedup at depth 1 (not a test).

Models: a tiny random model of every tested family (6 blocks, hidden 128, 2 heads, MLP 256; saved to
a folder with a word-level or byte-level BPE tokenizer trained on the synthetic rows, loaded from
there as a downloaded checkpoint is) as a sequence classifier, GPT-2, Llama and Qwen2 also as causal
LMs, and the real all-MiniLM-L6-v2. Data: 256 synthetic sentiment rows per worker (as one-word
questions for the causal LMs), batch 16, dynamic padding, max_len 64. LoRA r=8 on the family's
default targets.

Each model runs in its own process, as a worker does: one runtime, one shard, 1 torch thread. Its
peak resident memory (``ru_maxrss``) covers the interpreter, torch and transformers, the model, the
adapters, the optimiser and the cache; ``rss_import_mib`` is what the process held before loading the
model. Step times are ``compute_s / steps`` of ``LoraTrainer`` tasks of 8 steps, median over 3 repeats
after a warm-up: ``full`` = LoRA on every block (the FedLoRA default), ``depth1`` = LoRA on the last
block only, without and with the prefix cache (filled beforehand; ``fill_s`` is that one-time cost
for the 256 rows). Each timed task waits for a quiet moment on the shared machine (see
``benchmarks/calibrate.py``); the foreign load is recorded.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_families.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.calibrate import QuietRunner  # noqa: E402
from benchmarks.provenance import provenance  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

#: (row name, family or "minilm", task)
MODELS = [
    (f, f, "sequence_classification")
    for f in (
        "bert",
        "roberta",
        "distilbert",
        "deberta-v2",
        "electra",
        "gpt2",
        "llama",
        "qwen2",
        "mistral",
        "phi",
    )
]
MODELS += [("minilm", "minilm", "sequence_classification")]
MODELS += [(f"{f} (causal LM)", f, "causal_lm") for f in ("gpt2", "llama", "qwen2")]

ROWS, BATCH, MAX_LEN, STEPS, REPEATS, RANK = 256, 16, 64, 8, 3, 8
HIDDEN, LAYERS = 128, 6


#: What the table's columns mean and how far the shared host skews them.
NOTES = (
    "Depth 1 = LoRA on the last block only: without the cache every step still runs all 6 blocks "
    "forward (5 of them without gradients); with it a step runs the last block and the head from "
    "the cached states. A causal LM's step includes its output layer over the vocabulary (a few "
    "hundred tokens for the tiny tokenizers). Peak RSS is dominated by the interpreter with torch "
    "and transformers (the RSS before the model); the tiny models themselves are a few MB. The "
    "machine is shared (2 cores): the last column is how many cores other processes used while a "
    "model was measured; with more than one busy, step times run up to about 40% long (compare "
    "the rows measured at about 0.5), the speedups less so."
)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _folder(family: str, task: str, root: Path) -> str:
    from lorafleet.data.datasets import synthetic_rows
    from lorafleet.data.instructions import SENTIMENT_PROMPT
    from lorafleet.ml.tiny import save_tiny_model

    if family == "minilm":
        return "minilm"
    texts = synthetic_rows(1000, seed=0)[0]
    texts += [SENTIMENT_PROMPT.format(text=t) + " positive negative" for t in texts[:50]]
    std = 0.2 if task == "causal_lm" else 0.02
    path = save_tiny_model(
        family, root / family, texts=texts, task=task, hidden=HIDDEN, layers=LAYERS, init_std=std
    )  # type: ignore[arg-type]
    return str(path)


def measure(family: str, task: str) -> dict[str, Any]:
    """One worker's figures (run in a process of its own)."""
    from lorafleet.data.datasets import encode_dataset, load_split
    from lorafleet.data.instructions import as_instructions
    from lorafleet.ml.model import AdapterRuntime
    from schemas.config import ModelConfig
    from schemas.messages import LoraSpec, TrainHyperParams, TrainTask
    from schemas.tensors import encode_tensors
    from worker.trainer import LoraTrainer

    torch.set_num_threads(1)
    rss_import = _rss_mib()
    quiet = QuietRunner(max_foreign=0.5, attempts=2, wait_budget_s=20.0, unit_wait_s=4.0)
    tmp = tempfile.TemporaryDirectory()  # kept for the process's life: peft reads the model's config
    name = _folder(family, task, Path(tmp.name))
    runtime = AdapterRuntime(ModelConfig(name=name, task=task, max_seq_len=MAX_LEN), num_labels=2)  # type: ignore[arg-type]
    rows = load_split("synthetic", None, "train").subset(range(ROWS))
    shard = encode_dataset(runtime.tokenizer, as_instructions(rows) if task == "causal_lm" else rows, MAX_LEN)
    blocks, targets = runtime.num_blocks, runtime.target_modules(None)
    specs = {
        "full": LoraSpec(target_modules=targets, layer_ranks=dict.fromkeys(range(blocks), RANK)),
        "depth1": LoraSpec(target_modules=targets, layer_ranks={blocks - 1: RANK}),
    }
    trainers = {
        False: LoraTrainer(runtime, shard, cache=False),
        True: LoraTrainer(runtime, shard, cache=True),
    }

    def task_of(spec: LoraSpec, start: dict[str, torch.Tensor], rep: int) -> TrainTask:
        hp = TrainHyperParams(batch_size=BATCH, max_steps=STEPS, lr=1e-3)
        return TrainTask(
            task_id=f"t{rep}",
            run_id="bench",
            round=rep,
            device_id="dev-0000",
            plan_version=0,
            lora=spec,
            hparams=hp,
            adapter=encode_tensors(start),
            issued_at=0.0,
            deadline_at=1.0,
        )

    starts = {k: runtime.initial_adapter(s, 0) for k, s in specs.items()}
    runtime.load(specs["depth1"], starts["depth1"])
    cache = trainers[True].cache
    assert cache is not None and runtime.split is not None
    started = time.perf_counter()
    filled = cache.ensure(runtime.split, blocks - 1, range(ROWS))
    fill_s = time.perf_counter() - started
    times: dict[str, list[float]] = {"full": [], "depth1_uncached": [], "depth1_cached": []}
    cached_ok = True
    for rep in range(REPEATS + 1):  # repeat 0 is the warm-up
        for unit, spec_name, cached in (
            ("full", "full", False),
            ("depth1_uncached", "depth1", False),
            ("depth1_cached", "depth1", True),
        ):
            spec, start = specs[spec_name], starts[spec_name]
            out = quiet.run(
                f"{unit} {rep}",
                lambda t=trainers[cached], s=spec, a=start, r=rep: t.train(task_of(s, a, r), a),
            )
            cached_ok &= out.metrics.cached == cached or unit == "full"
            if rep:
                times[unit].append(out.metrics.compute_s / out.metrics.steps)
    step = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name if family == "minilm" else f"tiny {family}",
        "family": family,
        "task": task,
        "architecture": {
            "model_type": runtime.architecture.model_type,
            "blocks": runtime.architecture.blocks_path,
            "head": list(runtime.architecture.head),
            "targets": targets,
        },
        "base_params_m": round(sum(p.numel() for p in runtime.base.parameters()) / 1e6, 2),
        "adapter_full_kb": round(sum(t.numel() * 4 for t in starts["full"].values()) / 1024, 1),
        "s_per_step_full": round(step["full"], 5),
        "s_per_step_depth1_uncached": round(step["depth1_uncached"], 5),
        "s_per_step_depth1_cached": round(step["depth1_cached"], 5),
        "cache_speedup_depth1": round(step["depth1_uncached"] / step["depth1_cached"], 2),
        "cache_used": cached_ok and filled is not None,
        "cache_fill_s": round(fill_s, 3),
        "cache_mib": round(cache.nbytes / 2**20, 2),
        "rss_import_mib": round(rss_import, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "foreign_load": quiet.summary(),
    }


def _markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Model families: step time, memory per worker, prefix-cache speedup",
        "",
        f"Command: `{doc['command']}` ({doc['date']}, torch {doc['torch']}, {doc['cpu_count']} cores, "
        f"1 torch thread per worker; load average before/after {doc['loadavg_before'][0]:.1f}/"
        f"{doc['loadavg_after'][0]:.1f}).",
        "",
        doc["setup"],
        "",
        "| model | task | blocks | head | LoRA targets | params (M) | s/step, all blocks | s/step, depth 1 "
        "| s/step, depth 1 cached | cache speedup at depth 1 | cache fill (s) | peak RSS per worker (MiB) "
        "| RSS before the model (MiB) | other processes' cores (median) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        arch = r["architecture"]
        lines.append(
            f"| {r['model']} | {r['task']} | `{arch['blocks']}` | {', '.join(arch['head']) or '(none)'} "
            f"| {', '.join(arch['targets'])} | {r['base_params_m']} | {r['s_per_step_full']:.4f} "
            f"| {r['s_per_step_depth1_uncached']:.4f} | {r['s_per_step_depth1_cached']:.4f} "
            f"| {r['cache_speedup_depth1']:.2f}x | {r['cache_fill_s']:.2f} | {r['peak_rss_mib']:.0f} "
            f"| {r['rss_import_mib']:.0f} | {r['foreign_load']['foreign_cores_median']:.2f} |"
        )
    lines += ["", doc["notes"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("FAMILY", "TASK"), help="measure one model (internal)")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run (default: all)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1])))
        return
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_families.py" + (
        f" --only {' '.join(args.only)}" if args.only else ""
    )
    load_before = os.getloadavg()
    quiet = QuietRunner(wait_budget_s=0.0)
    rows = []
    for name, family, task in MODELS:
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        out = subprocess.run(
            [sys.executable, __file__, "--one", family, task],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{name}: {row['s_per_step_full']:.4f} s/step, depth-1 cache {row['cache_speedup_depth1']:.2f}x, "
            f"peak RSS {row['peak_rss_mib']:.0f} MiB ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    doc = {
        **provenance(command, load_before, quiet),
        "setup": (
            f"Tiny models: {LAYERS} blocks, hidden {HIDDEN}, 2 heads, MLP {2 * HIDDEN}, random, saved to a "
            f"folder with a tokenizer trained on the synthetic rows. {ROWS} synthetic rows per worker, batch "
            f"{BATCH}, max_len {MAX_LEN}, LoRA r={RANK} on the family's default targets, AdamW; s/step = "
            f"compute_s/steps of {STEPS}-step LoraTrainer tasks, median of {REPEATS} after a warm-up; one "
            "process per model, 1 torch thread."
        ),
        "notes": NOTES,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "model_families.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "model_families.md").write_text(_markdown(doc), encoding="utf-8")


if __name__ == "__main__":
    main()
