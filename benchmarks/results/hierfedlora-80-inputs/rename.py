"""Copies of the processes' result files with rows renamed to what they ran under today's defaults."""
import json, sys
from pathlib import Path
RENAMES = {
    # the committed 80-device row and process B's ran before aggregation_coverage was auto: contributor-only
    "runs/merge-in/committed-orig.json": {"hierfedlora": "hierfedlora_contributor_only"},
    "runs/out-b/hierfedlora-80.json": {"hierfedlora": "hierfedlora_contributor_only"},
    # process A asked for coverage 1 explicitly: today's default hierfedlora row
    "runs/out-a/hierfedlora-80.json": {"hierfedlora_coverage": "hierfedlora"},
}
out = []
for i, name in enumerate(sys.argv[1:]):
    d = json.loads(Path(name).read_text())
    ren = RENAMES.get(name, {})
    for e in d["runs"]:
        e["strategies"] = {ren.get(k, k): v for k, v in e["strategies"].items()}
    p = Path("runs/merge-in") / f"{i}-{Path(name).parent.name}.json"
    p.write_text(json.dumps(d))
    out.append(str(p))
print(" ".join(out))
