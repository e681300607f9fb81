"""``python -m loadtest.chaos [--calls N] [--rate R] [--only NAME ...]``: run the chaos scenarios and print a
markdown table of what clients saw and what the proxy counted."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys

from mlmirror.eventloop import loop_factory

from .scenarios import SCENARIOS, Result, accounted, p99s

__all__ = ["main", "table"]


def _fmt(counts: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(counts.items())) or "0"


def table(results: list[Result]) -> list[str]:
    """The markdown table: one row per scenario."""
    lines = [
        "| scenario | calls | client errors | p99 baseline (ms) | p99 during fault (ms) | max during fault (ms) "
        "| copies sampled / accounted | drops by reason | explanation |",
        "|---|---:|---|---:|---:|---:|---|---|---|",
    ]
    for r in results:
        base, fault = p99s(r)
        worst = max((o.latency for o in r.fault), default=0.0) * 1e3
        books = "; ".join(f"{s} {sent:.0f} / {total:.0f}" for s, (sent, total) in accounted(r).items()) or "—"
        lines.append(
            f"| {r.scenario} | {r.calls} | {_fmt(dict(r.errors))} | {base:.1f} | {fault:.1f} | {worst:.0f} "
            f"| {books} | {_fmt(r.drops())} | {r.explanation} |"
        )
    return lines


async def _run(names: list[str], calls: int, rate: float) -> list[Result]:
    results = []
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        results.append(await SCENARIOS[name](calls, rate))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per scenario, half before the fault")
    parser.add_argument("--rate", type=float, default=300.0, help="offered load, calls/s (open loop)")
    parser.add_argument("--only", action="append", choices=list(SCENARIOS), help="run only this scenario")
    args = parser.parse_args(argv)
    names = args.only or list(SCENARIOS)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        results = runner.run(_run(names, args.calls, args.rate))
    given = sys.argv[1:] if argv is None else argv
    print(f"Command: `{shlex.join(['python', '-m', 'loadtest.chaos', *given])}` ({os.cpu_count()} cores)\n")
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
