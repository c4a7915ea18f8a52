"""Mean ± sample std of the last evaluation of study runs: python summarize.py RUNS_DIR"""
import json, os, re, statistics, sys
from collections import defaultdict
runs = sys.argv[1]
groups = defaultdict(list)
for name in sorted(os.listdir(runs)):
    m = re.match(r"(.+)_e(\d+)_s(\d+)$", name)
    if not m or not os.path.exists(os.path.join(runs, name, "metrics.jsonl")):
        continue
    evals = [json.loads(l) for l in open(os.path.join(runs, name, "metrics.jsonl")) if '"eval"' in l]
    evals = [e for e in evals if e.get("type") == "eval"]
    if not evals: continue
    last = max(evals, key=lambda e: e["iter"])
    groups[(m.group(1), int(m.group(2)))].append((int(m.group(3)), last))
print("| run | epochs | AP mean ± std | AP50 | AP per seed | lift | distinctness |")
print("| --- | ---: | --- | --- | --- | --- | --- |")
for (method, e), rows in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    rows.sort()
    def ms(key):
        v = [r[key] for _, r in rows if key in r]
        if not v: return ""
        return f"{statistics.fmean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"
    per = ", ".join(f"s{s}: {r['AP']:.2f}" for s, r in rows)
    print(f"| {method} | {e} | {ms('AP')} | {ms('AP50')} | {per} | {ms('lift')} | {ms('distinctness')} |")
