#!/usr/bin/env python3
"""Summarizes bench/run.sh results as markdown: medians per system and Flotilla/etcd ratios.

Usage: bench/summarize.py bench/results/<date>/results.jsonl

Each input line is one flotilla-bench JSON result with "system" and "round" added. Rows are
grouped by benchmark and size (clients, watchers, keys); the median is over rounds (and, for
disk and memory, over the three members too). Ratios are Flotilla / etcd: above 1 is better for
throughput, below 1 is better for latencies, gaps, sizes and counts of lost events.
"""
import json
import statistics
import sys
from collections import defaultdict

# bench -> (field giving the size, [(field, label, scale)])
METRICS = {
    "put": ("clients", [("throughput", "ops/s", 1), ("p50_ms", "p50 ms", 1),
                        ("p90_ms", "p90 ms", 1), ("p99_ms", "p99 ms", 1), ("errors", "errors", 1)]),
    "range-l": ("clients", [("throughput", "ops/s", 1), ("p50_ms", "p50 ms", 1),
                            ("p99_ms", "p99 ms", 1), ("errors", "errors", 1), ("misses", "misses", 1)]),
    "range-s": ("clients", [("throughput", "ops/s", 1), ("p50_ms", "p50 ms", 1),
                            ("p99_ms", "p99 ms", 1), ("errors", "errors", 1), ("misses", "misses", 1)]),
    "watch": ("watchers", [("p50_ms", "p50 ms", 1), ("p99_ms", "p99 ms", 1), ("max_ms", "max ms", 1),
                           ("lost", "lost", 1), ("duplicates", "duplicates", 1),
                           ("out_of_order", "out of order", 1)]),
    "unavailability": (None, [("max_gap_ms", "longest write gap ms", 1)]),
    "rejoin": (None, [("rejoin_ms", "restarted member healthy after ms", 1)]),
    "fill": ("keys", [("throughput", "ops/s", 1), ("p99_ms", "p99 ms", 1), ("errors", "errors", 1)]),
    "disk": (None, [("data_dir_bytes", "data dir MB", 1e-6), ("rss_kib", "RSS MB", 1024e-6)]),
    "disk-40s": (None, [("data_dir_bytes", "data dir MB", 1e-6), ("rss_kib", "RSS MB", 1024e-6)]),
    "idle-100MB": (None, [("data_dir_bytes", "data dir MB", 1e-6), ("rss_kib", "RSS MB", 1024e-6)]),
    "live-state": (None, [("snapshot_bytes", "live keys + history as a backup, MB", 1e-6)]),
}
LABELS = {
    "range-l": "range, linearizable",
    "range-s": "range, serializable",
    "unavailability": "failover (kill -9 of the leader)",
    "rejoin": "failover: restart",
    "disk": "1M puts over 10k keys, 10 s after",
    "disk-40s": "1M puts over 10k keys, 40 s after",
    "idle-100MB": "idle, 100 MB live",
    "live-state": "1M puts over 10k keys, after",
}


def fmt(v):
    if v is None:
        return "-"
    if v == int(v) or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}"


def main(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    groups = defaultdict(list)
    for r in rows:
        size_field = METRICS.get(r["bench"], (None, []))[0]
        size = r.get(size_field, "") if size_field else ""
        groups[(r["bench"], size, r["system"])].append(r)

    print("| benchmark | n | metric | Flotilla | etcd | Flotilla/etcd | runs |")
    print("|---|---|---|---|---|---|---|")
    keys = sorted({(b, n) for (b, n, _) in groups},
                  key=lambda k: (list(METRICS).index(k[0]) if k[0] in METRICS else 99, str(k[1]).zfill(9)))
    for bench, size in keys:
        f = groups.get((bench, size, "flotilla"), [])
        e = groups.get((bench, size, "etcd"), [])
        for field, label, scale in METRICS.get(bench, (None, []))[1]:
            fm, em = median(f, field, scale), median(e, field, scale)
            ratio = f"{fm / em:.2f}" if fm is not None and em else "-"
            name = LABELS.get(bench, bench)
            print(f"| {name} | {size} | {label} | {fmt(fm)} | {fmt(em)} | {ratio} | {len(f)}/{len(e)} |")


def median(rs, field, scale):
    vals = [r[field] * scale for r in rs if isinstance(r.get(field), (int, float))]
    return statistics.median(vals) if vals else None


if __name__ == "__main__":
    main(sys.argv[1])
