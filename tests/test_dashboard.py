"""The dashboard's server side: the history ring (bounded, counting what happened in each bucket), its endpoints
on a real proxy (the token, the assets), and the assets being package data."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from importlib import resources

import pytest
from mlmirror.admin.dashboard import ASSETS
from mlmirror.admin.history import History, quantile

from tests.support import guarded_proxy, http_get, wait_until


def exposition(ok: float, buckets: dict[str, float]) -> bytes:
    lines = [
        "# TYPE mlmirror_requests_total counter",
        f'mlmirror_requests_total{{grpc_code="OK",role="primary",route="r",upstream="p"}} {ok}',
        "# TYPE mlmirror_request_duration_seconds histogram",
        *(f'mlmirror_request_duration_seconds_bucket{{le="{le}",role="primary",route="r",upstream="p"}} {n}'
          for le, n in buckets.items()),
        f'mlmirror_request_duration_seconds_count{{role="primary",route="r",upstream="p"}} {buckets["+Inf"]}',
        'mlmirror_request_duration_seconds_sum{role="primary",route="r",upstream="p"} 1.0',
    ]  # fmt: skip
    return ("\n".join(lines) + "\n").encode()


class Scripted:
    """A target whose status and metrics the test sets."""

    def __init__(self) -> None:
        self.calls = 0
        self.window = 0

    async def status(self) -> dict:
        series = [{"name": f"input[{i}]", "kind": "feature", "method": "ks", "drifted": i == 2, "threshold": 0.01,
                   "scores": {"ks": 0.001 if i == 2 else 0.5, "psi": 0.1}} for i in range(8)]  # fmt: skip
        window = {"model": "m", "version": "1", "index": self.window, "ended": 1000.0 + 20 * self.window,
                  "feature_drift_share": 0.125, "drifted": ["input[2]"], "multivariate": None, "attribution": None,
                  "series": series}  # fmt: skip
        numbers = {"agreement": 0.97, "lower_bound": 0.93, "samples": 100, "mae": 0.1, "rmse": 0.2}
        shadow = {"name": "s", "promotable": False, "reasons": ["too few"], "dropped": {"shed": self.calls // 10},
                  "window": numbers}  # fmt: skip
        quality = {"model": "m", "version": "1", "index": self.window - 1, "rows": 50, "metrics": {"accuracy": 0.9}}
        drift = {"latest": [window], "ground_truth": {"latest": [quality]}}
        return {
            "routes": [{"name": "r", "calls": {"OK": self.calls}, "shadows": [shadow], "drift": drift}],
            "upstreams": {"p": {"circuit": {"state": "closed"}}},
            "config_reloads": {"success": 0},
        }

    async def exposition(self) -> tuple[bytes, str]:
        n = float(self.calls)
        return exposition(n, {"0.001": n / 2, "0.01": n, "+Inf": n}), "text/plain"


async def test_the_history_counts_what_happened_in_each_bucket_and_keeps_the_last_ones():
    target = Scripted()
    history = History(target.status, target.exposition, lambda: {"r": 0.9}, bucket=10, buckets=3, every=2)
    for second in range(0, 60, 2):  # 30 samples, 6 buckets of 10 s: the ring keeps 3
        target.calls = 20 * second  # 10 calls/s
        target.window = second // 20
        await history.sample(now=1000.0 + second)
    snapshot = history.snapshot()
    assert [b["t"] for b in snapshot["buckets"]] == [1030.0, 1040.0, 1050.0]
    for bucket in snapshot["buckets"]:
        route = bucket["routes"]["r"]
        assert route["calls"] == {"OK": 200.0}  # 20 calls/s... over each 10 s bucket's 5 samples, 4 deltas of 40
        assert route["served"] == {"primary": 200.0}
        assert route["latency"]["production"]["p50"] == pytest.approx(0.001)
        assert route["shadows"]["s"]["threshold"] == 0.9
        assert route["shadows"]["s"]["dropped"] == {"shed": 20.0}
    # a counter that restarted (a child came back) counts from zero, never negative
    target.calls = 30
    await history.sample(now=1060.0)
    assert history.snapshot()["buckets"][-1]["routes"]["r"]["calls"] == {"OK": 30.0}
    assert [w["index"] for w in snapshot["windows"]["r"]] == [0, 1, 2]  # each drift window kept once
    # ground truth joins a window later: its quality lands on the window it measured
    assert [w["quality"] for w in snapshot["windows"]["r"]] == [{"accuracy": 0.9}, {"accuracy": 0.9}, None]
    later = history.snapshot(since=1055.0)  # what the page asks after its first answer: the rest
    assert [b["t"] for b in later["buckets"]] == [1050.0, 1060.0]
    assert len(later["windows"]["r"]) == 3  # windows that ended within REJOIN seconds, for their late quality


async def test_the_history_is_sampled_once_a_bucket_until_a_page_asks_then_every_two_seconds():
    target = Scripted()
    history = History(target.status, target.exposition, dict, bucket=3600, buckets=3, every=2)
    await history.start()
    try:
        await wait_until(lambda: history.latest != {}, within=30, what="the first sample")
        assert not history.watched
        assert history.pause == 3600  # nobody looks: one sample per bucket (an hour here)
        target.calls = 7
        history.snapshot()  # a page asks: that wakes the sampler at once
        assert history.watched
        assert history.pause == 2
        await wait_until(lambda: history.latest["routes"][0]["calls"] == {"OK": 7}, within=30,
                         what="a sample at the page's ask, not a bucket later")  # fmt: skip
    finally:
        await history.close()


def test_quantiles_interpolate_within_a_bucket_like_prometheus():
    assert quantile(0.5, {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}) == pytest.approx(0.1)
    assert quantile(0.75, {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}) == pytest.approx(0.15)
    assert quantile(0.99, {0.1: 0.0, float("inf"): 10.0}) == pytest.approx(0.1)  # beyond the last bound
    assert quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None


async def test_an_hour_of_history_for_a_route_stays_within_its_stated_bound():
    target = Scripted()
    history = History(target.status, target.exposition, dict, bucket=10, buckets=360, every=10)
    await history.sample(now=0.0)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for n in range(1, 361):  # one sample per bucket and a new drift window each: the ring's whole hour
        target.calls, target.window = 100 * n, n
        await history.sample(now=10.0 * n)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(history.snapshot()["buckets"]) == 360
    assert used < 3 * 2**20, used  # docs/DASHBOARD.md: under 3 MiB per route for the hour


def test_the_assets_are_package_data():
    folder = resources.files("mlmirror.admin").joinpath("ui")
    assert folder.joinpath("index.html").is_file()
    for name in ASSETS:
        where = folder.joinpath("vendor", name) if name.startswith("uPlot") else folder.joinpath(name)
        assert where.is_file(), name
    assert "MIT" in folder.joinpath("vendor", "uPlot.LICENSE").read_text()


async def test_the_dashboard_endpoints_need_the_token_but_the_assets_do_not(tmp_path):
    async with guarded_proxy(tmp_path, "t0k") as base:
        status, body = await asyncio.to_thread(http_get, base + "/")
        assert status == 401
        assert "admin token" in body
        assert (await asyncio.to_thread(http_get, base + "/?token=wrong"))[0] == 401
        status, body = await asyncio.to_thread(http_get, base + "/?token=t0k")
        assert (status, "/ui?file=app.js" in body) == (200, True)
        assert (await asyncio.to_thread(http_get, base + "/", token="t0k"))[0] == 200
        status, body = await asyncio.to_thread(http_get, base + "/ui?file=uPlot.iife.min.js")
        assert (status, "uPlot" in body) == (200, True)
        status, body = await asyncio.to_thread(http_get, base + "/ui?file=../endpoints.py")
        assert (status, "no such asset" in body) == (404, True)
        assert (await asyncio.to_thread(http_get, base + "/history"))[0] == 401
        assert (await asyncio.to_thread(http_get, base + "/history?since=x", token="t0k"))[0] == 400

        for _ in range(300):  # the first sample is taken at once; 30 s at most
            code, body = await asyncio.to_thread(http_get, base + "/history", token="t0k")
            if code == 200 and json.loads(body)["buckets"]:
                break
            await asyncio.sleep(0.1)
        assert json.loads(body)["buckets"][0]["routes"]["default"]["calls"] == {}
        status, body = await asyncio.to_thread(http_get, base + "/nope", token="t0k")
        assert status == 404
        assert body.endswith("/status; dashboard: /, /history, /ui)\n")
