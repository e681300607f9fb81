"""The observing process of ``mlmirror serve`` (the default shape: a supervisor, one serving worker, one observer),
as real processes: calls never fail while the observer is killed, hung or restarted; every handed-off call is
accounted for; SIGTERM drains serving before observing; reloads and promotions reach both sides and survive a
restart of either."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ECHO, EchoServer, config_file, http_get, model_server, wait_until
from tests.test_workers import (
    MODEL_INFER,
    admin_get,
    echo_config,
    group_config,
    pids_alive,
    polled,
    process_group,
    send,
)

pytestmark = pytest.mark.slow


def status_of(admin: int) -> dict:
    code, body = http_get(f"http://127.0.0.1:{admin}/status")
    assert code == 200, body
    return json.loads(body)


def autogroup_nice(pid: int) -> str | None:
    """The niceness of ``pid``'s scheduling group where Linux groups by session (None where it does not)."""
    group = Path(f"/proc/{pid}/autogroup")
    return group.read_text().split()[-1] if group.exists() else None


def thread_policies(pid: int) -> list[int]:
    """The scheduling policy of each thread of ``pid``."""
    return [os.sched_getscheduler(int(task.name)) for task in Path(f"/proc/{pid}/task").iterdir()]


def samples_of(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def handoff_counts(text: str) -> tuple[float, float, float]:
    """(sent by the workers, dropped by the workers for any reason, received by the observer) in a /metrics text."""
    samples = samples_of(text)
    sent = sum(v for (name, _), v in samples.items() if name == "mlmirror_handoff_sent_total")
    dropped = sum(v for (name, _), v in samples.items() if name == "mlmirror_handoff_dropped_total")
    received = sum(v for (name, _), v in samples.items() if name == "mlmirror_handoff_received_total")
    return sent, dropped, received


async def served_by(listen: int, rng: np.random.Generator, calls: int = 6) -> set[str | bytes]:
    served = set()
    for _ in range(calls):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{listen}",
                                             options=[("grpc.use_local_subchannel_pool", 1)]) as channel:  # fmt: skip
            call = channel.unary_unary(MODEL_INFER)(infer_request(sample_features(rng, 1)), timeout=10)
            await call
            served.add(dict(await call.trailing_metadata())["x-mlmirror-served-by"])
    return served


async def watched_again(listen: int, admin: int, rng: np.random.Generator, within: float = 60.0) -> dict:
    """Send calls until the observer's shadow window has some (the worker reconnects after a restart)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        await send(listen, 20, rng, "again", channels=2)
        state = await asyncio.to_thread(status_of, admin)
        if state["observer"]["up"] and state["routes"][0]["shadows"][0]["window"]["calls"] > 0:
            return state
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the observer saw no call within {within}s: {state}")
        await asyncio.sleep(0.2)


async def test_calls_never_fail_while_the_observer_is_killed_hung_or_restarted(tmp_path):
    async with model_server("production") as production, model_server("candidate") as candidate:
        config, listen, admin = group_config(tmp_path, production, candidate)
        async with process_group(config, admin, tmp_path / "group.log", workers=1):
            rng = np.random.default_rng(7)
            state = await asyncio.to_thread(status_of, admin)
            assert state["observer"]["up"]
            assert state["observer"]["nice"] == 10
            first = state["observer"]["pid"]
            base = os.getpriority(os.PRIO_PROCESS, 0)  # the test's own niceness (higher when run under `nice`)
            assert os.getpriority(os.PRIO_PROCESS, first) == min(19, base + 10)  # it runs below the serving worker
            assert os.getpriority(os.PRIO_PROCESS, state["workers"][0]["pid"]) == base
            assert state["observer"]["scheduling"] == "nice"
            intake = state["observer"]["intake"]
            assert intake["shed"] == {"cpu_pressure": 0, "cpu_limit": 0}  # both limits are off by default
            assert (intake["cpu_pressure"]["limit"], intake["cpu_pressure"]["shedding"]) == (None, False)
            assert (intake["cpu_limit"]["limit"], intake["cpu_limit"]["shedding"]) == (None, False)
            assert intake["serving_idle"]["limit"] == 0.4  # on by default: waits while serving is busy
            assert 0.0 <= intake["serving_idle"]["idle"] <= 1.0
            assert autogroup_nice(first) in (None, "10")  # session groups on: its group is niced too
            assert os.SCHED_IDLE not in set(thread_policies(first))
            await send(listen, 100, rng, "before")

            stop = asyncio.Event()
            sent = 0

            async def steady() -> None:  # calls all along; send() raises if a single one fails
                nonlocal sent
                while not stop.is_set():
                    await send(listen, 20, rng, f"steady-{sent}", channels=4)
                    sent += 20

            load = asyncio.ensure_future(steady())
            os.kill(first, signal.SIGKILL)
            back = await polled(
                lambda: status_of(admin),
                lambda s: s["observer"]["restarts"] == 1 and s["observer"]["up"],
                "the observer back",
            )
            second = back["observer"]["pid"]
            assert second != first
            os.kill(second, signal.SIGSTOP)  # hung: the worker's hand-off fills, serving goes on
            try:
                await send(listen, 200, rng, "while-hung")
                code, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{admin}/readyz")
                assert code == 200, body  # serving needs no observer
            finally:
                os.kill(second, signal.SIGCONT)
            stop.set()
            await load  # no call failed
            assert sent > 0
            # The restarted observer watches again: once the worker's hand-off has reconnected (within a second or
            # so), the shadow sees the calls.
            final = await watched_again(listen, admin, rng)
            assert final["observer"]["restarts"] == 1
            assert "drift windows" in final["observer"]["lost_on_restart"]


async def test_every_handed_off_call_is_accounted_for_when_the_observer_hangs(tmp_path):
    async with model_server("production") as production, model_server("candidate") as candidate:
        config, listen, admin = group_config(tmp_path, production, candidate)
        async with process_group(config, admin, tmp_path / "group.log", workers=1):
            rng = np.random.default_rng(11)
            observer = (await asyncio.to_thread(status_of, admin))["observer"]["pid"]
            os.kill(observer, signal.SIGSTOP)
            try:
                await send(listen, 300, rng, "hung")
                # While it hangs, the worker hands each call over or drops it, by reason, once its batch is written
                # (within the hand-off's 10 ms linger): nothing vanishes, and nothing is counted twice.
                for _ in range(300):
                    sent, dropped, _ = handoff_counts(await admin_get(admin, "/metrics"))
                    if sent + dropped >= 300:
                        break
                    await asyncio.sleep(0.05)
                assert sent + dropped == 300
            finally:
                os.kill(observer, signal.SIGCONT)
            await send(listen, 100, rng, "resumed")

            def settled() -> dict:
                sent, dropped, received = handoff_counts(http_get(f"http://127.0.0.1:{admin}/metrics")[1])
                return {"sent": sent, "dropped": dropped, "received": received}

            # the worker counts a call once its batch is written (within the 10 ms linger), the observer once read
            counts = await polled(settled, lambda c: c["received"] == c["sent"] and c["sent"] + c["dropped"] >= 400,
                                  "the worker's last batch and the observer to catch up")  # fmt: skip
            assert counts["sent"] + counts["dropped"] == 400  # observed + dropped by reason; none pending now


async def test_sigterm_drains_serving_first_then_observing(tmp_path):
    async with EchoServer("slow") as echo:
        echo.sleep = 2.0
        config, listen, admin = echo_config(tmp_path, echo.address, grace="20s", shadow=True)
        log = tmp_path / "group.log"
        async with process_group(config, admin, log, workers=1) as group:
            state = await asyncio.to_thread(status_of, admin)
            pids = [state["observer"]["pid"], state["workers"][0]["pid"]]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{listen}") as channel:
                call = channel.unary_unary(ECHO + "Unary")(b"x", timeout=30)
                await wait_until(lambda: len(echo.received) >= 1, what="the call to be in flight")
                group.send_signal(signal.SIGTERM)
                assert await call == b"slow:x"  # the accepted call finished
            assert await asyncio.to_thread(group.wait, 60) == 0
        assert pids_alive(pids) == []
        lines = log.read_text().splitlines()
        worker_stopped = next(i for i, line in enumerate(lines) if "worker 0 " in line and line.endswith(": stopped"))
        observer_stopped = next(i for i, line in enumerate(lines) if "observer " in line and line.endswith(": stopped"))
        assert worker_stopped < observer_stopped


async def test_a_promotion_reaches_both_sides_and_survives_restarts(tmp_path):
    async with model_server("production") as production, model_server("candidate") as candidate:
        config, listen, admin = group_config(tmp_path, production, candidate)
        async with process_group(config, admin, tmp_path / "group.log", workers=1):
            rng = np.random.default_rng(5)
            base = f"http://127.0.0.1:{admin}"
            code, body = await asyncio.to_thread(http_get, f"{base}/promote?route=iris&shadow=candidate&force=1",
                                                 "POST")  # fmt: skip
            assert code == 200, body
            assert await served_by(listen, rng) == {"candidate"}
            state = await asyncio.to_thread(status_of, admin)
            assert state["routes"][0]["primary"] == "candidate"  # the observer's table

            os.kill(state["observer"]["pid"], signal.SIGKILL)

            def promoted_observer_back(s: dict) -> bool:
                return (
                    s["observer"]["restarts"] == 1 and s["observer"]["up"] and s["routes"][0]["primary"] == "candidate"
                )

            back = await polled(lambda: status_of(admin), promoted_observer_back, "the observer back, promoted")
            os.kill(back["workers"][0]["pid"], signal.SIGKILL)
            await polled(lambda: status_of(admin), lambda s: s["workers"][0]["restarts"] == 1 and s["ready"],
                         "the worker back")  # fmt: skip
            assert await served_by(listen, rng) == {"candidate"}  # the restarted worker serves the promoted primary

            # A reload from the file reaches both sides and ends the promotion everywhere.
            code, body = await asyncio.to_thread(http_get, f"{base}/reload", "POST")
            assert code == 200, body
            assert "observer: 200" in body
            assert "worker 0: 200" in body
            assert await served_by(listen, rng) == {"production"}
            state = await asyncio.to_thread(status_of, admin)
            assert state["routes"][0]["primary"] == "production"


async def test_the_supervisor_takes_the_reloaded_shutdown_grace(tmp_path):
    async with EchoServer("slow") as echo:
        echo.sleep = 9.0  # longer than the first grace (1 s, plus the supervisor's 5 s), within the reloaded one
        config, listen, admin = echo_config(tmp_path, echo.address, grace="1s")
        async with process_group(config, admin, tmp_path / "group.log", workers=1) as group:
            config.write_text(config.read_text().replace("shutdown_grace: 1s", "shutdown_grace: 60s"))
            code, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{admin}/reload", "POST")
            assert code == 200, body
            async with grpc.aio.insecure_channel(f"127.0.0.1:{listen}") as channel:
                call = channel.unary_unary(ECHO + "Unary")(b"x", timeout=60)
                await wait_until(lambda: len(echo.received) >= 1, what="the call to be in flight")
                group.send_signal(signal.SIGTERM)
                assert await call == b"slow:x"  # not killed after the old grace
            assert await asyncio.to_thread(group.wait, 90) == 0


@pytest.mark.process
def test_idle_scheduling_moves_every_thread_of_the_observer_to_sched_idle(tmp_path):
    """``observer.scheduling: idle``, applied in a process of its own that already runs a second thread."""
    group = tmp_path / "autogroup"
    group.write_text("0\n")
    code = textwrap.dedent(f"""
        import os, threading, time
        from pathlib import Path
        from mlmirror.config import parse_config
        from mlmirror.runtime.observer_process import _lower_priority
        config = parse_config("observer: {{scheduling: idle}}\\nupstreams: {{p: 127.0.0.1:1}}\\n"
                              "routes: [{{match: {{}}, primary: p}}]\\n")
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        _lower_priority(config, autogroup=Path({str(group)!r}))
        print(sorted({{os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([os.SCHED_IDLE])  # both threads
    assert group.read_text().strip() == "19"


async def test_an_observer_over_its_cpu_limit_sheds_and_counts_while_every_call_is_served(tmp_path):
    async with model_server("production") as production, model_server("candidate") as candidate:
        config, listen, admin = group_config(tmp_path, production, candidate)
        config.write_text(config.read_text() + "observer: {cpu_limit: 0.01}\n")  # a hundredth of a CPU
        async with process_group(config, admin, tmp_path / "group.log", workers=1):
            rng = np.random.default_rng(5)
            shed = 0.0
            for batch in range(40):  # until the observer has used more than 1 ms of CPU in some 0.1 s
                await send(listen, 50, rng, f"busy-{batch}")  # every call answered, shedding or not
                shed = samples_of(await admin_get(admin, "/metrics")).get(
                    ("mlmirror_handoff_shed_total", (("reason", "cpu_limit"),)), 0.0)  # fmt: skip
                if shed:
                    break
            assert shed > 0
            intake = (await asyncio.to_thread(status_of, admin))["observer"]["intake"]
            assert intake["cpu_limit"]["limit"] == 0.01
            assert intake["shed"]["cpu_limit"] >= shed  # the same count, read later
            assert intake["shed"]["cpu_pressure"] == 0


async def test_the_observing_process_merges_copies_and_compares_them_as_copies_sent_alone(tmp_path):
    """Two shadows on the same candidate model, one with ``batch: 16``: the observing process merges the copies
    that a hand-off batch brings, and both shadows count and compare every call alike."""
    async with model_server("production") as production, model_server("candidate") as candidate:
        config, listen, admin = config_file(tmp_path, f"""
mirror_shed_lag: off
upstreams: {{production: 127.0.0.1:{production}, merged: 127.0.0.1:{candidate}, alone: 127.0.0.1:{candidate}}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production
    shadows: [{{upstream: merged, batch: 16, queue_size: 1000}}, {{upstream: alone, queue_size: 1000}}]
    compare: {{classification: argmax, output: probabilities}}
""")  # fmt: skip
        async with process_group(config, admin, tmp_path / "group.log", workers=1):
            await send(listen, 300, np.random.default_rng(12), "merge")

            def shadows() -> dict:
                return {s["name"]: s for s in status_of(admin)["routes"][0]["shadows"]}

            def settled(s: dict) -> bool:  # every call in both windows, and the first merged request's check done
                return all(v["window"]["calls"] == 300 for v in s.values()) and s["merged"]["merge_check"]["same"] > 0

            state = await polled(shadows, settled, "both shadows to have every call and the first check")
            merged, alone = state["merged"], state["alone"]
            assert merged["merge_check"] == {"every": 64, "same": merged["merge_check"]["same"], "differ": 0,
                                             "refused": 0, "failed": 0, "stopped": None}  # fmt: skip
            assert merged["mirrored"] == alone["mirrored"] == {"OK": 300}
            assert merged["comparisons"] == alone["comparisons"]
            assert merged["window"]["agreement"] == alone["window"]["agreement"]
            assert 2 <= merged["merged"]["requests"] < merged["merged"]["copies"] <= 300
            assert alone["merged"] == {"requests": 0, "copies": 0}
            samples = samples_of(await admin_get(admin, "/metrics"))
            key = ("mlmirror_mirror_merged_total", (("count", "copies"), ("route", "iris"), ("shadow", "merged")))
            assert samples[key] == merged["merged"]["copies"]
            checks = (
                "mlmirror_mirror_merge_checks_total",
                (("result", "same"), ("route", "iris"), ("shadow", "merged")),
            )
            assert samples[checks] == merged["merge_check"]["same"]
