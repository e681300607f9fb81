"""Study: how often the drift engine calls a healthy window drifted, and how fast it sees a real shift.

    python -m loadtest.study_drift_alarms [--seed 18] [--healthy 500] [--trials 0] [--sizes 200,1000] [--quick]

The bundled ``production`` model (mlmirror.demo.models: iris-like flowers, 4 FP32 features) answers every call for
real (its ``predict``, the same code its KServe server runs), and the answers are the KServe V2 ModelInferResponse
messages its server sends (``probabilities`` FP32 [1, 3], ``label`` INT64 [1]). To keep the study fast the calls
are fed to a ``DriftEngine`` directly (``offer`` + ``drain``, as the tap and the worker do), not through the network:
the engine sees the same bytes. Each request also carries a categorical ``segment`` input (BYTES, "web" 70% /
"app" 30%) that the model does not read, so every window holds numeric features, a categorical feature and outputs:
4 + 1 + 3 + 1 = 9 series. One row per call.

Per configuration and window size: ``--healthy`` windows of unchanged traffic, spread over references (each a fresh
engine capturing its own reference: at 200 calls 20 windows per reference, at 1,000 calls 10), then, on each of
``--trials`` of those references (default: all of them), windows with petal length shifted by 0.25 sd and 0.5 sd
(its sd in the healthy traffic), and with segment 60/40, each until the shifted series is flagged (at most 10
windows). Reported: the share of healthy windows with any series drifted, with its exact (Clopper-Pearson) 95%
binomial interval, and the windows to detection of each change (median, worst, share caught within 2 windows).

Configurations: ``default`` (the defaults: detect ks, chi2 on categorical series, Holm at alarm_level 1%; capture
2,000 calls), ``per-series`` (alarm_level off: each series at its own 1%, the behaviour before family-wise control),
and ``calibrated`` (detect psi with thresholds calibrated on reference chunks, calibrate: 3; capture 5,000 calls, as
calibration needs 3 window-sized chunks; PSI's p-values from the reference's bootstrap). The multivariate (PCA)
measure is off: it is not part of a window's series decision. Seeded: the same command prints the same table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass

import grpc
import numpy as np
from mlmirror.config import Drift
from mlmirror.demo.models import MODELS, sample_features
from mlmirror.handoff.tap import CallRecord
from mlmirror.observing.drift.engine import DriftEngine
from mlmirror.protocol.names import MODEL_INFER
from mlmirror.protos import inference_pb2
from scipy import stats

MODEL = MODELS["production"]
PETAL_LENGTH = 2
SEGMENTS = (b"web", b"app")
MAX_WINDOWS = 10  # windows tried per change before it counts as missed


@dataclass(frozen=True)
class Config:
    name: str
    spec: dict
    capture: int


CONFIGS = (
    Config("default", {}, 2000),
    Config("per-series", {"alarm_level": None}, 2000),
    Config("calibrated", {"methods": ("psi", "ks"), "detect": "psi", "calibrate": 3.0}, 5000),
)


def call(x: np.ndarray, segment: bytes) -> CallRecord:
    """One answered call: ``x`` [1, 4] to the production model, ``segment`` alongside; the model's real answer."""
    request = inference_pb2.ModelInferRequest(model_name=MODEL.name)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    request.inputs.add(name="segment", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(segment).to_bytes(4, "little") + segment)
    probabilities, labels = MODEL.predict(x)
    response = inference_pb2.ModelInferResponse(model_name=MODEL.name, model_version=MODEL.version)
    response.outputs.add(name="probabilities", datatype="FP32", shape=[1, 3])
    response.outputs.add(name="label", datatype="INT64", shape=[1])
    response.raw_output_contents.extend([probabilities.tobytes(), labels.tobytes()])
    return CallRecord(
        route="iris", method=MODEL_INFER, request=request.SerializeToString(), response=response.SerializeToString(),
        code=grpc.StatusCode.OK, served_by="production", role="primary", request_id="", metadata=(), started=0.0,
        latency=0.0, upstream_latency=0.0,
    )  # fmt: skip


def traffic(rng: np.random.Generator, calls: int, shift: float = 0.0, app: float = 0.3) -> list[CallRecord]:
    """``calls`` calls: petal length shifted by ``shift`` cm, segment "app" with probability ``app``."""
    x = sample_features(rng, calls, shift)
    segments = np.where(rng.uniform(size=calls) < app, 1, 0)
    return [call(x[i : i + 1], SEGMENTS[segments[i]]) for i in range(calls)]


def feed(engine: DriftEngine, records: list[CallRecord]) -> None:
    for i, record in enumerate(records):
        engine.offer(record)
        if i % 500 == 499:
            engine.drain()
    engine.drain()


def window(engine: DriftEngine, rng: np.random.Generator, size: int, **change) -> set[str]:
    """Feed one window of ``size`` calls; the series it called drifted."""
    before = engine.windows.get((MODEL.name, MODEL.version), 0)
    feed(engine, traffic(rng, size, **change))
    assert engine.windows[MODEL.name, MODEL.version] == before + 1, "the window did not close"
    return {s.name for s in engine.latest[MODEL.name, MODEL.version].series if s.drifted}


def petal_sd(rng: np.random.Generator) -> float:
    return float(np.std(sample_features(rng, 200_000)[:, PETAL_LENGTH]))


@dataclass
class Outcome:
    windows: int = 0
    flagged: int = 0
    flagged_series: dict | None = None
    detection: dict | None = None


def run(config: Config, size: int, healthy: int, trials: int, seed: int, sd: float) -> Outcome:
    per_reference = 20 if size <= 200 else 10
    references = max(1, math.ceil(healthy / per_reference))
    changes = {
        "0.25 sd": ("input[2]", {"shift": 0.25 * sd}),
        "0.5 sd": ("input[2]", {"shift": 0.5 * sd}),
        "70/30 -> 60/40": ("segment", {"app": 0.4}),
    }
    out = Outcome(flagged_series={}, detection={name: [] for name in changes})
    rng = np.random.default_rng([seed, size, CONFIGS.index(config)])
    for r in range(references):
        spec = Drift(window=size, capture=config.capture, multivariate=None, history=1,
                     **config.spec)  # fmt: skip
        engine = DriftEngine("iris", spec)
        feed(engine, traffic(rng, config.capture))
        assert engine.reference is not None
        for _ in range(min(per_reference, healthy - out.windows)):
            drifted = window(engine, rng, size)
            out.windows += 1
            out.flagged += bool(drifted)
            for name in drifted:
                out.flagged_series[name] = out.flagged_series.get(name, 0) + 1
        if r >= trials:
            continue
        for name, (series, change) in changes.items():
            needed = MAX_WINDOWS + 1  # missed
            for w in range(1, MAX_WINDOWS + 1):
                if series in window(engine, rng, size, **change):
                    needed = w
                    break
            out.detection[name].append(needed)
    return out


def interval(k: int, n: int) -> tuple[float, float]:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return ci.low, ci.high


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--healthy", type=int, default=500, help="healthy windows per configuration and size")
    parser.add_argument("--trials", type=int, default=0, help="references that also try the changes (0: all)")
    parser.add_argument("--sizes", default="200,1000", help="window sizes in calls")
    parser.add_argument("--configs", default=",".join(c.name for c in CONFIGS))
    parser.add_argument("--quick", action="store_true", help="40 healthy windows, 4 trials: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.healthy, args.trials = 40, 4
    sizes = [int(s) for s in args.sizes.split(",")]
    wanted = args.configs.split(",")
    sd = petal_sd(np.random.default_rng(args.seed))
    print(f"petal length sd {sd:.3f} cm: 0.25 sd = {0.25 * sd:.3f} cm, 0.5 sd = {0.5 * sd:.3f} cm", flush=True)
    print()
    print("| config | window (calls) | healthy windows flagged | 95% interval | flagged series | "
          "0.25 sd: windows to detection | 0.5 sd | 70/30 -> 60/40 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for config in CONFIGS:
        if config.name not in wanted:
            continue
        for size in sizes:
            started = time.perf_counter()
            trials = args.trials or 10**9
            out = run(config, size, args.healthy, trials, args.seed, sd)
            low, high = interval(out.flagged, out.windows)
            series = ", ".join(f"{k} {v}" for k, v in sorted(out.flagged_series.items())) or "-"
            cells = [_detection(v) for v in out.detection.values()]
            print(f"| {config.name} | {size} | {out.flagged}/{out.windows} = {out.flagged / out.windows:.1%} | "
                  f"{low:.1%} to {high:.1%} | {series} | {' | '.join(cells)} |", flush=True)  # fmt: skip
            print(f"  ({config.name}, {size}: {time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return 0


def _detection(needed: list[int]) -> str:
    """median (worst) windows to detection over the trials, and the share caught within 2 windows."""
    if not needed:
        return "-"
    worst = max(needed)
    shown = f">{MAX_WINDOWS}" if worst > MAX_WINDOWS else str(worst)
    within = sum(n <= 2 for n in needed) / len(needed)
    return f"median {statistics.median(needed):g}, worst {shown}; ≤ 2: {within:.0%} of {len(needed)}"


if __name__ == "__main__":
    raise SystemExit(main())
