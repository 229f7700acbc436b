"""The flat unclipped rows of hierfedlora-80 (stop 29), as one benchmark JSON to ``--merge``.

The two runs were made by processes whose base configuration had no clipping (their FedLoRA, unclipped,
ended at 0.1250); the table measures every row against the clipped FedLoRA (target 0.10, budget
70.5 virtual s, the same budget: the virtual clock does not depend on clipping). Each run's
configuration is that of the row ``legend_unclipped`` / ``legend_coverage_unclipped`` (``VARIANTS``)
but for its ``run_id``, which no result depends on, so this recomputes each row from the run's
``report.json`` against the committed 20 Newsgroups alpha 0.1 entry, as ``--rebuild`` would.

PYTHONPATH=. python benchmarks/results/hierfedlora-80-inputs/unclipped_rows.py OUT.json
"""

import json
import sys
from pathlib import Path

from benchmarks.hierfedlora import row_of

RUNS = {  # row -> (the process's results file, its run directory)
    "legend_unclipped": (
        "runs/out-u-a/hierfedlora-80-unclipped.json",
        "runs/bench-u-a/20newsgroups-a0.1/legend",
    ),
    "legend_coverage_unclipped": (
        "runs/out-u-c/hierfedlora-80-unclipped.json",
        "runs/bench-u-c/20newsgroups-a0.1/legend_coverage",
    ),
}
committed = json.loads(Path("benchmarks/results/hierfedlora-80.json").read_text())
entry = next(e for e in committed["runs"] if e["dataset"] == "20newsgroups" and float(e["alpha"]) == 0.1)
rows, ran_as = {}, []
for name, (results, run_dir) in RUNS.items():
    process = json.loads(Path(results).read_text())
    report = json.loads((Path(run_dir) / "legend" / "report.json").read_text())
    budget = report["config"]["rounds"]["virtual_budget_s"]
    assert abs(budget - entry["budget_virtual_s"]) < 1e-3, (name, budget)
    as_run = process["runs"][0]["strategies"][name.removesuffix("_unclipped")]  # its name there
    rows[name] = row_of(report, entry) | {"wall_s": as_run["wall_s"]}
    ran_as.append(process["command"])
out = committed | {
    "ran_as": ran_as,
    "wall_s": sum(r["wall_s"] for r in rows.values()),
    "runs": [{k: v for k, v in entry.items() if k != "references"} | {"strategies": rows}],
}
Path(sys.argv[1]).write_text(json.dumps(out))
