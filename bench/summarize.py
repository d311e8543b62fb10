#!/usr/bin/env python3
"""Summarizes bench/run.sh results: medians per system and Flotilla/etcd ratios (markdown)."""
import json
import statistics
import sys
from collections import defaultdict

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
groups = defaultdict(list)
for r in rows:
    b = r["bench"]
    key = (b, r.get("clients") or r.get("watchers") or r.get("member") or r.get("keys") or "")
    groups[(key, r["system"])].append(r)

def med(rs, field):
    vals = [r[field] for r in rs if field in r]
    return statistics.median(vals) if vals else None

metrics = {
    "put": [("throughput", "ops/s", True), ("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False)],
    "range-l": [("throughput", "ops/s", True), ("p99_ms", "p99 ms", False)],
    "range-s": [("throughput", "ops/s", True), ("p99_ms", "p99 ms", False)],
    "watch": [("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False), ("lost", "lost", False)],
    "unavailability": [("max_gap_ms", "write gap ms", False)],
    "fill": [("throughput", "ops/s", True)],
    "disk": [("data_dir_bytes", "data dir bytes", False), ("rss_kib", "RSS KiB", False)],
    "idle-100MB": [("data_dir_bytes", "data dir bytes", False), ("rss_kib", "RSS KiB", False)],
}
print("| benchmark | n | metric | Flotilla (median) | etcd (median) | Flotilla/etcd | runs |")
print("|---|---|---|---|---|---|---|")
keys = sorted({k for (k, _) in groups}, key=lambda k: (list(metrics).index(k[0]) if k[0] in metrics else 99, str(k[1])))
for key in keys:
    f = groups.get((key, "flotilla"), [])
    e = groups.get((key, "etcd"), [])
    for field, label, _ in metrics.get(key[0], []):
        fm, em = med(f, field), med(e, field)
        ratio = f"{fm / em:.2f}" if fm is not None and em not in (None, 0) else "-"
        fmt = lambda v: "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.2f}")
        print(f"| {key[0]} | {key[1]} | {label} | {fmt(fm)} | {fmt(em)} | {ratio} | {len(f)}/{len(e)} |")
