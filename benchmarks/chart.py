"""Draw the README's benchmark chart (an SVG) from the JSON of one ``benchmarks/bench.py --json`` run.

    python benchmarks/bench.py --json bench.json
    python benchmarks/chart.py bench.json docs/benchmarks.svg

For each store, one bar per case: microseconds per request, the median of the run's repetitions, beside the bare
app's. Standard library only: the SVG is written by hand, so that drawing it needs nothing more than the benchmark.
"""

from __future__ import annotations

import argparse
import json
from html import escape
from pathlib import Path
from typing import Any

STORES = {"memory": "memory", "sqlite": "SQLite", "redis": "Redis", "postgres": "PostgreSQL"}
CASES = {
    "bare": ("the app alone", "#9e9e9e"),
    "no-key": ("no key", "#80cbc4"),
    "fresh-key": ("new key (runs)", "#ef6c00"),
    "replay": ("retry (replayed)", "#1e88e5"),
    "replay-cached": ("retry, cache_size on", "#90caf9"),
}

WIDTH = 760
LABEL_X = 150  # where the bars start
BAR = 15
GAP = 3
GROUP_GAP = 16
TOP = 70


def bars(results: list[dict[str, Any]]) -> list[tuple[str, list[tuple[str, float]]]]:
    """Per store (in STORES order), its (case, µs per request) pairs, the bare app first."""
    groups = []
    for store, title in STORES.items():
        rows = {r["case"]: r for r in results if r["store"] == store}
        if not rows:
            continue
        bare = sorted(r["bare_us_per_request"] for r in rows.values())[len(rows) // 2]
        values = [("bare", float(bare))]
        values += [(case, float(rows[case]["us_per_request"])) for case in CASES if case in rows]
        groups.append((title, values))
    return groups


def svg(data: dict[str, Any]) -> str:
    groups = bars(data["results"])
    most = max(value for _, values in groups for _, value in values)
    scale = (WIDTH - LABEL_X - 70) / most
    height = TOP + sum((len(values) + 1) * (BAR + GAP) + GROUP_GAP for _, values in groups) + 10
    environment = data["environment"]
    subtitles = (
        f"µs per request (median of {data['settings']['reps']} repetitions): a trivial FastAPI endpoint called "
        "in-process, bare and behind idempo;",
        f"Python {environment['python']}, {environment['cpus']} CPUs; Redis and PostgreSQL are local servers over "
        "loopback.",
    )
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>',
        '<text x="10" y="22" font-size="15" font-weight="bold">idempo: the time of one request, by store</text>',
        f'<text x="10" y="40" fill="#555555">{escape(subtitles[0])}</text>',
        f'<text x="10" y="55" fill="#555555">{escape(subtitles[1])}</text>',
    ]
    y = TOP
    for title, values in groups:
        out.append(f'<text x="10" y="{y + BAR - 3}" font-weight="bold">{escape(title)}</text>')
        y += BAR + GAP
        for case, value in values:
            label, colour = CASES[case]
            length = max(1.0, value * scale)
            out.append(f'<text x="{LABEL_X - 6}" y="{y + BAR - 3}" text-anchor="end">{escape(label)}</text>')
            out.append(f'<rect x="{LABEL_X}" y="{y}" width="{length:.1f}" height="{BAR}" fill="{colour}"/>')
            out.append(f'<text x="{LABEL_X + length + 5:.1f}" y="{y + BAR - 3}">{value:.0f} µs</text>')
            y += BAR + GAP
        y += GROUP_GAP
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("results", type=Path, help="the JSON written by bench.py --json")
    parser.add_argument("chart", type=Path, help="the SVG to write")
    args = parser.parse_args(argv)
    args.chart.write_text(svg(json.loads(args.results.read_text())))


if __name__ == "__main__":
    main()
