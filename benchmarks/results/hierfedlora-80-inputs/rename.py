"""Copies of the processes' result files with rows renamed to what they ran under today's defaults.

python benchmarks/results/hierfedlora-80-inputs/rename.py FILE... (prints the copies' paths)
"""

import json
import sys
from pathlib import Path

RENAMES = {
    # the stop-27 row and process B's ran before aggregation_coverage was auto: contributor-only
    "runs/merge-in/committed-orig.json": {"hierfedlora": "hierfedlora_contributor_only"},
    "runs/out-b/hierfedlora-80.json": {"hierfedlora": "hierfedlora_contributor_only"},
    # process A asked for coverage 1 explicitly: today's default hierfedlora row
    "runs/out-a/hierfedlora-80.json": {"hierfedlora_coverage": "hierfedlora"},
}
out = []
for i, name in enumerate(sys.argv[1:]):
    result = json.loads(Path(name).read_text())
    renames = RENAMES.get(name, {})
    for entry in result["runs"]:
        entry["strategies"] = {renames.get(k, k): v for k, v in entry["strategies"].items()}
    copy = Path("runs/merge-in") / f"{i}-{Path(name).parent.name}.json"
    copy.write_text(json.dumps(result))
    out.append(str(copy))
print(" ".join(out))
