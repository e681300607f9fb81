"""Shadows, against real gRPC servers on 127.0.0.1: sampling by hash, fire-and-forget isolation from slow, hung and
dead shadows, comparison figures against numpy, the promotion verdict and ``promote`` under traffic."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from mlmirror.demo.models import MODELS, serve_model
from mlmirror.demo.traffic import infer_request
from mlmirror.protocol.names import REQUEST_ID, SHADOW
from mlmirror.runtime.proxy import Proxy
from mlmirror.serving.sampling import sampled
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    ECHO,
    REPO,
    EchoServer,
    FunctionModel,
    http_get,
    model_server,
    promtool_accepts,
    through_proxy,
    wait_until,
)

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class Answer:
    code: grpc.StatusCode
    seconds: float
    trailers: dict[str, str | bytes]
    response: bytes | None


async def call(channel: grpc.aio.Channel, method: str, request: bytes, deadline: float = 10.0) -> Answer:
    started = time.perf_counter()
    rpc = channel.unary_unary(method)(request, timeout=deadline)
    try:
        response = await rpc
    except grpc.aio.AioRpcError:
        response = None
    trailers = dict(await rpc.trailing_metadata() or ())
    return Answer(await rpc.code(), time.perf_counter() - started, trailers, response)


async def calls(channel: grpc.aio.Channel, method: str, requests: list[bytes], concurrency: int = 8) -> list[Answer]:
    """Send ``requests`` with at most ``concurrency`` in flight; answers in request order."""
    limit = asyncio.Semaphore(concurrency)

    async def one(request: bytes) -> Answer:
        async with limit:
            return await call(channel, method, request)

    return list(await asyncio.gather(*(one(r) for r in requests)))


def steady(config: str) -> str:
    """``config`` with load shedding off: on a busy test machine a late event loop would shed copies, and these
    tests count every copy exactly. (Shedding has its own test.)"""
    return "mirror_shed_lag: off\n" + textwrap.dedent(config)


def shadow(proxy: Proxy, route: str, name: str):
    return proxy.parts.get(route, "shadows").shadow(name)


def shadow_status(proxy: Proxy, route: str, name: str) -> dict:
    entry = next(r for r in proxy.status()["routes"] if r["name"] == route)
    return next(s for s in entry["shadows"] if s["name"] == name)


def features(rng: np.random.Generator, rows: int = 2) -> np.ndarray:
    return rng.normal(size=(rows, 4)).astype(np.float32)


def accounted(proxy: Proxy, route: str, name: str) -> int:
    """Copies finished, dropped, in flight or queued: every sampled call must be one of them."""
    mirror = shadow(proxy, route, name)
    stats = mirror.stats
    return sum(stats.results.values()) + sum(stats.drops.values()) + mirror.inflight + mirror.queued


# --- sampling ---------------------------------------------------------------------------------------------------


async def test_each_shadow_gets_exactly_the_calls_its_hash_samples():
    async with (
        EchoServer("primary") as primary,
        EchoServer("s10") as s10,
        EchoServer("s30") as s30,
        EchoServer("all") as everything,
    ):
        config = f"""
        method_types: {{{ECHO}Unary: unary_unary}}
        upstreams: {{primary: {primary.address}, s10: {s10.address}, s30: {s30.address}, all: {everything.address}}}
        routes:
          - match: {{}}
            primary: primary
            shadows:
              - {{upstream: s10, percent: 10}}
              - {{upstream: s30, percent: 30}}
              - {{upstream: all}}
        """
        async with through_proxy(steady(config)) as (proxy, channel):
            # Echo calls carry no id: the proxy assigns one, sends it upstream and returns it in the trailers.
            echo = await calls(channel, ECHO + "Unary", [b"x%d" % i for i in range(300)])
            # ModelInfer calls carry their own id in the request.
            rng = np.random.default_rng(1)
            kserve_ids = [f"req-{i}" for i in range(300)]
            infer = await calls(channel, MODEL_INFER, [infer_request(features(rng), request_id=i) for i in kserve_ids])
            assert {a.code for a in echo + infer} == {grpc.StatusCode.OK}
            assert [a.trailers[REQUEST_ID] for a in infer] == kserve_ids
            ids = [str(a.trailers[REQUEST_ID]) for a in echo] + kserve_ids
            assert len(set(ids)) == 600
            expected = {name: {i for i in ids if sampled(i, pct)} for name, pct in (("s10", 10), ("s30", 30))}
            await wait_until(
                lambda: (
                    (len(s10.received), len(s30.received), len(everything.received))
                    == (len(expected["s10"]), len(expected["s30"]), 600)
                ),
                what="every sampled copy to arrive",
            )
            for server in (s10, s30):
                got = [r.metadata[REQUEST_ID] for r in server.received]
                assert len(got) == len(set(got))
                assert set(got) == expected[server.name]
                assert {r.metadata[SHADOW] for r in server.received} == {server.name}
            assert expected["s10"] <= expected["s30"]
            assert 0.05 < len(expected["s10"]) / 600 < 0.15
            assert 0.24 < len(expected["s30"]) / 600 < 0.36
            # The primary saw every call with its id; the copies carry the client's bytes untouched.
            assert sorted(r.metadata[REQUEST_ID] for r in primary.received) == sorted(ids)
            sent = {r.metadata[REQUEST_ID]: r.requests[0] for r in primary.received}
            assert all(r.requests[0] == sent[r.metadata[REQUEST_ID]] for r in everything.received)


async def test_a_client_supplied_request_id_is_used_and_not_duplicated():
    async with EchoServer("primary") as primary, EchoServer("s") as s:
        config = f"""
        method_types: {{{ECHO}Unary: unary_unary}}
        upstreams: {{primary: {primary.address}, s: {s.address}}}
        routes: [{{match: {{}}, primary: primary, shadows: [{{upstream: s}}]}}]
        """
        async with through_proxy(steady(config)) as (_, channel):
            rpc = channel.unary_unary(ECHO + "Unary")(b"hi", metadata=((REQUEST_ID, "mine-1"),))
            assert await rpc == b"primary:hi"
            assert dict(await rpc.trailing_metadata())[REQUEST_ID] == "mine-1"
            await wait_until(lambda: len(s.received) == 1)
            for server in (primary, s):
                assert [v for k, v in server.received[0].metadata_items if k == REQUEST_ID] == ["mine-1"]


# --- isolation ----------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def silent_listener():
    """A TCP port that accepts connections and never says a word: a shadow that never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()


@contextlib.asynccontextmanager
async def killable_model(role: str):
    server, port = await serve_model(MODELS[role], "127.0.0.1:0")
    try:
        yield server, port
    finally:
        await server.stop(None)


async def test_slow_hung_and_killed_shadows_never_touch_production():
    rng = np.random.default_rng(2)
    async with (
        model_server("production") as production,
        EchoServer("slow", sleep=10.0) as slow,
        silent_listener() as hung,
        killable_model("candidate") as (killed_server, killed_port),
    ):
        bounds = "max_inflight: 4, queue_size: 8, timeout: 30s"
        config = f"""
        upstreams:
          production: 127.0.0.1:{production}
          slow: {slow.address}
          hung: 127.0.0.1:{hung}
          killed: {{address: 127.0.0.1:{killed_port}, circuit: {{failures: 3, ejection: 60s, max_ejection: 60s}}}}
        routes:
          - match: {{model: iris}}
            primary: production
            shadows:
              - {{upstream: slow, {bounds}}}
              - {{upstream: hung, {bounds}}}
              - {{upstream: killed, {bounds}}}
        """
        async with through_proxy(steady(config)) as (proxy, channel):
            mirrors = [shadow(proxy, "iris", name) for name in ("slow", "hung", "killed")]
            peak = {m.name: (0, 0) for m in mirrors}

            async def watch() -> None:
                while True:
                    for m in mirrors:
                        peak[m.name] = (max(peak[m.name][0], m.inflight), max(peak[m.name][1], m.queued))
                    await asyncio.sleep(0.005)

            watcher = asyncio.get_running_loop().create_task(watch())
            first = await calls(channel, MODEL_INFER, [infer_request(features(rng)) for _ in range(150)])
            await killed_server.stop(None)  # the shadow dies mid-traffic
            second = await calls(channel, MODEL_INFER, [infer_request(features(rng)) for _ in range(250)])
            watcher.cancel()
            answers = first + second
            assert {a.code for a in answers} == {grpc.StatusCode.OK}
            assert {a.trailers["x-mlmirror-served-by"] for a in answers} == {"production"}
            # Production never waited for a shadow: the slow one takes 10 s, the hung one forever (a bound well
            # under 10 s proves it; a tighter one would only measure how busy the machine is).
            assert max(a.seconds for a in answers) < 5.0
            for name in ("slow", "hung", "killed"):
                inflight, queued = peak[name]
                assert inflight <= 4, name
                assert queued <= 8, name
                assert accounted(proxy, "iris", name) == 400, name
            slow_status, hung_status = shadow_status(proxy, "iris", "slow"), shadow_status(proxy, "iris", "hung")
            assert slow_status["dropped"]["queue_full"] == 400 - 4 - 8
            assert hung_status["dropped"]["queue_full"] == 400 - 4 - 8
            killed = shadow_status(proxy, "iris", "killed")
            assert killed["mirrored"].get("OK", 0) >= 100
            assert killed["mirrored"].get("UNAVAILABLE", 0) >= 3
            assert killed["dropped"]["circuit_open"] > 100
            assert killed["circuit_open"]


# --- comparison -------------------------------------------------------------------------------------------------


def doubled(x: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    y = (x * 2).astype(np.float32)
    return [("y", "FP32", y), ("label", "INT64", y.argmax(axis=1).astype(np.int64))]


def doubled_with_error(x: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """Production's answer plus a known error that moves some argmaxes; labels recomputed."""
    y = (x * 2 + 0.5 * x[:, :1] * np.array([1.0, 0.0, -1.0, 0.5])).astype(np.float32)
    return [("y", "FP32", y), ("label", "INT64", y.argmax(axis=1).astype(np.int64))]


@pytest.mark.parametrize(
    ("transport", "listed", "used"), [("auto", False, "h2"), ("grpc", False, "grpc"), ("auto", True, "grpc")]
)
async def test_comparison_figures_match_numpy(transport: str, listed: bool, used: str):
    """Over each transport; ``auto`` with a list of addresses (gRPC's name resolution) takes grpc.aio."""
    rng = np.random.default_rng(3)
    async with FunctionModel(doubled) as production, FunctionModel(doubled_with_error) as candidate:
        address = f'"ipv4:{candidate.address},{candidate.address}"' if listed else candidate.address
        config = f"""
        upstreams: {{production: {production.address}, candidate: {address}}}
        routes:
          - match: {{}}
            primary: production
            shadows: [{{upstream: candidate, transport: {transport}}}]
            compare: {{classification: argmax, output: y, atol: 0.01, rtol: 0.0}}
            promotion: {{window: 1000, min_samples: 10}}
        """
        inputs = [features(rng, rows=3) for _ in range(60)]
        async with through_proxy(steady(config)) as (proxy, channel):
            answers = await calls(channel, MODEL_INFER, [infer_request(x) for x in inputs])
            assert {a.code for a in answers} == {grpc.StatusCode.OK}
            await wait_until(lambda: shadow_status(proxy, "default", "candidate")["window"]["calls"] == 60)
            got = shadow_status(proxy, "default", "candidate")
        # The same figures, computed naively from the inputs.
        diffs, agree, rows, matched = [], 0, 0, 0
        for x in inputs:
            p = {name: v for name, _, v in doubled(x)}
            s = {name: v for name, _, v in doubled_with_error(x)}
            d = np.concatenate(
                [np.abs(s[k].astype(np.float64) - p[k].astype(np.float64)).ravel() for k in ("y", "label")]
            )
            diffs.append(d)
            agree += int((p["y"].argmax(axis=1) == s["y"].argmax(axis=1)).sum())
            rows += len(x)
            matched += int(all(np.all(np.abs(s[k] - p[k]) <= 0.01) for k in ("y", "label")))
        d = np.concatenate(diffs)
        window = got["window"]
        assert window["samples"] == rows == 180
        assert window["agreement"] == round(agree / rows, 6)
        assert 0 < agree < rows  # the error moves some argmaxes, not all
        assert window["mae"] == round(float(d.mean()), 6)
        assert window["rmse"] == round(float(np.sqrt((d**2).mean())), 6)
        assert window["max_abs_error"] == round(float(d.max()), 6)
        assert got["comparisons"] == {"match": matched, "mismatch": 60 - matched, "error": 0}
        assert got["mirrored"] == {"OK": 60}
        assert got["transport"] == used


def wrong_shape(x: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    return [("y", "FP32", (x * 2).astype(np.float32)[:, :2]), ("label", "INT64", np.zeros(len(x), np.int64))]


def wrong_dtype(x: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    return [("y", "FP64", x.astype(np.float64) * 2), ("label", "INT64", np.zeros(len(x), np.int64))]


async def test_garbage_wrong_shapes_and_dtypes_are_comparison_errors():
    rng = np.random.default_rng(4)
    async with (
        FunctionModel(doubled) as production,
        EchoServer("garbage") as garbage,  # answers ModelInfer with "garbage:" + the request bytes
        FunctionModel(wrong_shape) as shapes,
        FunctionModel(wrong_dtype) as dtypes,
    ):
        config = f"""
        upstreams:
          production: {production.address}
          garbage: {garbage.address}
          shapes: {shapes.address}
          dtypes: {dtypes.address}
        routes:
          - match: {{}}
            primary: production
            shadows: [{{upstream: garbage}}, {{upstream: shapes}}, {{upstream: dtypes}}]
            compare: {{classification: argmax}}
        """
        async with through_proxy(steady(config)) as (proxy, channel):
            answers = await calls(channel, MODEL_INFER, [infer_request(features(rng)) for _ in range(40)])
            assert {a.code for a in answers} == {grpc.StatusCode.OK}
            names = ("garbage", "shapes", "dtypes")
            await wait_until(lambda: all(shadow_status(proxy, "default", n)["window"]["calls"] == 40 for n in names))
            reasons = {n: shadow_status(proxy, "default", n)["comparison_errors"] for n in names}
            assert reasons["shapes"] == {"shape_mismatch": 40}
            assert reasons["dtypes"] == {"dtype_mismatch": 40}
            assert sum(reasons["garbage"].values()) == 40
            for name in names:
                status = shadow_status(proxy, "default", name)
                assert status["comparisons"] == {"match": 0, "mismatch": 0, "error": 40}
                # Each incomparable answer counts as disagreement on every row production answered.
                assert status["window"]["samples"] == 80
                assert status["window"]["agreement"] == 0.0
                assert not status["promotable"]
            # The workers survived: later copies are still compared.
            more = await calls(channel, MODEL_INFER, [infer_request(features(rng)) for _ in range(5)])
            assert {a.code for a in more} == {grpc.StatusCode.OK}
            await wait_until(lambda: shadow_status(proxy, "default", "shapes")["window"]["calls"] == 45)


async def test_non_kserve_answers_are_compared_as_bytes():
    async with EchoServer("same") as primary, EchoServer("same") as twin, EchoServer("other") as other:
        config = f"""
        method_types: {{{ECHO}Unary: unary_unary}}
        upstreams: {{primary: {primary.address}, twin: {twin.address}, other: {other.address}}}
        routes: [{{match: {{}}, primary: primary, shadows: [{{upstream: twin}}, {{upstream: other}}]}}]
        """
        async with through_proxy(steady(config)) as (proxy, channel):
            await calls(channel, ECHO + "Unary", [b"m%d" % i for i in range(20)])
            await wait_until(lambda: shadow_status(proxy, "default", "other")["window"]["calls"] == 20)
            await wait_until(lambda: shadow_status(proxy, "default", "twin")["window"]["calls"] == 20)
            assert shadow_status(proxy, "default", "twin")["comparisons"]["match"] == 20
            assert shadow_status(proxy, "default", "other")["comparisons"]["mismatch"] == 20
            assert shadow_status(proxy, "default", "twin")["window"]["agreement"] == 1.0
            assert shadow_status(proxy, "default", "other")["window"]["agreement"] == 0.0


# --- verdict and promotion --------------------------------------------------------------------------------------


def probabilities(x: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    e = np.exp(x[:, :3] - x[:, :3].max(axis=1, keepdims=True))
    return [("probabilities", "FP32", (e / e.sum(axis=1, keepdims=True)).astype(np.float32))]


def shifted_probabilities(x: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """A degraded model: its favourite class is always the one after production's."""
    return [("probabilities", "FP32", np.roll(probabilities(x)[0][2], 1, axis=1))]


async def metric_value(proxy: Proxy, name: str, **labels: str) -> float:
    status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{proxy.admin_port}/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name}{labels}")


async def test_the_verdict_follows_the_evidence_both_ways():
    rng = np.random.default_rng(5)
    async with FunctionModel(probabilities) as production, FunctionModel(probabilities) as candidate:
        config = f"""
        upstreams: {{production: {production.address}, candidate: {candidate.address}}}
        routes:
          - name: iris
            match: {{}}
            primary: production
            shadows: [{{upstream: candidate}}]
            compare: {{classification: argmax}}
            promotion: {{window: 100, min_samples: 40, agreement: 0.9, latency_factor: 100}}
        """
        async with through_proxy(steady(config)) as (proxy, channel):

            def copies() -> int:  # copies finished so far: unlike the window's calls, never capped
                return sum(shadow_status(proxy, "iris", "candidate")["mirrored"].values())

            async def send(n: int) -> dict:
                before = copies()
                answers = await calls(channel, MODEL_INFER, [infer_request(features(rng, rows=1)) for _ in range(n)])
                assert {a.code for a in answers} == {grpc.StatusCode.OK}
                await wait_until(lambda: copies() == before + n)
                return shadow_status(proxy, "iris", "candidate")

            status = await send(20)
            assert not status["promotable"]
            assert status["reasons"] == ["needs 40 agreement samples, has 20"]
            assert await metric_value(proxy, "mlmirror_shadow_promotable", shadow="candidate") == 0
            status = await send(30)
            assert status["promotable"], status["reasons"]
            assert status["window"]["agreement"] == 1.0
            assert await metric_value(proxy, "mlmirror_shadow_promotable", shadow="candidate") == 1
            assert await metric_value(proxy, "mlmirror_shadow_agreement_samples", shadow="candidate") == 50
            candidate.outputs = shifted_probabilities  # the shadow degrades
            status = await send(20)
            assert not status["promotable"]  # 50 of 70 agree: lower bound ~0.6
            assert status["reasons"][0].startswith("agreement lower bound")
            status = await send(100)  # the window now holds only degraded answers
            assert status["window"]["agreement"] == 0.0
            assert await metric_value(proxy, "mlmirror_shadow_promotable", shadow="candidate") == 0
            candidate.outputs = probabilities  # ...and recovers
            status = await send(100)
            assert status["promotable"]


@pytest.mark.process
async def test_promote_under_traffic_fails_no_call():
    rng = np.random.default_rng(6)
    async with (
        FunctionModel(probabilities) as production,
        FunctionModel(probabilities) as candidate,
        FunctionModel(probabilities) as twin,
    ):
        config = f"""
        upstreams: {{production: {production.address}, candidate: {candidate.address}, twin: {twin.address}}}
        routes:
          - name: iris
            match: {{model: iris}}
            primary: production
            shadows: [{{upstream: candidate}}, {{upstream: twin, control: true}}]
            compare: {{classification: argmax}}
            promotion: {{window: 200, min_samples: 50, agreement: 0.9, latency_factor: 100}}
        """
        async with through_proxy(steady(config)) as (proxy, channel):
            admin = f"127.0.0.1:{proxy.admin_port}"

            async def post(query: str) -> tuple[int, str]:
                return await asyncio.to_thread(http_get, f"http://{admin}/promote?{query}", "POST")

            assert await post("route=iris&shadow=nope") == (
                404, "not promoted: route 'iris' has no shadow 'nope' (its shadows: candidate, twin)\n"
            )  # fmt: skip
            code, text = await post("route=nope&shadow=candidate")
            assert (code, text) == (404, "not promoted: no route 'nope' (routes: iris)\n")
            code, text = await post("route=iris&shadow=candidate")
            assert code == 409
            assert "not promotable: needs 50 agreement samples" in text
            code, text = await post("route=iris&shadow=twin&force=1")
            assert code == 409
            assert "is the control of route 'iris'" in text

            stop = asyncio.Event()
            answers: list[Answer] = []

            async def traffic() -> None:
                while not stop.is_set():
                    answers.extend(
                        await calls(channel, MODEL_INFER, [infer_request(features(rng, 1)) for _ in range(16)])
                    )

            workers = [asyncio.get_running_loop().create_task(traffic()) for _ in range(2)]
            await wait_until(lambda: shadow_status(proxy, "iris", "candidate")["promotable"], what="promotable")
            # The command line asks the admin endpoint, as an operator would.
            shown = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "mlmirror", "shadows", "--admin", admin],
                capture_output=True, text=True, cwd=REPO, timeout=30,
            )  # fmt: skip
            assert shown.returncode == 0, shown.stderr
            header, *rows = shown.stdout.splitlines()
            assert header.split()[:3] == ["ROUTE", "SHADOW", "%"]
            assert rows[0].split()[:2] == ["iris", "candidate"]
            assert rows[0].split()[-1] == "PROMOTABLE"
            assert rows[1].split()[:2] == ["iris", "twin"]
            assert rows[1].split()[-1] == "control"
            promoted = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "mlmirror", "promote", "iris", "candidate", "--admin", admin],
                capture_output=True, text=True, cwd=REPO, timeout=30,
            )  # fmt: skip
            assert promoted.returncode == 0, promoted.stderr
            assert "route iris: primary is now candidate (was production, now shadow)" in promoted.stdout
            served_before = production.calls
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*workers)

            assert len(answers) > 200
            assert {a.code for a in answers} == {grpc.StatusCode.OK}
            served = [a.trailers["x-mlmirror-served-by"] for a in answers]
            assert served[0] == "production"
            assert set(served) == {"production", "candidate"}
            after = await calls(channel, MODEL_INFER, [infer_request(features(rng, 1)) for _ in range(16)])
            assert {a.trailers["x-mlmirror-served-by"] for a in after} == {"candidate"}
            route = proxy.status()["routes"][0]
            assert route["primary"] == "candidate"
            assert [s["name"] for s in route["shadows"]] == ["production", "twin"]
            await wait_until(lambda: shadow_status(proxy, "iris", "production")["window"]["calls"] > 0)
            assert production.calls > served_before  # now as a shadow
            assert proxy.status()["promotions"][0]["route"] == "iris"
            unknown = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "mlmirror", "promote", "iris", "ghost", "--admin", admin],
                capture_output=True, text=True, cwd=REPO, timeout=30,
            )  # fmt: skip
            assert unknown.returncode == 1
            assert "route 'iris' has no shadow 'ghost' (its shadows: production, twin)" in unknown.stderr


def test_promoted_config_demotes_the_old_primary_as_configured():
    from mlmirror.config import parse_config
    from mlmirror.observing.shadows.promotion import promoted_config

    text = """
    upstreams: {a: 127.0.0.1:1, b: 127.0.0.1:2, c: 127.0.0.1:3}
    routes:
      - match: {}
        primary: a
        fallback: [b, c]
        shadows: [{upstream: b, percent: 25, timeout: 1s}]
        promotion: {demote_to: DEMOTE}
    """
    as_shadow = promoted_config(parse_config(text.replace("DEMOTE", "shadow")), "default", "b").routes[0]
    assert (as_shadow.primary, as_shadow.fallback) == ("b", ("c",))
    assert [(s.name, s.upstream, s.percent, s.timeout) for s in as_shadow.shadows] == [("a", "a", 25.0, 1.0)]
    as_fallback = promoted_config(parse_config(text.replace("DEMOTE", "fallback")), "default", "b").routes[0]
    assert (as_fallback.primary, as_fallback.fallback, as_fallback.shadows) == ("b", ("a", "c"), ())
    dropped = promoted_config(parse_config(text.replace("DEMOTE", "none")), "default", "b").routes[0]
    assert (dropped.primary, dropped.fallback, dropped.shadows) == ("b", ("c",), ())


# --- drops, failures, metrics -----------------------------------------------------------------------------------


async def test_failed_production_calls_are_still_mirrored_and_counted_against_production():
    async with EchoServer("primary", fail_with=grpc.StatusCode.INTERNAL) as primary, EchoServer("s") as s:
        config = f"""
        method_types: {{{ECHO}Unary: unary_unary}}
        upstreams: {{primary: {primary.address}, s: {s.address}}}
        routes: [{{match: {{}}, primary: primary, shadows: [{{upstream: s}}]}}]
        """
        async with through_proxy(steady(config)) as (proxy, channel):
            answers = await calls(channel, ECHO + "Unary", [b"m%d" % i for i in range(10)])
            assert {a.code for a in answers} == {grpc.StatusCode.INTERNAL}
            assert all(REQUEST_ID in a.trailers for a in answers)
            await wait_until(lambda: len(s.received) == 10)
            await wait_until(lambda: shadow_status(proxy, "default", "s")["window"]["calls"] == 10)
            window = shadow_status(proxy, "default", "s")["window"]
            assert (window["production_error_ratio"], window["shadow_error_ratio"], window["samples"]) == (1.0, 0.0, 0)


async def test_oversized_requests_are_not_mirrored():
    async with EchoServer("primary") as primary, EchoServer("s") as s:
        config = f"""
        method_types: {{{ECHO}Unary: unary_unary}}
        upstreams: {{primary: {primary.address}, s: {s.address}}}
        routes: [{{match: {{}}, primary: primary, shadows: [{{upstream: s, max_message_size: 100}}]}}]
        """
        async with through_proxy(steady(config)) as (proxy, channel):
            answers = await calls(channel, ECHO + "Unary", [b"x" * 101, b"y" * 100, b"z" * 5000])
            assert [a.response for a in answers] == [b"primary:" + b"x" * 101, b"primary:" + b"y" * 100,
                                                     b"primary:" + b"z" * 5000]  # fmt: skip
            await wait_until(lambda: len(s.received) == 1)
            assert s.received[0].requests == [b"y" * 100]
            assert shadow_status(proxy, "default", "s")["dropped"] == {"too_large": 2}


async def test_mirror_work_is_shed_first_when_the_event_loop_runs_late():
    async with EchoServer("primary") as primary, EchoServer("s") as s:
        config = f"""
        mirror_shed_lag: 5ms
        method_types: {{{ECHO}Unary: unary_unary}}
        upstreams: {{primary: {primary.address}, s: {s.address}}}
        routes: [{{match: {{}}, primary: primary, shadows: [{{upstream: s}}]}}]
        """
        async with through_proxy(config) as (proxy, channel):
            busy = asyncio.Event()

            async def hog() -> None:  # something on the loop that blocks it for 30 ms at a time
                while not busy.is_set():
                    time.sleep(0.03)  # noqa: ASYNC251 - blocking the loop is the point
                    await asyncio.sleep(0.001)

            hogging = asyncio.get_running_loop().create_task(hog())
            await wait_until(lambda: proxy.lag.overloaded, what="the lag monitor to notice")
            answers = await calls(channel, ECHO + "Unary", [b"m%d" % i for i in range(40)], concurrency=1)
            busy.set()
            await hogging
            assert {a.code for a in answers} == {grpc.StatusCode.OK}
            shed = shadow_status(proxy, "default", "s")["dropped"].get("shed", 0)
            assert shed > 0
            assert await metric_value(proxy, "mlmirror_mirror_dropped_total", shadow="s", reason="shed") == shed
            await wait_until(lambda: not proxy.lag.overloaded, what="the loop to recover")
            before = len(s.received)
            await calls(channel, ECHO + "Unary", [b"later"])
            await wait_until(lambda: len(s.received) == before + 1, what="mirroring to resume")
            assert proxy.status()["event_loop"]["max_lag_seconds"] > 0.005


async def test_reload_keeps_unchanged_shadows_and_their_statistics():
    async with EchoServer("primary") as primary, EchoServer("s") as s, EchoServer("t") as t:
        base = f"""
        method_types: {{{ECHO}Unary: unary_unary}}
        upstreams: {{primary: {primary.address}, s: {s.address}, t: {t.address}}}
        routes: [{{match: {{}}, primary: primary, shadows: [{{upstream: s}}, {{upstream: t, percent: PCT}}]}}]
        """
        async with through_proxy(steady(base.replace("PCT", "100"))) as (proxy, channel):
            await calls(channel, ECHO + "Unary", [b"a", b"b"])
            await wait_until(lambda: len(s.received) == 2 and len(t.received) == 2)
            kept, changed = shadow(proxy, "default", "s"), shadow(proxy, "default", "t")
            from mlmirror.config import parse_config

            await proxy.reload(parse_config(steady(base.replace("PCT", "50")), "<reload>"))
            assert shadow(proxy, "default", "s") is kept
            assert shadow(proxy, "default", "t") is not changed
            assert shadow_status(proxy, "default", "s")["mirrored"] == {"OK": 2}
            assert shadow_status(proxy, "default", "t")["mirrored"] == {}


@pytest.mark.process
async def test_shadow_metrics_are_exported_and_pass_promtool():

    rng = np.random.default_rng(7)
    async with FunctionModel(probabilities) as production, FunctionModel(shifted_probabilities) as candidate:
        config = f"""
        upstreams: {{production: {production.address}, candidate: {candidate.address}}}
        routes:
          - name: iris
            match: {{}}
            primary: production
            shadows: [{{upstream: candidate}}]
            compare: {{classification: argmax}}
        """
        async with through_proxy(steady(config)) as (proxy, channel):
            await calls(channel, MODEL_INFER, [infer_request(features(rng)) for _ in range(10)])
            await wait_until(lambda: shadow_status(proxy, "iris", "candidate")["window"]["calls"] == 10)
            status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{proxy.admin_port}/metrics")
    assert status == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    key = (("route", "iris"), ("shadow", "candidate"))

    def value(name: str, **extra: str) -> float:
        return samples[(name, tuple(sorted((*key, *extra.items()))))]

    assert value("mlmirror_mirror_requests_total", result="OK") == 10
    assert value("mlmirror_mirror_dropped_total", reason="queue_full") == 0
    assert value("mlmirror_shadow_comparisons_total", result="mismatch") == 10
    assert value("mlmirror_shadow_agreement_ratio") == 0.0
    assert value("mlmirror_shadow_agreement_samples") == 20
    assert value("mlmirror_shadow_window_calls") == 10
    assert value("mlmirror_shadow_error_ratio") == 0.0
    assert value("mlmirror_shadow_production_error_ratio") == 0.0
    assert value("mlmirror_shadow_latency_seconds_count") == 10
    assert value("mlmirror_shadow_latency_p99_seconds", side="shadow") > 0
    assert value("mlmirror_shadow_abs_error", stat="max") > 0
    assert value("mlmirror_shadow_promotable") == 0
    assert value("mlmirror_shadow_agreement_lower_bound") == 0.0
    await asyncio.to_thread(promtool_accepts, body)
