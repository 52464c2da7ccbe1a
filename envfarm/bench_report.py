"""The output of `envfarm bench`: its results as a table, as bench.csv and bench.json, and as a plot.

envfarm/bench_run.py runs the bench, then hands its report (see `run_bench`) here.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from envfarm.bench_config import BACKENDS, INSTALL_HINT


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as a fixed-width table, one block per loop, env and num_envs."""
    columns = (  # (header, key, format)
        ("loop", "loop", "{}"),
        ("env", "env_id", "{}"),
        ("n", "num_envs", "{}"),
        ("backend", "backend", "{}"),
        ("steps/s", "steps_per_s", "{:,.0f}"),
        ("x sync", "vs_sync", "{:.2f}"),
        ("x async", "vs_async", "{:.2f}"),
        ("x ideal", "vs_ideal", "{:.2f}"),
        ("CPU us/step", "cpu_us_per_step", "{:,.1f}"),
        ("p50 us", "p50_us", "{:,.0f}"),
        ("p90 us", "p90_us", "{:,.0f}"),
        ("p99 us", "p99_us", "{:,.0f}"),
        ("startup s", "startup_s", "{:.3f}"),
        ("workers MiB", "worker_mib", "{:,.0f}"),
        ("trainer MiB", "trainer_mib", "{:,.0f}"),
    )
    table = [tuple(header for header, _, _ in columns)]
    for row in rows:
        table.append(tuple("-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in columns))
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = []
    for i, line in enumerate(table):
        if i > 1 and line[:3] != table[i - 1][:3]:
            lines.append("")
        lines.append(
            "  ".join(
                cell.ljust(w) if j < 4 else cell.rjust(w) for j, (cell, w) in enumerate(zip(line, widths))
            ).rstrip()
        )
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], out_dir: Path, log: TextIO = sys.stderr) -> None:
    """Writes bench.csv (the results rows), bench.json (the whole report) and bench.png (if matplotlib is there)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = report["results"]
    with open(out_dir / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["env_id", "num_envs", "backend"])
        writer.writeheader()
        writer.writerows(rows)
    with open(out_dir / "bench.json", "w") as f:
        json.dump(report, f, indent=1)
    written = ["bench.csv", "bench.json"]
    try:
        plot(rows, out_dir / "bench.png", report["meta"]["commit"])
        written.append("bench.png")
    except ImportError:
        print(f"envfarm bench: skipping the plot: matplotlib is not installed ({INSTALL_HINT})", file=log)
    print(f"envfarm bench: wrote {', '.join(str(out_dir / name) for name in written)}", file=log)


def plot(rows: list[dict[str, Any]], path: Path, commit: str) -> None:
    """Steps/s against num_envs, one panel per loop and env, one line per backend (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["loop"], r["env_id"]) for r in rows)) or [("random", "(no results)")]
    cols = min(2, len(panels))
    lines = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(6 * cols, 4 * lines), squeeze=False)
    for ax, (loop, env_id) in zip(axes.flat, panels):
        for backend in BACKENDS:
            points = sorted(
                (r["num_envs"], r["steps_per_s"])
                for r in rows
                if (r["loop"], r["env_id"], r["backend"]) == (loop, env_id, backend)
            )
            if points:
                # A fixed colour per backend, the same in every panel whatever is missing from it.
                ax.plot(*zip(*points), marker="o", label=backend, color=f"C{BACKENDS.index(backend)}")
        ax.set(
            title=env_id if loop == "random" else f"{env_id}, {loop} loop",
            xlabel="num_envs",
            ylabel="steps/s (median)",
            yscale="log",
        )
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"envfarm bench ({commit})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
