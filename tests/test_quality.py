"""Model and data quality per drift window: the label-free accuracy estimate against realized accuracy under a
seeded covariate shift, data-quality shares against numpy counts, segments against a numpy group-by, and the whole
through the proxy with outcomes reported over gRPC."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from mlmirror.config import Drift, GroundTruth
from mlmirror.demo.models import CLASS_MEANS, MODELS, ModelServicer, sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.handoff.tap import CallRecord
from mlmirror.observing.drift.engine import DriftEngine
from mlmirror.observing.drift.report import render_drift
from mlmirror.observing.drift.segments import MIN_ROWS
from mlmirror.observing.groundtruth.estimate import Calibrator, isotonic_fit
from mlmirror.protos import feedback_pb2, inference_pb2, inference_pb2_grpc

from tests.support import http_get, model_server, through_proxy, wait_until

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

# --- a seeded classification world: P(y | x) fixed, x moved (covariate shift) ---------------------------------------

W = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])  # three classes, 120 degrees apart


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def world(rng: np.random.Generator, n: int, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [n, 2], the model's probabilities [n, 3], true classes [n]): x around the class directions at
    ``radius`` (smaller: nearer the boundaries, lower accuracy); y drawn from the true posterior softmax(W x); the
    model is overconfident (softmax(1.8 W x)), so its probabilities need calibrating."""
    c = rng.integers(0, 3, n)
    x = W[c] / np.linalg.norm(W[c], axis=1, keepdims=True) * radius + rng.normal(size=(n, 2)) * 0.6
    truth = softmax(x @ W.T)
    y = (rng.random(n)[:, None] > truth.cumsum(axis=1)).sum(axis=1)
    return x, softmax(1.8 * (x @ W.T)), y


def call(request_id: str, x: np.ndarray, p: np.ndarray, region: list[bytes] | None = None) -> CallRecord:
    """An answered call: FP64 input "x" (and BYTES input "region"), FP64 output "p", model "m" version "1"."""
    request = inference_pb2.ModelInferRequest(model_name="m", id=request_id)
    request.inputs.add(name="x", datatype="FP64", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, "<f8").tobytes())
    if region is not None:
        request.inputs.add(name="region", datatype="BYTES", shape=[len(region)])
        request.raw_input_contents.append(b"".join(len(v).to_bytes(4, "little") + v for v in region))
    response = inference_pb2.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="p", datatype="FP64", shape=list(p.shape))
    response.raw_output_contents.append(np.ascontiguousarray(p, "<f8").tobytes())
    return CallRecord(
        route="m", method=MODEL_INFER, request=request.SerializeToString(), response=response.SerializeToString(),
        code=grpc.StatusCode.OK, served_by="p", role="primary", request_id=request_id, metadata=(), started=0.0,
        latency=0.0, upstream_latency=0.0,
    )  # fmt: skip


def feed(engine: DriftEngine, calls) -> None:
    for i, record in enumerate(calls):
        engine.offer(record)
        if i % 500 == 499:
            engine.drain()
    engine.drain()


def spec(**truth) -> Drift:
    return Drift(window=1000, capture=1000, multivariate=None, ground_truth=GroundTruth(output="p", **truth))


def test_isotonic_fit_is_monotone_and_least_squares_among_monotone_fits():
    rng = np.random.default_rng(3)
    x = rng.random(300).round(2)
    y = (rng.random(300) < x).astype(float)
    xs, ys = isotonic_fit(x, y)
    fitted = np.interp(x, xs, ys)
    assert np.all(np.diff(ys) >= 0)
    # Pooling every violator leaves each block at its mean: the residuals of a block sum to zero, so any
    # monotone perturbation (here: adding a small increasing step) raises the squared error.
    error = ((fitted - y) ** 2).sum()
    for cut in (0.2, 0.5, 0.8):
        for eps in (0.01, -0.01):
            bumped = np.clip(fitted + eps * (x >= cut), 0, 1)
            if np.all(np.diff(bumped[np.argsort(x, kind="stable")]) >= -1e-12):
                assert ((bumped - y) ** 2).sum() >= error - 1e-12
    assert np.interp([-1.0, 2.0], xs, ys).tolist() == [ys[0], ys[-1]]  # clipped beyond the data


def run_shift(seed: int, radius: float) -> list[tuple[float, float, float]]:
    """(estimated accuracy, realized accuracy, estimated F1 - realized F1) of 5 windows of 1000 calls at
    ``radius``, after a capture and a labelled reference of 5000 calls at radius 1.75 (accuracy ~0.95)."""
    rng = np.random.default_rng(seed)
    engine = DriftEngine("m", spec(calibration=5000, target=0.9, target_windows=3))
    x, p, y = world(rng, 6000, 1.75)
    feed(engine, (call(f"ref-{i}", x[i : i + 1], p[i : i + 1]) for i in range(6000)))
    for i in range(1000, 6000):  # the labelled reference: the outcomes of the windowed reference calls
        assert engine.ground_truth.report(f"ref-{i}", [], [str(y[i])]) == "matched"
    assert engine.quality.calibration() == {("m", "1"): 5000}
    figures = []
    for w in range(5):
        x, p, y = world(rng, 1000, radius)
        feed(engine, (call(f"w{w}-{i}", x[i : i + 1], p[i : i + 1]) for i in range(1000)))
        (window,) = engine.quality.snapshot().values()
        assert window.calibrated
        assert window.rows == 1000
        predicted = p.argmax(axis=1)
        f1 = np.mean([2 * np.sum((predicted == c) & (y == c)) / (np.sum(predicted == c) + np.sum(y == c))
                      for c in range(3)])  # fmt: skip
        figures.append((window.estimated_accuracy, float(np.mean(predicted == y)), window.estimated_f1 - f1))
    return figures


def test_the_estimate_follows_accuracy_down_a_covariate_shift():
    figures = run_shift(seed=11, radius=0.95)
    realized = [r for _, r, _ in figures]
    assert 0.76 < np.mean(realized) < 0.84  # the shift took accuracy from ~0.95 to ~0.80
    for estimated, actual, f1_error in figures:
        assert abs(estimated - actual) <= 0.03, figures
        assert abs(f1_error) <= 0.04, figures


def test_the_estimate_matches_accuracy_without_shift():
    figures = run_shift(seed=12, radius=1.75)
    assert 0.93 < np.mean([r for _, r, _ in figures]) < 0.97
    for estimated, actual, _ in figures:
        assert abs(estimated - actual) <= 0.02, figures


def test_without_a_labelled_reference_probabilities_are_assumed_calibrated_and_the_target_flag_waits():
    rng = np.random.default_rng(5)
    engine = DriftEngine("m", spec(calibration=0, target=0.99, target_windows=2))
    x, p, _ = world(rng, 3000, 1.0)
    feed(engine, (call(f"c{i}", x[i : i + 1], p[i : i + 1]) for i in range(2000)))
    (window,) = engine.quality.snapshot().values()
    assert not window.calibrated
    assert window.estimated_accuracy == pytest.approx(np.mean(p[1000:2000].max(axis=1)), abs=1e-12)
    assert (window.low_windows, window.below_target) == (1, False)
    feed(engine, (call(f"d{i}", x[i : i + 1], p[i : i + 1]) for i in range(2000, 3000)))
    (window,) = engine.quality.snapshot().values()
    assert (window.low_windows, window.below_target) == (2, True)
    status = render_drift({"routes": [{"name": "m", "drift": __import__("mlmirror.observing.drift.report",
                                       fromlist=["drift_status"]).drift_status(engine)}]})  # fmt: skip
    assert "estimate (assumed calibrated)" in status
    assert "BELOW TARGET for 2 windows" in status


def test_the_calibrator_undoes_overconfidence():
    rng = np.random.default_rng(6)
    _, p, y = world(rng, 20000, 1.0)
    calibrated = Calibrator.fit(p[:10000], y[:10000]).apply(p[10000:])
    top = p[10000:].argmax(axis=1)
    hit = top == y[10000:]
    assert abs(calibrated[np.arange(10000), top].mean() - hit.mean()) < 0.01
    assert p[10000:].max(axis=1).mean() - hit.mean() > 0.05  # uncalibrated, it would be well off


# --- data quality --------------------------------------------------------------------------------------------------


def test_data_quality_shares_equal_numpy_counts():
    rng = np.random.default_rng(7)
    engine = DriftEngine("m", Drift(window=1000, capture=1000, multivariate=None))
    regions = np.array([b"north", b"south", b"east", b""], dtype=object)
    x = rng.normal(size=(2000, 2))
    region = regions[rng.choice(4, size=2000, p=[0.5, 0.3, 0.15, 0.05])]
    # The window: NaNs, values beyond the reference's range (infinities too), new and empty categories.
    x[1000:][rng.random((1000, 2)) < 0.07] = np.nan
    x[1000:, 0][rng.random(1000) < 0.04] = 9.0
    x[1000:, 1][rng.random(1000) < 0.02] = -np.inf
    region[1000:][rng.random(1000) < 0.08] = b"west"
    region[1000:][rng.random(1000) < 0.03] = b""
    p = softmax(rng.normal(size=(2000, 3)))
    feed(engine, (call(str(i), x[i : i + 1], p[i : i + 1], [region[i]]) for i in range(2000)))
    (window,) = engine.quality.snapshot().values()
    got = {(d.series, d.check): (d.ratio, d.reference, d.detected) for d in window.data}
    ref, live = x[:1000], x[1000:]
    finite = np.isfinite(ref)
    for j in range(2):
        low, high = ref[finite[:, j], j].min(), ref[finite[:, j], j].max()
        missing = np.count_nonzero(np.isnan(live[:, j])) / 1000
        outside = np.count_nonzero((live[:, j] < low) | (live[:, j] > high)) / 1000
        assert got[f"x[{j}]", "missing"] == (missing, 0.0, missing > 0.05)
        assert got[f"x[{j}]", "out_of_range"] == (outside, 0.0, outside > 0.05)
    known = set(region[:1000].tolist())
    blank = np.count_nonzero(region[1000:] == b"") / 1000
    unseen = sum(1 for v in region[1000:] if v not in known) / 1000
    reference_blank = np.count_nonzero(region[:1000] == b"") / 1000
    assert got["region", "missing"] == (blank, reference_blank, blank - reference_blank > 0.05)
    assert got["region", "unseen_category"] == (unseen, 0.0, unseen > 0.05)
    assert got["x[0]", "missing"][2]  # the seeded window is flagged
    assert got["region", "unseen_category"][2]
    assert len(got) == 2 * 6  # two checks per series: x[0], x[1], region, and the outputs p[0..2]


# --- segments ------------------------------------------------------------------------------------------------------


def test_segment_figures_equal_a_numpy_group_by():
    rng = np.random.default_rng(8)
    truth = GroundTruth(output="p", calibration=0, window=1000)
    engine = DriftEngine("m", Drift(window=1000, capture=1000, multivariate=None, ground_truth=truth,
                                    segment="region", segment_values=4))  # fmt: skip
    names = np.array([f"r{i}".encode() for i in range(12)], dtype=object)
    weights = np.linspace(2.0, 0.2, 12) / np.linspace(2.0, 0.2, 12).sum()
    region = names[rng.choice(12, size=3000, p=weights)]
    x, p, y = world(rng, 3000, 1.0)
    p[region == b"r1"] = softmax(0.3 * np.log(p[region == b"r1"]))  # one segment far less sure of itself
    feed(engine, (call(str(i), x[i : i + 1], p[i : i + 1], [region[i]]) for i in range(2000)))
    for i in range(1000, 2000):  # outcomes of the first window: the realized figures
        assert engine.ground_truth.report(str(i), [], [str(y[i])]) == "matched"
    feed(engine, (call(str(i), x[i : i + 1], p[i : i + 1], [region[i]]) for i in range(2000, 3000)))
    (window,) = engine.quality.snapshot().values()
    counts = {v: int(np.sum(region[:1000] == v)) for v in names}  # the reference's vocabulary order
    kept = sorted(names, key=lambda v: -counts[v])[:4]
    assert [s.name for s in window.segments] == [*(v.decode() for v in kept), "other"]

    def group(values: np.ndarray) -> np.ndarray:
        return np.array([kept.index(v) if v in kept else 4 for v in values])

    live, joined = group(region[2000:]), group(region[1000:2000])
    predicted = p.argmax(axis=1)
    expected_shares, expected_estimate, expected_accuracy = [], [], []
    for s, segment in enumerate(window.segments):
        mine = live == s
        assert segment.rows == np.count_nonzero(mine)
        shares = np.bincount(predicted[2000:][mine], minlength=3) / np.count_nonzero(mine)
        assert segment.shares == pytest.approx(shares, abs=1e-12)
        estimate = p[2000:][mine].max(axis=1).mean()  # assumed calibrated: the mean top probability
        assert segment.estimated_accuracy == pytest.approx(estimate, abs=1e-12)
        answered = joined == s
        accuracy = np.mean(predicted[1000:2000][answered] == y[1000:2000][answered])
        assert segment.outcome_rows == np.count_nonzero(answered)
        assert segment.accuracy == pytest.approx(accuracy, abs=1e-12)
        if segment.rows >= MIN_ROWS:
            expected_shares.append(shares)
            expected_estimate.append(estimate)
        if segment.outcome_rows >= MIN_ROWS:
            expected_accuracy.append(accuracy)
    shares = np.array(expected_shares)
    assert window.gaps["demographic_parity"] == pytest.approx((shares.max(axis=0) - shares.min(axis=0)).max())
    assert window.gaps["estimated_accuracy"] == pytest.approx(max(expected_estimate) - min(expected_estimate))
    assert window.gaps["accuracy"] == pytest.approx(max(expected_accuracy) - min(expected_accuracy))
    assert window.gaps["estimated_accuracy"] > 0.1  # the unsure segment stands out


def test_segments_need_a_classification_ground_truth_and_a_known_feature(tmp_path):
    from mlmirror.config import load_config
    from mlmirror.errors import ConfigError

    def load(drift: str):
        path = tmp_path / "c.yaml"
        route = f"{{name: r, match: {{model: m}}, primary: p, drift: {drift}}}"
        path.write_text(f"upstreams: {{p: 127.0.0.1:1}}\nroutes:\n  - {route}\n")
        return load_config(path)

    with pytest.raises(ConfigError, match="segments need a classification ground_truth"):
        load("{segment: region}")
    with pytest.raises(ConfigError, match="not one of the features"):
        load("{segment: region, features: [{input: x}], ground_truth: {output: p}}")
    with pytest.raises(ConfigError, match="unknown data-quality check 'nan'"):
        load("{data_quality: {nan: 0.1}}")
    drift = load("{segment: region, ground_truth: {output: p, target: 0.9}, data_quality: {missing: 0.2}}")
    drift = drift.routes[0].drift
    assert (drift.segment, drift.ground_truth.target, drift.data_quality["missing"]) == ("region", 0.9, 0.2)
    assert drift.data_quality["out_of_range"] == 0.05


# --- through the proxy ---------------------------------------------------------------------------------------------


async def test_the_estimate_and_data_quality_through_the_proxy_with_outcomes_over_grpc():
    rng = np.random.default_rng(9)
    async with model_server("production") as production:
        config = f"""
        mirror_shed_lag: off
        upstreams: {{production: 127.0.0.1:{production}}}
        routes:
          - name: iris
            match: {{model: iris}}
            primary: production
            drift:
              window: 100
              capture: 100
              ground_truth: {{output: probabilities, window: 100, calibration: 200, target: 0.995, target_windows: 2}}
        """
        async with through_proxy(config) as (proxy, channel):
            infer = channel.unary_unary(MODEL_INFER)
            features = [sample_features(rng, 1) for _ in range(400)]
            features[350][0, 1] = np.nan  # one missing value in the last window
            ids = [f"call-{i}" for i in range(400)]
            predicted = [int(MODELS["production"].predict(f)[1][0]) for f in features]
            engine = proxy.parts.get("iris", "drift").engine
            for lo, hi in ((0, 300), (300, 400)):
                for start in range(lo, hi, 100):  # one window's calls at a time: the windows hold the same calls
                    chunk = range(start, start + 100)  # whatever order concurrent calls arrive in
                    await asyncio.gather(*(infer(infer_request(features[i], request_id=ids[i])) for i in chunk))
                    await wait_until(lambda end=chunk.stop: engine.queued == 0 and engine.accepted == end,
                                     what="calls counted")  # fmt: skip
                if hi == 300:  # outcomes of the first 300 calls over gRPC: the 200 windowed are the labelled reference
                    report = channel.unary_unary("/mlmirror.v1.Feedback/ReportOutcome",
                                                 feedback_pb2.ReportOutcomeRequest.SerializeToString,
                                                 feedback_pb2.ReportOutcomeResponse.FromString)  # fmt: skip
                    truth = [(label + (rng.random() < 0.05)) % 3 for label in predicted[:300]]  # 5% wrong
                    outcomes = [feedback_pb2.Outcome(request_id=ids[i], labels=[str(truth[i])]) for i in range(300)]
                    answer = await report(feedback_pb2.ReportOutcomeRequest(outcomes=outcomes))
                    assert answer.matched == 300
                    await wait_until(lambda: engine.quality.calibration() == {("iris", "1"): 200}, what="calibrated")
            await wait_until(lambda: engine.windows.get(("iris", "1")) == 3, what="three windows")
            quality = proxy.status()["routes"][0]["drift"]["quality"]
            (window,) = quality["latest"]
            # 99 rows: the call with a NaN input got NaN probabilities, left out of the estimate
            assert (window["index"], window["rows"], window["calibrated"]) == (2, 99, True)
            assert quality["estimate"]["unestimated_calls"] == 1
            realized = np.mean(np.array(truth) == np.array(predicted[:300]))  # ~0.95, same inputs, same model
            assert abs(window["estimated_accuracy"] - realized) < 0.06
            assert (window["below_target"], window["low_windows"]) == (True, 2)  # the 2nd and 3rd windows
            missing = next(d for d in window["data_quality"] if (d["series"], d["check"]) == ("input[1]", "missing"))
            assert missing["ratio"] == 0.01
            assert quality["estimate"]["labelled"] == {"iris v1": 200}
            realized = proxy.status()["routes"][0]["drift"]["ground_truth"]["latest"][0]["metrics"]["accuracy"]
            assert window["realized_accuracy"] == realized  # the latest realized accuracy, next to the estimate
            status, metrics = await asyncio.to_thread(http_get, f"http://127.0.0.1:{proxy.admin_port}/metrics")
            assert status == 200
            labels = 'model="iris",route="iris",version="1"'
            name = f"mlmirror_quality_estimated_accuracy{{{labels}}}"
            (line,) = [x for x in metrics.splitlines() if x.startswith(name)]
            assert float(line.split()[-1]) == pytest.approx(window["estimated_accuracy"], abs=1e-5)
            assert f"mlmirror_quality_estimate_below_target{{{labels}}} 1.0" in metrics
            ratio = 'mlmirror_data_quality_ratio{check="missing",model="iris",route="iris",series="input[1]",'
            assert ratio + 'version="1"} 0.01' in metrics
            text = render_drift(proxy.status())
            assert "estimate (calibrated): accuracy" in text
            assert "BELOW TARGET for 2 windows" in text


class RegionModel(ModelServicer):
    """The production demo model behind a second input, ``region`` (BYTES [n]): the model reads ``input`` only, as
    a model with a feature it does not use (the segment) would."""

    async def ModelInfer(self, request, context):  # noqa: N802 - gRPC method name
        kept = inference_pb2.ModelInferRequest(model_name=request.model_name, id=request.id)
        kept.inputs.append(request.inputs[0])
        kept.raw_input_contents.append(request.raw_input_contents[0])
        return await super().ModelInfer(kept, context)


def region_request(x: np.ndarray, region: bytes, request_id: str) -> bytes:
    request = inference_pb2.ModelInferRequest(model_name="iris", id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, "<f4").tobytes())
    request.inputs.add(name="region", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(region).to_bytes(4, "little") + region)
    return request.SerializeToString()


async def test_segments_through_the_proxy_with_outcomes_over_grpc():
    rng = np.random.default_rng(10)
    server = grpc.aio.server()
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(RegionModel(MODELS["production"]), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        config = f"""
        mirror_shed_lag: off
        upstreams: {{production: 127.0.0.1:{port}}}
        routes:
          - name: iris
            match: {{model: iris}}
            primary: production
            drift:
              window: 200
              capture: 200
              segment: region
              segment_values: 2
              ground_truth: {{output: probabilities, window: 200, calibration: 0}}
        """
        async with through_proxy(config) as (proxy, channel):
            infer = channel.unary_unary(MODEL_INFER)
            engine = proxy.parts.get("iris", "drift").engine
            regions = [b"north", b"south", b"east"]
            # North, south, east in 5:3:2; east's flowers are shifted towards the class boundaries.
            region = [regions[int(rng.choice(3, p=[0.5, 0.3, 0.2]))] for _ in range(600)]
            x = [sample_features(rng, 1, shift=1.2 if r == b"east" else 0.0) for r in region]
            # The truth: the nearest class mean (standardized), which the model misses near the boundaries.
            truth = [str(int(np.argmin((((f[0] - CLASS_MEANS) / 0.4) ** 2).sum(axis=1)))) for f in x]
            ids = [f"c{i}" for i in range(600)]
            # In three steps, each counted before the next: the capture (reference), window 0, window 1.
            for lo, hi in ((0, 200), (200, 400), (400, 600)):
                await asyncio.gather(*(infer(region_request(x[i], region[i], ids[i])) for i in range(lo, hi)))
                await wait_until(lambda hi=hi: engine.queued == 0 and engine.accepted == hi, what="calls counted")
                if hi == 400:  # the outcomes of window 0 over gRPC: the realized figures per segment
                    report = channel.unary_unary("/mlmirror.v1.Feedback/ReportOutcome",
                                                 feedback_pb2.ReportOutcomeRequest.SerializeToString,
                                                 feedback_pb2.ReportOutcomeResponse.FromString)  # fmt: skip
                    outcomes = [feedback_pb2.Outcome(request_id=ids[i], labels=[truth[i]]) for i in range(200, 400)]
                    assert (await report(feedback_pb2.ReportOutcomeRequest(outcomes=outcomes))).matched == 200
            await wait_until(lambda: engine.windows.get(("iris", "1")) == 2, what="two windows")
            (window,) = proxy.status()["routes"][0]["drift"]["quality"]["latest"]
            status, metrics = await asyncio.to_thread(http_get, f"http://127.0.0.1:{proxy.admin_port}/metrics")
    finally:
        await server.stop(None)
    assert status == 200
    kept = sorted(regions, key=lambda r: -region[:200].count(r))[:2]  # the reference's two most frequent
    assert [s["name"] for s in window["segments"]] == [*(r.decode() for r in kept), "other"]
    probabilities = np.concatenate([MODELS["production"].predict(f)[0] for f in x]).astype(np.float64)
    predicted = probabilities.argmax(axis=1)
    group = np.array([kept.index(r) if r in kept else 2 for r in region])
    correct = predicted == np.array([int(t) for t in truth])
    estimates = []
    for s, segment in enumerate(window["segments"]):
        live = np.flatnonzero(group[400:] == s) + 400
        joined = np.flatnonzero(group[200:400] == s) + 200
        assert segment["rows"] == live.size
        assert segment["shares"] == pytest.approx(np.bincount(predicted[live], minlength=3) / live.size, abs=1e-6)
        estimates.append(probabilities[live].max(axis=1).mean())  # calibration 0: assumed calibrated
        assert segment["estimated_accuracy"] == pytest.approx(estimates[-1], abs=1e-6)
        assert segment["outcome_rows"] == joined.size
        assert segment["accuracy"] == pytest.approx(correct[joined].mean(), abs=1e-6)
    assert window["segments"][-1]["estimated_accuracy"] == min(w["estimated_accuracy"] for w in window["segments"])
    assert window["gaps"]["estimated_accuracy"] == pytest.approx(max(estimates) - min(estimates), abs=1e-6)
    assert 'mlmirror_segment_rows{model="iris",route="iris",segment="other",version="1"}' in metrics
    assert 'mlmirror_segment_gap{gap="demographic_parity",model="iris",route="iris",version="1"}' in metrics


def test_what_waits_for_outcomes_is_bounded_and_stops_once_calibrated():
    rng = np.random.default_rng(13)
    engine = DriftEngine("m", spec(calibration=20, max_pending=50))
    x, p, y = world(rng, 1300, 1.5)
    feed(engine, (call(f"a{i}", x[i : i + 1], p[i : i + 1]) for i in range(1200)))
    assert len(engine.quality._pending) == 50  # the 1200 - 1000 windowed calls, the oldest forgotten
    for i in range(1150, 1200):
        label = "cat" if i % 10 == 0 else str(y[i])  # not a class index: left out of the calibration
        assert engine.ground_truth.report(f"a{i}", [], [label]) == "matched"
    assert engine.quality.calibration() == {("m", "1"): 20}  # fitted on the first 20 class-index labels
    assert len(engine.quality._pending) == 0
    feed(engine, (call(f"b{i}", x[i : i + 1], p[i : i + 1]) for i in range(1200, 1300)))
    assert len(engine.quality._pending) == 0  # calibrated and no segment: nothing waits any more


def test_outcomes_reported_before_their_call_still_calibrate():
    """An early outcome waits in the feedback service's park and joins when the worker stores the prediction,
    before the quality monitor has seen the call: it must still count in the labelled reference."""
    from mlmirror.observing.groundtruth.park import OutcomePark

    rng = np.random.default_rng(14)
    engine = DriftEngine("m", spec(calibration=30))
    engine.ground_truth.park = OutcomePark(100, 60.0)
    x, p, y = world(rng, 1030, 1.5)
    feed(engine, (call(f"a{i}", x[i : i + 1], p[i : i + 1]) for i in range(1000)))  # the capture
    for i in range(1000, 1030):  # the outcomes first ...
        assert engine.ground_truth.park.park_unless(engine.ground_truth.knows, f"a{i}", ([], [str(y[i])]))
    feed(engine, (call(f"a{i}", x[i : i + 1], p[i : i + 1]) for i in range(1000, 1030)))  # ... then the calls
    assert engine.ground_truth.snapshot()["results"]["matched"] == 30
    assert engine.quality.calibration() == {("m", "1"): 30}
    assert len(engine.quality._early) == 0
