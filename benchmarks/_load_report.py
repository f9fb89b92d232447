"""The report of ``load.py``: the table (text and Markdown) and the chart (PNG, with matplotlib when installed), from
the JSON of a run; and the names they share with it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Final

STORES: Final = ("sqlite", "redis", "postgres")
STORE_NAMES: Final = {"sqlite": "SQLite", "redis": "Redis", "postgres": "PostgreSQL"}
VARIANTS: Final = ("bare", "idempo", "floor")
CASES: Final = ("fresh-key", "replay")
TARGET: Final = 1.15  # the floor's req/s over idempo's, at most (issue 17)
COLORS: Final = {"bare": "#9e9e9e", "idempo": "#ef6c00", "floor": "#1e88e5"}


def report(data: dict[str, Any]) -> str:
    settings, env = data["settings"], data["environment"]
    lines = [
        f"uvicorn {env['uvicorn']} ({env['loop']}, {env['http']}) under {env['generator']}: "
        f"{settings['connections']} connections, {settings['rounds']} rounds of {settings['duration']} s per "
        f"variant and case, medians; {env['cpus']} CPUs shared by everything",
        f"{'store':<10} {'w':>1} {'case':<9} {'bare':>7} {'idempo':>7} {'floor':>7} {'i/bare':>6} {'f/bare':>6} "
        f"{'floor/idempo':>12} {'(rounds)':>11} {'':<4}  {'p50 ms b/i/f':>17}  {'p99 ms b/i/f':>17}  spread b/i/f",
    ]
    for row in data["results"]:
        bare, idempo, floor = (row[variant] for variant in VARIANTS)
        low, high = row["floor_over_idempo_rounds"] or [0, 0]
        lines.append(
            f"{STORE_NAMES[row['store']]:<10} {row['workers']:>1} {row['case']:<9} {bare['rps']:>7.0f} "
            f"{idempo['rps']:>7.0f} {floor['rps']:>7.0f} "
            f"{row['idempo_over_bare']:>6.2f} {row['floor_over_bare']:>6.2f} "
            f"{row['floor_over_idempo']:>11.2f}x {f'{low:.2f}-{high:.2f}':>11} {row['verdict']:<4}  "
            + "  ".join("/".join(f"{row[v][k]:.1f}" for v in VARIANTS).rjust(17) for k in ("p50_ms", "p99_ms"))
            + "  "
            + "/".join(f"{row[v]['spread'] * 100:.0f}%" for v in VARIANTS)
        )
    lines.append(
        f"req/s: medians over the rounds; floor/idempo: the floor's req/s over idempo's, the median of the rounds' "
        f"ratios (target <= {TARGET}), (rounds) their range; spread: (max - min) / median of each variant's rounds"
    )
    source = env.get("idempo", {})
    if "commit" in source:
        dirty = " with uncommitted changes" if source["uncommitted_changes"] else ""
        lines.append(f"idempo: {source['path']} at {source['commit']}{dirty}")
    lines.append(f"load average before {data['load_average']['before']}, after {data['load_average']['after']}")
    lines.extend(f"skipped {store}: {why}" for store, why in data["skipped"].items())
    for store, notes in data["stores"].items():
        lines.extend(f"{store}: {note}" for note in notes["cleanup"])
    lines.extend(f"FAILED: {failure}" for failure in data["failures"])
    return "\n".join(lines)


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "| store | workers | case | bare req/s | idempo req/s | floor req/s | idempo/bare | floor/bare "
        "| floor/idempo | p50 ms (bare / idempo / floor) | p99 ms (bare / idempo / floor) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in data["results"]:
        bare, idempo, floor = (row[variant] for variant in VARIANTS)
        ratio = f"{row['floor_over_idempo']:.2f}\N{MULTIPLICATION SIGN} {row['verdict']}"
        lines.append(
            f"| {STORE_NAMES[row['store']]} | {row['workers']} | {row['case']} | {bare['rps']:.0f} | "
            f"{idempo['rps']:.0f} | {floor['rps']:.0f} | {row['idempo_over_bare']:.2f} | {row['floor_over_bare']:.2f} "
            f"| {ratio} | "
            + " | ".join(" / ".join(f"{row[v][k]:.1f}" for v in VARIANTS) for k in ("p50_ms", "p99_ms"))
            + " |"
        )
    return "\n".join(lines)


def chart(data: dict[str, Any], path: Path) -> bool:
    """Requests/s per store, case and workers, bare, idempo and floor side by side; False without matplotlib."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("no chart: it needs matplotlib (pip install 'matplotlib>=3.8')", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stores = [store for store in STORES if any(row["store"] == store for row in data["results"])]
    if not stores:
        return False
    figure, axes = plt.subplots(
        len(CASES), len(stores), figsize=(3.6 * len(stores) + 0.6, 7.2), squeeze=False, constrained_layout=True
    )
    width = 0.27
    for column, store in enumerate(stores):
        for line, case in enumerate(CASES):
            axis = axes[line][column]
            rows = [row for row in data["results"] if row["store"] == store and row["case"] == case]
            for offset, variant in enumerate(VARIANTS):
                xs = [index + (offset - 1) * width for index in range(len(rows))]
                medians = [row[variant]["rps"] for row in rows]
                lows = [m - min(r["rps"] for r in row[variant]["rounds"]) for m, row in zip(medians, rows, strict=True)]
                highs = [
                    max(r["rps"] for r in row[variant]["rounds"]) - m for m, row in zip(medians, rows, strict=True)
                ]
                axis.bar(
                    xs, medians, width, yerr=[lows, highs], capsize=2, color=COLORS[variant], label=variant,
                    error_kw={"elinewidth": 0.8, "ecolor": "#424242"},
                )  # fmt: skip
            for index, row in enumerate(rows):
                top = max(max(r["rps"] for r in row[v]["rounds"]) for v in VARIANTS)
                axis.annotate(
                    f"floor/idempo\n{row['floor_over_idempo']:.2f}\N{MULTIPLICATION SIGN}",
                    (index, top),
                    xytext=(0, 4),
                    textcoords="offset points",
                    ha="center",
                    fontsize=8,
                    color="#2e7d32" if row["verdict"] == "PASS" else "#c62828",
                )
            axis.set_xticks(range(len(rows)), [f"{row['workers']} worker{'s' * (row['workers'] > 1)}" for row in rows])
            axis.set_title(f"{STORE_NAMES[store]}: {'new key' if case == 'fresh-key' else 'replay'}", fontsize=10)
            axis.margins(y=0.25)
            axis.tick_params(labelsize=8)
            if column == 0:
                axis.set_ylabel("requests/s", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=len(VARIANTS), fontsize=9, frameon=False)
    settings, env = data["settings"], data["environment"]
    figure.suptitle(
        f"uvicorn under {env['generator'].split(' ')[0]}, {settings['connections']} connections, {env['cpus']} CPUs "
        f"shared with it and the store's server\nrequests/s: median of {settings['rounds']} rounds "
        "(error bars: min-max)",
        fontsize=10,
    )
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
