"""``python -m loadtest``: load runs from ghz JSON configurations, reported in ghz's JSON format.

    python -m loadtest run loadtest/ghz/through-mlmirror.json [--out report.json] [--pid PID] [--no-ghz]
    python -m loadtest compare report1.json report2.json ...     # a markdown table, side by side
    python -m loadtest request --out loadtest/ghz/modelinfer.bin  # the serialized ModelInfer request they send

``run`` uses ghz when it is on PATH, else the built-in asyncio generator (same configuration, same report);
``--pid`` adds the CPU time per call of that process (the system under test) to the report as
``cpuPerCallMicros``. The benchmarks proper (bench_proxy, bench_shadows) use h2load for throughput.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .ghz import compare, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="run a ghz JSON configuration")
    one.add_argument("config", type=Path)
    one.add_argument("--out", type=Path, help="write the report here (default: stdout)")
    one.add_argument("--pid", type=int, help="process under test: its CPU time per call goes in the report")
    one.add_argument("--no-ghz", action="store_true", help="use the built-in generator even when ghz is installed")
    one.add_argument("--quiet", action="store_true", help="no progress bar")
    table = sub.add_parser("compare", help="markdown table of ghz-format reports")
    table.add_argument("reports", type=Path, nargs="+")
    request = sub.add_parser("request", help="write the serialized ModelInfer request the configurations send")
    request.add_argument("--out", type=Path, required=True)
    request.add_argument("--rows", type=int, default=1)
    args = parser.parse_args(argv)

    if args.command == "run":
        from .h2load import ProcessCPU

        cpu = ProcessCPU(args.pid, tree=True) if args.pid else None
        before = cpu.seconds() if cpu else 0.0
        try:
            result = run(args.config, progress=not args.quiet, use_ghz=not args.no_ghz)
        except (ValueError, RuntimeError) as exc:
            print(f"loadtest: {exc}", file=sys.stderr)
            return 1
        if cpu is not None and result["count"]:
            result["cpuPerCallMicros"] = (cpu.seconds() - before) / result["count"] * 1e6
        text = json.dumps(result, indent=2)
        if args.out:
            args.out.write_text(text + "\n")
        else:
            print(text)
        return 0 if set(result["statusCodeDistribution"]) <= {"OK"} else 1
    if args.command == "compare":
        print(compare([json.loads(path.read_text()) for path in args.reports]))
        return 0
    import numpy as np
    from mlmirror.demo.models import sample_features
    from mlmirror.demo.traffic import infer_request

    args.out.write_bytes(infer_request(sample_features(np.random.default_rng(0), args.rows), request_id="ghz-load"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
