"""Benchmark: the drift kernels against numpy and a scipy loop, on one core.

    python -m loadtest.bench_kernels [--rows 100000] [--features 20] [--bins 20] [--repeat 5]

1. Histogram update throughput (values/s, one thread): ``update_uniform`` and ``update_sorted_edges`` (quantile
   edges) against ``np.histogram`` and ``np.searchsorted`` + ``np.bincount``, column by column.
2. Drift of a ``rows``-row current sample against a ``rows``-row reference, ``features`` features: PSI, JS distance,
   KS and W1 per feature.
   - *scipy loop*: per feature, quantile edges of the reference, ``np.histogram`` of both, PSI (numpy, same
     clipping), ``scipy.spatial.distance.jensenshannon``, ``scipy.stats.ks_2samp`` and
     ``scipy.stats.wasserstein_distance`` on the raw values — what one writes without a drift library;
   - *mlmirror, per window*: the reference's edges and counts come from its profile (built once); a window costs
     histogramming the current rows and the four metrics from counts;
   - *mlmirror, from scratch*: quantile edges and both histograms included.
   PSI and JS must equal the scipy loop's (same bins); KS and W1 are computed on bins, so they differ from the raw-
   sample statistics by the binning error, which the table reports (and they equal scipy's own functions applied to
   the binned distributions).
Timings are the best of ``--repeat`` runs after a warm-up (JIT compilation excluded; it is paid at start-up).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable

import numpy as np
from mlmirror import kernels
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp, wasserstein_distance

__all__ = ["main"]


def _best(function: Callable[[], object], repeat: int) -> float:
    function()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def _psi_numpy(reference: np.ndarray, current: np.ndarray, eps: float = kernels.divergence.DEFAULT_EPSILON) -> float:
    p = np.maximum(reference / reference.sum(), eps)
    q = np.maximum(current / current.sum(), eps)
    return float(np.sum((q - p) * np.log(q / p)))


def _scipy_loop(reference: np.ndarray, current: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    out: dict[str, list[float]] = {"psi": [], "js": [], "ks": [], "w1": []}
    for f in range(reference.shape[1]):
        r, c = reference[:, f], current[:, f]
        edges = kernels.quantile_edges(r[:, None], bins)[0]
        rc = _with_outer_slots(r, edges)
        cc = _with_outer_slots(c, edges)
        out["psi"].append(_psi_numpy(rc, cc))
        out["js"].append(float(jensenshannon(rc / rc.sum(), cc / cc.sum(), base=2)))
        out["ks"].append(float(ks_2samp(r, c).statistic))
        out["w1"].append(float(wasserstein_distance(r, c)))
    return {k: np.array(v) for k, v in out.items()}


def _with_outer_slots(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """np.histogram's counts with an underflow and an overflow slot around them (mlmirror's layout, NaN apart)."""
    inside, _ = np.histogram(values, bins=edges)
    return np.concatenate([[np.sum(values < edges[0])], inside, [np.sum(values > edges[-1])]]).astype(np.float64)


class _Mlmirror:
    """The kernels' way: the reference profile (edges, guide, counts) is built once; each window histograms its
    rows and computes the metrics from counts."""

    def __init__(self, reference: np.ndarray, bins: int) -> None:
        self.bins = bins
        self.edges = kernels.quantile_edges(reference, bins)
        self.guide = kernels.edge_guide(self.edges)
        self.positions = kernels.slot_positions(self.edges)
        counts = kernels.new_counts(reference.shape[1], bins)
        kernels.update_sorted_edges(counts, reference, self.edges, self.guide)
        self.reference = counts[:, :-1].astype(np.float64)

    def window(self, current: np.ndarray) -> dict[str, np.ndarray]:
        counts = kernels.new_counts(current.shape[1], self.bins)
        kernels.update_sorted_edges(counts, current, self.edges, self.guide)
        cur = counts[:, :-1].astype(np.float64)
        statistic, _ = kernels.ks(self.reference, cur)
        return {
            "psi": kernels.psi(self.reference, cur),
            "js": kernels.js(self.reference, cur),
            "ks": statistic,
            "w1": kernels.wasserstein(self.reference, cur, self.positions),
        }


def run(args: argparse.Namespace, command: str) -> str:
    rng = np.random.default_rng(0)
    rows, features, bins = args.rows, args.features, args.bins
    reference = rng.normal(size=(rows, features))
    shift = np.zeros(features)
    shift[0] = 0.25  # one drifting feature, so that the metrics are not all zero
    current = rng.normal(size=(rows, features)) + shift
    kernels.warm_up()
    lines = [f"Command: `{command}`", ""]
    lines.append(
        f"{rows} rows x {features} features of float64 (normal; current's first feature shifted by 0.25 sd), "
        f"{bins} bins; best of {args.repeat} runs after a warm-up; one thread. Machine: {_cpu_name()}."
    )
    lines += ["", "| histogram update | values/s | vs np.histogram |", "|---|---:|---:|"]
    values = current.size
    quantile = kernels.quantile_edges(reference, bins)
    guide = kernels.edge_guide(quantile)
    uniform = kernels.uniform_edges(np.full(features, -4.0), np.full(features, 4.0), bins)
    columns = [np.ascontiguousarray(current[:, f]) for f in range(features)]
    timings = {
        "np.histogram, per column (quantile edges)": _best(
            lambda: [np.histogram(c, bins=quantile[f]) for f, c in enumerate(columns)], args.repeat
        ),
        "np.searchsorted + np.bincount, per column": _best(
            lambda: [
                np.bincount(np.searchsorted(quantile[f], c, side="right"), minlength=bins + 2)
                for f, c in enumerate(columns)
            ],
            args.repeat,
        ),
        "mlmirror update_sorted_edges (quantile edges)": _best(
            lambda: kernels.update_sorted_edges(kernels.new_counts(features, bins), current, quantile, guide),
            args.repeat,
        ),
        "mlmirror update_uniform (equal-width edges)": _best(
            lambda: kernels.update_uniform(kernels.new_counts(features, bins), current, uniform), args.repeat
        ),
    }
    base = timings["np.histogram, per column (quantile edges)"]
    for name, seconds in timings.items():
        lines.append(f"| {name} | {values / seconds / 1e6:,.0f} M | {base / seconds:.1f}x |")

    scipy_seconds = _best(lambda: _scipy_loop(reference, current, bins), max(1, args.repeat // 2))
    expected = _scipy_loop(reference, current, bins)
    engine = _Mlmirror(reference, bins)
    window_seconds = _best(lambda: engine.window(current), args.repeat)
    scratch_seconds = _best(lambda: _Mlmirror(reference, bins).window(current), args.repeat)
    got = engine.window(current)
    lines += [
        "",
        f"| drift: PSI, JS, KS, W1 over {features} features, {rows} x {rows} rows | time | vs scipy loop |",
        "|---|---:|---:|",
        f"| scipy loop (np.histogram, jensenshannon, ks_2samp, wasserstein_distance) | {scipy_seconds * 1e3:.1f} ms "
        "| 1x |",
        f"| mlmirror per window (reference profile built once) | {window_seconds * 1e3:.2f} ms "
        f"| {scipy_seconds / window_seconds:.0f}x |",
        f"| mlmirror from scratch (quantile edges + both histograms) | {scratch_seconds * 1e3:.1f} ms "
        f"| {scipy_seconds / scratch_seconds:.0f}x |",
        "",
        "| metric | max abs difference, mlmirror vs scipy loop | note |",
        "|---|---:|---|",
    ]
    notes = {
        "psi": "same bins: equal up to rounding",
        "js": "same bins: equal up to rounding",
        "ks": "mlmirror on bins, scipy on raw values: the binning error",
        "w1": "mlmirror on bins (mass at bin centres), scipy on raw values: the binning error",
    }
    for metric in ("psi", "js", "ks", "w1"):
        lines.append(f"| {metric} | {np.max(np.abs(got[metric] - expected[metric])):.3g} | {notes[metric]} |")
    lines.append("")
    lines.append(
        f"Drifting feature: PSI {got['psi'][0]:.4f}, JS {got['js'][0]:.4f}, KS {got['ks'][0]:.4f} (raw "
        f"{expected['ks'][0]:.4f}), W1 {got['w1'][0]:.4f} (raw {expected['w1'][0]:.4f}); the largest of the others: "
        f"PSI {got['psi'][1:].max():.4f}, JS {got['js'][1:].max():.4f}."
    )
    lines.append(
        "Evidently and NannyML are not installed here (they belong in the benchmark's own environment); they are not "
        "in this table."
    )
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--bins", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "loadtest.bench_kernels", *(sys.argv[1:] if argv is None else argv)])
    print(run(args, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
