"""Every traffic shape of the ingest goal, in one go: is each at 0.8 of the baseline or above?

Issue "Hold under faults and load" §4 asks every shape to reach 0.8 of a trivial
signal-counting workflow, measured in the same run. One `bench/ingest.py` run measures one
shape, and on a shared 2-core machine one run moves by up to ±0.1 from the next. This script runs
the three shapes one after another, `--repeat` times (alternating, so a slow quarter hour
hits every shape alike), each in its own process with its own dev server, and prints each
run's ratio, CPU ratio and history events per event, then each shape's median and lowest.
Figures only: nothing here passes or fails.

    .venv/bin/python bench/shapes.py [--rounds 2] [--repeat 1] [--in-memory]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.8
HISTORY_LIMIT = 4.0  # history events per event, at most

# name -> bench/ingest.py arguments: the shapes the issue names.
SHAPES = {
    "50 x 40 (bursts)": ["--leads", "50", "--events", "40"],
    "500 x 4 (new leads)": ["--leads", "500", "--events", "4"],
    "sparse 300 x 2, cache 40": ["--shape", "sparse", "--leads", "300", "--events", "2", "--cache", "40"],
}


def run_shape(args: list[str], rounds: int, extra: list[str]) -> dict:
    """One bench/ingest.py run; its JSON summary line."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "ingest.py"), *args, "--rounds", str(rounds), *extra],
                          capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench/ingest.py {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def verdict(runs: dict[str, list[dict]]) -> list[tuple[str, float, float, float, float, bool]]:
    """Per shape: (name, median ratio, lowest ratio, median CPU ratio, highest history events
    per event, whether the median ratio meets the target with history events within the limit)."""
    rows = []
    for name, found in runs.items():
        ratios = [r["ratio"] for r in found]
        median = statistics.median(ratios)
        history = max(r["lead_hist_per_event"] for r in found)
        rows.append((name, median, min(ratios), statistics.median(r["cpu_ratio"] for r in found), history,
                     median >= TARGET and history <= HISTORY_LIMIT))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per bench/ingest.py run (default 2)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each shape, alternating (default 1)")
    parser.add_argument("--in-memory", action="store_true", help="dev server keeps state in memory")
    args = parser.parse_args(argv)
    extra = ["--in-memory"] if args.in_memory else []
    runs: dict[str, list[dict]] = {name: [] for name in SHAPES}
    for repeat in range(args.repeat):
        for name, shape in SHAPES.items():
            found = run_shape(shape, args.rounds, extra)
            runs[name].append(found)
            print(f"run {repeat + 1}, {name}: ratio {found['ratio']:.2f} (CPU {found['cpu_ratio']:.2f}), "
                  f"baseline {found['baseline_eps']:.0f} / lead {found['lead_eps']:.0f} events/s, "
                  f"history events per event {found['lead_hist_per_event']:.2f} (baseline "
                  f"{found['baseline_hist_per_event']:.2f})", flush=True)
            print("  " + json.dumps(found, separators=(",", ":")), flush=True)
    print(f"\n{'shape':<26} {'median':>7} {'lowest':>7} {'CPU':>6} {'hist/ev':>8}  target (median >= {TARGET}, "
          f"hist/ev <= {HISTORY_LIMIT:g})")
    for name, median, lowest, cpu, history, met in verdict(runs):
        print(f"{name:<26} {median:>7.2f} {lowest:>7.2f} {cpu:>6.2f} {history:>8.2f}  {'met' if met else 'NOT met'}")
    print(json.dumps({name: [r["ratio"] for r in found] for name, found in runs.items()}, separators=(",", ":")))


if __name__ == "__main__":
    main()
