#!/usr/bin/env python3
"""Medians and p90 of the controller's table reconcile phases from its JSON log.

Usage: python3 bench/tools/reconcile_phases.py target/bench-logs/propagation/controller.log [LAST_N]

The log must come from a run with the table writer at debug, e.g.
`PORTCULLIS_BENCH_CONTROLLER_LOG="info,portcullis_controller::runtime=debug" cargo xtask bench propagation`.
LAST_N (default 90) keeps the last N reconciles: the large run's 3 x 30 trials come last.
"""
import json
import re
import statistics
import sys

UNITS = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1000.0}


def ms(value):
    """A Rust `Debug` duration ("12.3ms", "Some(4.5µs)") in milliseconds, or None."""
    if value is None:
        return None
    value = value.replace("Some(", "").rstrip(")")
    m = re.match(r"([\d.]+)(ns|µs|us|ms|s)$", value)
    return float(m.group(1)) * UNITS[m.group(2)] if m else None


def main():
    phases, whole, batches = [], [], []
    for line in open(sys.argv[1], encoding="utf-8"):
        try:
            fields = json.loads(line).get("fields", {})
        except ValueError:
            continue
        message = fields.get("message", "")
        if message.startswith("table reconcile phases"):
            phases.append(fields)
        elif message == "table reconciled":
            whole.append(ms(fields.get("took")))
        elif message == "table batch":
            batches.append(ms(fields.get("waited")))
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 90
    phases, whole, batches = phases[-n:], whole[-n:], batches[-n:]
    keys = ["gather", "gather_on_cpu", "decide", "decide_on_cpu", "decide_waiting_for_cpu", "read", "publish", "access"]
    for key in keys:
        values = sorted(v for v in (ms(p.get(key)) for p in phases) if v is not None)
        if values:
            p90 = values[max(0, int(len(values) * 0.9) - 1)]
            print(f"{key:24s} n={len(values)} median {statistics.median(values):8.1f} ms  p90 {p90:8.1f} ms")
    for label, values in (("whole reconcile", whole), ("batch waited", batches)):
        values = [v for v in values if v is not None]
        if values:
            print(f"{label:24s} n={len(values)} median {statistics.median(values):8.1f} ms")


if __name__ == "__main__":
    main()
