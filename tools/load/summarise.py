#!/usr/bin/env python3
"""Turns a loadgen report and an RSS trace into the BENCHMARKS.md row and checks the targets.

    summarise.py overload|soak REPORT.json RSS.tsv CAPACITY RATE RSS_START_KIB
"""
import json
import sys

# The server's defaults (src/config.rs): queue size and batch size per variant.
MAX_QUEUE_SIZE = 1024
MAX_BATCH_SIZE = 32


def main():
    mode, report_path, rss_path, capacity, rate, rss_start = sys.argv[1:]
    r = json.load(open(report_path))
    capacity, rate, rss_start = float(capacity), float(rate), int(rss_start)
    rss = [int(line.split("\t")[1]) for line in open(rss_path) if line.strip().split("\t")[-1]]
    errors = r["errors_by_code"]
    checks = []
    if mode == "overload":
        # The longest an accepted request can wait: a full queue drained at capacity, plus one batch.
        bound_ms = (MAX_QUEUE_SIZE / capacity + MAX_BATCH_SIZE / capacity) * 1e3
        allowed = {"ResourceExhausted", "DeadlineExceeded"}
        checks = [
            ("every request answered OK or refused", set(errors) <= allowed),
            (f"p99 of accepted {r['ok_p99_ms']:.0f} ms below {bound_ms:.0f} ms",
             r["ok_p99_ms"] < bound_ms),
            (f"peak RSS {max(rss) / 1024:.0f} MiB bounded (start {rss_start / 1024:.0f} MiB)",
             max(rss) < rss_start + 1024 * 1024),
        ]
        print("| capacity req/s | offered req/s | answered req/s | OK req/s | refused | p50 ms | "
              "p99 OK ms | p99 bound ms | RSS start / peak MiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {capacity:.0f} | {rate:.0f} | {r['rps']:.0f} | {r['ok_rps']:.0f} | "
              f"{r['errors']} ({', '.join(f'{k} {v}' for k, v in errors.items()) or 'none'}) | "
              f"{r['p50_ms']:.1f} | {r['ok_p99_ms']:.0f} | {bound_ms:.0f} | "
              f"{rss_start / 1024:.0f} / {max(rss) / 1024:.0f} |")
    else:
        windows = r["windows"]
        warm = rss[min(60, len(rss) - 1)]  # one minute in
        growth = (rss[-1] - warm) / warm
        first, last = windows[0]["p99_ms"], windows[-1]["p99_ms"]
        checks = [
            ("zero errors", r["errors"] == 0),
            (f"RSS growth after warm-up {growth:+.1%} under 5%", growth < 0.05),
            (f"p99 first vs last minute {first:.1f} vs {last:.1f} ms within 20%",
             abs(last - first) <= 0.2 * first),
        ]
        print("| capacity req/s | offered req/s | requests | errors | p50 ms | p99 ms | "
              "p99 first / last min ms | RSS 1 min / end MiB | growth |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {capacity:.0f} | {rate:.0f} | {r['requests']} | {r['errors']} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {first:.1f} / {last:.1f} | "
              f"{warm / 1024:.0f} / {rss[-1] / 1024:.0f} | {growth:+.1%} |")
        print("\nper minute:", ", ".join(f"{w['p99_ms']:.1f}" for w in windows), "(p99 ms)")
    for what, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
    sys.exit(0 if all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
