"""Benchmark: the drift kernels against Evidently and NannyML, on the task of ``bench_kernels``.

    PYTHONPATH=. .venv-peers/bin/python -m loadtest.bench_peers [--rows 100000] [--features 20] [--bins 20]
        [--repeat 3]

Run from the repository's root. Evidently and NannyML are not dependencies of the project (CI never installs them,
so this module imports them only inside functions); they run in their own virtual environment, which also needs
numpy, numba and scipy for ``kernels`` and ``loadtest.bench_kernels``. The environment that was measured (Python
3.11; pandas must stay below 3: evidently 0.7.23 imports ``pandas.core.dtypes.common.infer_dtype_from_object``,
which pandas 3 removed, and nannyml 0.13.1 accepts pandas 2.3)::

    python3.11 -m venv .venv-peers
    .venv-peers/bin/pip install evidently==0.7.23 nannyml==0.13.1 pandas==2.3.3 \\
        numpy==2.4.6 scipy==1.17.1 numba==0.68.1

(with scikit-learn 1.9.1, plotly 5.24.1, pydantic 2.14.4 pulled in; ``pip check`` is clean). Both libraries send
usage telemetry unless told not to: this module sets ``DO_NOT_TRACK=1`` (Evidently) and
``NML_DISABLE_USAGE_LOGGING=1`` (NannyML) before importing them.

Data, as in ``bench_kernels``: numpy ``default_rng(0)``, reference = ``normal(size=(rows, features))``, current =
``normal(size=(rows, features))`` with feature 0 shifted by 0.25. Systems, each timed as the best of ``--repeat`` runs
after one warm-up run (inputs built outside the timed part: numpy arrays for mlmirror, pandas DataFrames for the
peers, Evidently ``Dataset`` objects rebuilt before every run):

- *mlmirror per window*: PSI, JS, KS and W1 from 20 reference-quantile bins, the reference profile built once
  (``bench_kernels``'s engine); *from scratch*: quantile edges and both histograms included;
- *scipy loop*: ``bench_kernels``'s loop (np.histogram, jensenshannon, ks_2samp, wasserstein_distance);
- *Evidently*: ``Report.run`` of the ``DataDriftPreset`` (default stattest, and the four methods ``psi``,
  ``jensenshannon``, ``ks``, ``wasserstein`` in one report) and of bare ``ValueDrift`` metrics, one per column and
  method (each method alone and all four in one report); and Evidently's registered stattest functions called
  directly on the pandas columns, without a Report (the computation alone);
- *NannyML*: ``UnivariateDriftCalculator`` with ``chunk_size=rows`` (one chunk: the whole current sample) and the
  continuous methods ``jensen_shannon``, ``kolmogorov_smirnov``, ``wasserstein`` (and ``hellinger``); ``fit`` +
  ``calculate`` (from scratch) and ``calculate`` alone on a fitted calculator (per window). ``l_infinity`` is
  categorical-only in NannyML, so it is not measured on these continuous features.

The values table compares each peer's per-feature values with mlmirror's (max abs difference over features), and
with mlmirror's kernels applied to the peer's own bins where the peer bins, which separates a difference of binning
from one of definition. The definitions differ, and the table says how; nothing is forced to agree.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any

import numpy as np
from mlmirror import kernels

from loadtest.bench_kernels import _cpu_name, _Mlmirror, _scipy_loop

__all__ = ["main"]

EVIDENTLY_METHODS = ("psi", "jensenshannon", "ks", "wasserstein")
NANNYML_METHODS = ("jensen_shannon", "kolmogorov_smirnov", "wasserstein", "hellinger")
PEER_TARGET = 300.0
SCIPY_TARGET = 100.0


def _best(run: Callable[..., object], repeat: int, setup: Callable[[], tuple] | None = None) -> float:
    """Best of ``repeat`` timed calls of ``run(*setup())`` after one warm-up call; ``setup`` is not timed."""
    prepare = setup or (lambda: ())
    run(*prepare())
    best = float("inf")
    for _ in range(repeat):
        arguments = prepare()
        started = time.perf_counter()
        run(*arguments)
        best = min(best, time.perf_counter() - started)
    return best


# --- Evidently ----------------------------------------------------------------------------------------------------


class _Evidently:
    def __init__(self, reference: np.ndarray, current: np.ndarray) -> None:
        os.environ["DO_NOT_TRACK"] = "1"
        import pandas as pd
        from evidently import DataDefinition, Dataset, Report
        from evidently.legacy.calculations.stattests.registry import get_stattest
        from evidently.legacy.core import ColumnType
        from evidently.metrics import ValueDrift
        from evidently.presets import DataDriftPreset

        self.columns = [f"f{i}" for i in range(reference.shape[1])]
        self.reference = pd.DataFrame(reference, columns=self.columns)
        self.current = pd.DataFrame(current, columns=self.columns)
        self._definition = DataDefinition(numerical_columns=self.columns)
        self._dataset, self._report = Dataset, Report
        self._value_drift, self._preset = ValueDrift, DataDriftPreset
        self._get_stattest, self._numerical = get_stattest, ColumnType.Numerical

    def datasets(self) -> tuple[Any, Any]:
        return (
            self._dataset.from_pandas(self.reference, data_definition=self._definition),
            self._dataset.from_pandas(self.current, data_definition=self._definition),
        )

    def preset(self, methods: tuple[str | None, ...]) -> Any:
        return self._report([self._preset(method=m) for m in methods])

    def value_drift(self, methods: tuple[str | None, ...]) -> Any:
        return self._report([self._value_drift(column=c, method=m) for m in methods for c in self.columns])

    @staticmethod
    def run(report: Any, reference: Any, current: Any) -> Any:
        return report.run(current_data=current, reference_data=reference)

    def values(self, snapshot: Any) -> dict[str, np.ndarray]:
        """Per-feature values by the method name that each ValueDrift metric reports."""
        found: dict[str, dict[str, float]] = {}
        for metric in snapshot.dict()["metrics"]:
            if metric["metric_name"].startswith("ValueDrift"):
                config = metric["config"]
                found.setdefault(str(config["method"]), {})[config["column"]] = float(metric["value"])
        return {method: np.array([by_column[c] for c in self.columns]) for method, by_column in found.items()}

    def stattests(self, methods: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Evidently's registered stattest functions on each column, no Report around them."""
        out = {}
        for method in methods:
            scores = []
            for column in self.columns:
                r, c = self.reference[column], self.current[column]
                test = self._get_stattest(r, c, self._numerical, method)
                scores.append(float(test(r, c, self._numerical, None).drift_score))
            out[method] = np.array(scores)
        return out


# --- NannyML ------------------------------------------------------------------------------------------------------


class _NannyML:
    def __init__(self, reference: np.ndarray, current: np.ndarray) -> None:
        os.environ["NML_DISABLE_USAGE_LOGGING"] = "1"
        import nannyml
        import pandas as pd

        self.columns = [f"f{i}" for i in range(reference.shape[1])]
        self.reference = pd.DataFrame(reference, columns=self.columns)
        self.current = pd.DataFrame(current, columns=self.columns)
        self.rows = current.shape[0]
        self._calculator = nannyml.UnivariateDriftCalculator

    def fitted(self, methods: tuple[str, ...]) -> Any:
        calculator = self._calculator(column_names=self.columns, continuous_methods=list(methods), chunk_size=self.rows)
        with warnings.catch_warnings():  # "the resulting number of chunks is too low": one chunk is the point here
            warnings.simplefilter("ignore", UserWarning)
            return calculator.fit(self.reference)

    def calculate(self, calculator: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return calculator.calculate(self.current)

    def fit_calculate(self, methods: tuple[str, ...]) -> Any:
        return self.calculate(self.fitted(methods))

    def values(self, result: Any, methods: tuple[str, ...]) -> dict[str, np.ndarray]:
        frame = result.filter(period="analysis").to_df()
        if len(frame) != 1:
            raise RuntimeError(f"expected one analysis chunk, got {len(frame)}")
        return {m: np.array([float(frame[(c, m, "value")].iloc[0]) for c in self.columns]) for m in methods}


# --- mlmirror's kernels on a peer's bins ---------------------------------------------------------------------------


def _counts_on(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """One feature's counts (underflow, bins, overflow) for ``edges``, by mlmirror's kernel."""
    edges = np.ascontiguousarray(edges, dtype=np.float64)[None, :]
    counts = kernels.new_counts(1, edges.shape[1] - 1)
    kernels.update_sorted_edges(counts, np.ascontiguousarray(values, dtype=np.float64)[:, None], edges)
    return counts[0, :-1].astype(np.float64)


def _on_peer_bins(
    reference: np.ndarray, current: np.ndarray, edges_of: Callable[[np.ndarray, np.ndarray], np.ndarray], metric: str
) -> np.ndarray:
    out = []
    for f in range(reference.shape[1]):
        edges = edges_of(reference[:, f], current[:, f])
        rc, cc = _counts_on(edges, reference[:, f]), _counts_on(edges, current[:, f])
        if metric == "psi":
            out.append(kernels.psi(rc, cc)[0])
        elif metric == "js":
            out.append(kernels.js(rc, cc)[0])
        elif metric == "hellinger":
            out.append(kernels.hellinger(rc, cc)[0])
        elif metric == "ks":
            out.append(kernels.ks(rc, cc)[0][0])
        else:
            out.append(kernels.wasserstein(rc, cc, kernels.slot_positions(edges))[0])
    return np.array(out)


def _evidently_psi(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """PSI from mlmirror's counts on Evidently's bins, with Evidently's rule for empty bins (no clipping)."""

    def shares(counts: np.ndarray) -> np.ndarray:
        p = counts / counts.sum()
        smallest = p[p > 0].min()
        return np.where(p > 0, p, smallest / 1e6 if smallest <= 1e-4 else 1e-4)

    out = []
    for f in range(reference.shape[1]):
        edges = _sturges_combined(reference[:, f], current[:, f])
        p = shares(_counts_on(edges, reference[:, f])[1:-1])  # the edges span both samples: no under- or overflow
        q = shares(_counts_on(edges, current[:, f])[1:-1])
        out.append(float(np.sum((p - q) * np.log(p / q))))
    return np.array(out)


def _sturges_combined(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.histogram_bin_edges(np.concatenate([r, c]), bins="sturges")


def _doane_reference(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.histogram_bin_edges(r, bins="doane")


def _equal_width_10k(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.linspace(r.min(), r.max(), 10_001)


# --- the run ------------------------------------------------------------------------------------------------------


def _versions() -> str:
    names = ("evidently", "nannyml", "pandas", "numpy", "scipy", "numba", "scikit-learn", "plotly", "pydantic")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def _met(ratio: float, target: float) -> str:
    return "met" if ratio >= target else "missed"


def run(args: argparse.Namespace, command: str) -> str:
    rng = np.random.default_rng(0)
    rows, features, bins, repeat = args.rows, args.features, args.bins, args.repeat
    reference = rng.normal(size=(rows, features))
    shift = np.zeros(features)
    shift[0] = 0.25
    current = rng.normal(size=(rows, features)) + shift
    kernels.warm_up()
    started = time.perf_counter()

    timings: dict[str, tuple[str, str, float]] = {}  # key -> (system, what it computed, seconds)
    four = ", ".join(EVIDENTLY_METHODS)

    engine = _Mlmirror(reference, bins)
    window = _best(lambda: engine.window(current), repeat)
    scratch = _best(lambda: _Mlmirror(reference, bins).window(current), repeat)
    ours = f"PSI, JS, KS, W1 on {bins} reference-quantile bins"
    timings["window"] = ("mlmirror per window (reference profile built once)", ours, window)
    timings["scratch"] = ("mlmirror from scratch (quantile edges + both histograms)", ours, scratch)
    timings["scipy"] = (
        "scipy loop (bench_kernels)",
        "PSI, JS on the same bins; KS, W1 on raw values",
        _best(lambda: _scipy_loop(reference, current, bins), repeat),
    )

    ev = _Evidently(reference, current)
    ev_cases: list[tuple[str, str, str, Callable[..., object]]] = [
        ("preset", "Evidently Report: DataDriftPreset()", "default stattest", lambda: ev.preset((None,))),
        ("preset4", "Evidently Report: 4 x DataDriftPreset(method=...)", four, lambda: ev.preset(EVIDENTLY_METHODS)),
        ("drift", "Evidently Report: ValueDrift per column", "default stattest", lambda: ev.value_drift((None,))),
    ]
    ev_cases += [
        (m, f"Evidently Report: ValueDrift(method={m!r}) per column", m, lambda m=m: ev.value_drift((m,)))
        for m in EVIDENTLY_METHODS
    ]
    ev_cases.append(
        (
            "drift4",
            "Evidently Report: ValueDrift per column x 4 methods, one report",
            four,
            lambda: ev.value_drift(EVIDENTLY_METHODS),
        )
    )
    for key, name, what, make in ev_cases:
        seconds = _best(lambda r, c, make=make: ev.run(make(), r, c), repeat, setup=ev.datasets)
        if what == "default stattest":  # say which stattest the default picked, as the report names it
            what += f"; it picked: {', '.join(sorted(ev.values(ev.run(make(), *ev.datasets()))))}"
        timings[key] = (name, what, seconds)
    ev_values = ev.values(ev.run(ev.value_drift(EVIDENTLY_METHODS), *ev.datasets()))
    timings["bare"] = (
        "Evidently stattests called directly (no Report)",
        four,
        _best(lambda: ev.stattests(EVIDENTLY_METHODS), repeat),
    )
    ev_direct = ev.stattests(EVIDENTLY_METHODS)

    nm = _NannyML(reference, current)
    three = NANNYML_METHODS[:3]
    timings["nml3"] = ("NannyML fit + calculate", ", ".join(three), _best(lambda: nm.fit_calculate(three), repeat))
    timings["nml4"] = (
        "NannyML fit + calculate",
        ", ".join(NANNYML_METHODS),
        _best(lambda: nm.fit_calculate(NANNYML_METHODS), repeat),
    )
    fitted = nm.fitted(NANNYML_METHODS)
    timings["nml_window"] = (
        "NannyML calculate only (calculator fitted once)",
        ", ".join(NANNYML_METHODS),
        _best(lambda: nm.calculate(fitted), repeat),
    )
    nm_values = nm.values(nm.calculate(fitted), NANNYML_METHODS)
    total = time.perf_counter() - started

    lines = [f"Command: `{command}`", ""]
    lines.append(
        f"{rows} reference x {rows} current rows x {features} features of float64 (normal, seed 0; current's first "
        f"feature shifted by 0.25 sd). Best of {repeat} runs after one warm-up run. Machine: {_cpu_name()}, "
        f"{os.cpu_count()} cores; mlmirror's kernels use one thread. Packages: {_versions()}. "
        f"Benchmark wall time: {total:.0f} s."
    )
    lines += [
        "",
        "| system | what it computed (all features) | time | vs mlmirror per window | vs mlmirror from scratch |",
        "|---|---|---:|---:|---:|",
    ]
    for name, what, seconds in timings.values():
        shown = f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"
        lines.append(f"| {name} | {what} | {shown} | {seconds / window:,.0f}x | {seconds / scratch:,.1f}x |")

    # values: mlmirror as it runs, on 20 reference-quantile bins
    got = engine.window(current)
    ref_counts, cur_counts = engine.reference, _window_counts(engine, current)
    ks_p = kernels.ks(ref_counts, cur_counts)[1]
    hellinger = kernels.hellinger(ref_counts, cur_counts)
    sd = reference.std(axis=0)
    ln2 = math.sqrt(math.log(2.0))
    sturges = len(_sturges_combined(reference[:, 0], current[:, 0])) - 1

    def diff(a: np.ndarray, b: np.ndarray) -> str:
        return f"{np.max(np.abs(a - b)):.3g}"

    rows_out = [
        (
            "Evidently psi",
            f"PSI, natural log, on {sturges} equal-width (Sturges) bins over reference + current together; empty bins "
            "set to 1e-4 (or the smallest share / 1e6 when that is below 1e-4)",
            diff(ev_values["psi"], got["psi"]),
            diff(ev_values["psi"], _on_peer_bins(reference, current, _sturges_combined, "psi")),
            "binning, and on the same bins the rule for small shares: Evidently sets an empty bin's share to the "
            "smallest share / 1e6, mlmirror clips every share below 1e-4 up to 1e-4 (see below)",
        ),
        (
            "Evidently jensenshannon",
            "JS distance, natural log (scipy's default base), same Sturges bins, no epsilon",
            diff(ev_values["jensenshannon"], got["js"] * ln2),
            diff(ev_values["jensenshannon"], _on_peer_bins(reference, current, _sturges_combined, "js") * ln2),
            "mlmirror's is base 2: compared after multiplying it by sqrt(ln 2); the rest is binning",
        ),
        (
            "Evidently ks",
            "p-value of scipy's ks_2samp on the raw values (not the statistic)",
            diff(ev_values["ks"], ks_p),
            "— (raw values)",
            "mlmirror's asymptotic p-value of the binned statistic; p-values of undrifted features are very "
            "sensitive to the statistic, so the binning error shows up large here",
        ),
        (
            "Evidently wasserstein",
            "W1 of the raw values divided by the reference's std",
            diff(ev_values["wasserstein"], got["w1"] / sd),
            "— (raw values)",
            "mlmirror's binned W1 divided by the reference's std (computed for this table only): binning error",
        ),
        (
            "NannyML jensen_shannon",
            "JS distance, base 2, on Doane bins of the reference; current's out-of-range share in one extra slot",
            diff(nm_values["jensen_shannon"], got["js"]),
            diff(nm_values["jensen_shannon"], _on_peer_bins(reference, current, _doane_reference, "js")),
            "same definition; binning (mlmirror keeps underflow and overflow apart)",
        ),
        (
            "NannyML hellinger",
            "Hellinger distance on the same Doane bins",
            diff(nm_values["hellinger"], hellinger),
            diff(nm_values["hellinger"], _on_peer_bins(reference, current, _doane_reference, "hellinger")),
            "same definition; binning (mlmirror's Hellinger is computed outside the timed part)",
        ),
        (
            "NannyML kolmogorov_smirnov",
            "KS statistic, estimated on 10,000 equal-width bins over the reference's range (reference >= 10k rows)",
            diff(nm_values["kolmogorov_smirnov"], got["ks"]),
            diff(nm_values["kolmogorov_smirnov"], _on_peer_bins(reference, current, _equal_width_10k, "ks")),
            "same statistic; mlmirror on 20 bins is the coarser estimate",
        ),
        (
            "NannyML wasserstein",
            "W1, estimated on the same 10,000 bins plus exact tails beyond the reference's range (not normalized)",
            diff(nm_values["wasserstein"], got["w1"]),
            diff(nm_values["wasserstein"], _on_peer_bins(reference, current, _equal_width_10k, "w1")),
            "same quantity; mlmirror puts each bin's mass at its centre and the tails at the outer edges",
        ),
    ]
    lines += [
        "",
        "| peer value | peer's definition | max abs diff vs mlmirror (20 quantile bins) "
        "| max abs diff vs mlmirror's kernels on the peer's bins | what the difference is |",
        "|---|---|---:|---:|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows_out]
    lines.append("")
    lines.append(
        "Evidently's stattests called directly give the same values as its Report: max abs difference "
        + ", ".join(f"{m} {diff(ev_direct[m], ev_values[m])}" for m in EVIDENTLY_METHODS)
        + ". Evidently's PSI recomputed from mlmirror's counts on the Sturges bins with Evidently's rule for empty "
        + f"bins instead of clipping: max abs diff {diff(ev_values['psi'], _evidently_psi(reference, current))}."
    )
    drifting = {
        "mlmirror": {"PSI": got["psi"], "JS (base 2)": got["js"], "KS": got["ks"], "W1": got["w1"]},
        "Evidently": {
            "psi": ev_values["psi"],
            "jensenshannon (base e)": ev_values["jensenshannon"],
            "ks p-value": ev_values["ks"],
            "wasserstein (normed)": ev_values["wasserstein"],
        },
        "NannyML": {m: nm_values[m] for m in NANNYML_METHODS},
    }
    lines.append(
        "Drifting feature f0 — "
        + "; ".join(
            f"{system}: " + ", ".join(f"{k} {v[0]:.4g}" for k, v in values.items())
            for system, values in drifting.items()
        )
        + "."
    )

    lines += [
        "",
        "| target (the same four metrics) | mlmirror per window | mlmirror from scratch |",
        "|---|---:|---:|",
    ]
    for label, seconds, target in (
        ("≥ 300x Evidently (4 x DataDriftPreset, one Report)", timings["preset4"][2], PEER_TARGET),
        ("≥ 300x Evidently (ValueDrift x 4 methods, one Report)", timings["drift4"][2], PEER_TARGET),
        ("≥ 300x Evidently (its stattests alone, no Report)", timings["bare"][2], PEER_TARGET),
        ("≥ 100x the scipy loop", timings["scipy"][2], SCIPY_TARGET),
    ):
        lines.append(
            f"| {label} | {seconds / window:,.0f}x: {_met(seconds / window, target)} "
            f"| {seconds / scratch:,.1f}x: {_met(seconds / scratch, target)} |"
        )
    return "\n".join(lines)


def _window_counts(engine: _Mlmirror, current: np.ndarray) -> np.ndarray:
    counts = kernels.new_counts(current.shape[1], engine.bins)
    kernels.update_sorted_edges(counts, current, engine.edges, engine.guide)
    return counts[:, :-1].astype(np.float64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_peers", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--bins", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "loadtest.bench_peers", *(sys.argv[1:] if argv is None else argv)])
    print(run(args, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
