"""``mlmirror serve --workers N`` as a real process group: two workers share the port, the hub makes the shadow
copies and measures drift, and the admin endpoint shows one truth; a killed worker is started again, a dead
supervisor takes its workers with it, SIGTERM stops everyone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from mlmirror.demo.models import sample_features
from mlmirror.demo.traffic import infer_request
from mlmirror.errors import StartError
from mlmirror.protos import feedback_pb2
from mlmirror.runtime.promotion import replayed_config
from mlmirror.runtime.supervisor import Supervisor
from prometheus_client.parser import text_string_to_metric_families

from loadtest.ports import free_port
from loadtest.processes import stop_process
from tests.support import ECHO, REPO, EchoServer, config_file, http_get, model_server, wait_until

pytestmark = pytest.mark.slow

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
REPORT = "/mlmirror.v1.Feedback/ReportOutcome"


def group_config(folder: Path, production: int, candidate: int) -> tuple[Path, int, int]:
    return config_file(
        folder,
        f"""
mirror_shed_lag: off
shutdown_grace: 5s
upstreams: {{production: 127.0.0.1:{production}, candidate: 127.0.0.1:{candidate}}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production
    shadows: [{{upstream: candidate, queue_size: 1000}}]
    compare: {{classification: argmax, output: probabilities}}
    drift: {{window: 100, capture: 100, ground_truth: {{output: probabilities}}}}
""",
    )


def echo_config(folder: Path, echo: str, grace: str, shadow: bool = False) -> tuple[Path, int, int]:
    """A group's config of one route to the echo server at ``echo`` (unary Echo calls), optionally mirrored to it
    as a shadow too: (its path, the listen port, the admin port)."""
    upstreams = f"echo: {echo}, shadow: {echo}" if shadow else f"echo: {echo}"
    return config_file(
        folder,
        f"""
shutdown_grace: {grace}
method_types: {{{ECHO}Unary: unary_unary}}
upstreams: {{{upstreams}}}
routes: [{{match: {{}}, primary: echo{", shadows: [{upstream: shadow}]" if shadow else ""}}}]
""",
    )


@contextlib.asynccontextmanager
async def process_group(config: Path, admin: int, log: Path, workers: int = 2) -> AsyncIterator[subprocess.Popen]:
    with log.open("w") as output:
        process = subprocess.Popen(  # noqa: ASYNC220 - a process beside the test, waited for in a thread
            [sys.executable, "-m", "mlmirror", "serve", "--config", str(config), "--workers", str(workers)],
            cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        await polled(lambda: {"exited": process.poll() is not None, "ready": ready(admin)},
                     lambda s: s["exited"] or s["ready"], "the group to be ready", within=90)  # fmt: skip
        assert process.poll() is None, await asyncio.to_thread(log.read_text)
        yield process
    except BaseException:
        text = await asyncio.to_thread(log.read_text)
        print(f"--- the group's log ({log}), last 8000 characters ---\n{text[-8000:]}")  # pytest shows it on failure
        raise
    finally:
        if process.poll() is None:
            await asyncio.to_thread(stop_process, process, 30)


def ready(admin: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{admin}/readyz")[0] == 200
    except OSError:
        return False


async def admin_get(admin: int, path: str) -> str:
    code, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{admin}{path}")
    assert code == 200, body
    return body


async def send(listen: int, n: int, rng: np.random.Generator, prefix: str, channels: int = 16) -> list[np.ndarray]:
    """``n`` ModelInfer calls spread over ``channels`` connections (so over the workers); all must succeed."""
    features = [sample_features(rng, 1) for _ in range(n)]
    # A local subchannel pool each: otherwise gRPC shares one connection between the channels.
    opened = [grpc.aio.insecure_channel(f"127.0.0.1:{listen}", options=[("grpc.use_local_subchannel_pool", 1)])
              for _ in range(channels)]  # fmt: skip
    try:
        # Client metadata rides along to the hub (gRPC hands it over as named tuples).
        calls = [opened[i % channels].unary_unary(MODEL_INFER)(infer_request(x, request_id=f"{prefix}-{i}"),
                                                               timeout=10, metadata=(("x-tenant", "acme"),))
                 for i, x in enumerate(features)]  # fmt: skip
        await asyncio.gather(*calls)
    finally:
        for channel in opened:
            await channel.close()
    return features


async def served_by(listen: int, n: int, rng: np.random.Generator) -> list[str]:
    """The ``x-mlmirror-served-by`` trailer of ``n`` ModelInfer calls, each on a connection of its own (so spread
    over the workers by the kernel)."""
    served = []
    for _ in range(n):
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{listen}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            call = channel.unary_unary(MODEL_INFER)(infer_request(sample_features(rng, 1)), timeout=10)
            await call
            served.append(str(dict(await call.trailing_metadata())["x-mlmirror-served-by"]))
    return served


async def polled(fetch: Callable[[], dict], done: Callable[[dict], bool], what: str, within: float = 60.0) -> dict:
    """``fetch()`` (blocking, so in a thread: the model servers share this loop) until ``done`` says yes."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await asyncio.to_thread(fetch)
        with contextlib.suppress(KeyError, IndexError):
            if done(value):
                return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}: {value}")
        await asyncio.sleep(0.2)


def socket_folder(pid: int) -> Path:
    """The hand-off folder of the group a child process belongs to (from its ``--folder`` argument)."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return Path(args[args.index("--folder") + 1])


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


async def test_two_workers_share_the_port_and_the_hub_holds_one_truth(tmp_path):
    rng = np.random.default_rng(1)
    async with model_server("production") as production, model_server("candidate") as candidate:
        config, listen, admin = group_config(tmp_path, production, candidate)
        async with process_group(config, admin, tmp_path / "group.log") as group:
            await send(listen, 400, rng, "call")

            def status() -> dict:
                code, body = http_get(f"http://127.0.0.1:{admin}/status")
                return json.loads(body) if code == 200 else {}

            def copies(state: dict) -> int:
                return state["routes"][0]["shadows"][0]["mirrored"].get("OK", 0)

            def settled(state: dict) -> bool:  # the hub's copies and its drift engine's worker thread caught up
                drift = state["routes"][0]["drift"]
                return copies(state) == 400 and drift["calls"] == 400 and len(drift["history"]) == 3

            state = await polled(status, settled, "the hub's 400 shadow copies and 400 drift calls")
            route = state["routes"][0]
            assert route["calls"] == {"OK": 400}  # summed over the workers
            workers = state["workers"]
            assert [w["index"] for w in workers] == [0, 1]
            assert all(w["ready"] for w in workers)
            assert sum(w["calls"] for w in workers) == 400
            assert all(w["calls"] > 0 for w in workers), workers  # the kernel spread the connections
            assert route["drift"]["calls"] == 400  # one drift engine, in the hub, saw every call
            assert len(route["drift"]["history"]) == 3  # 100 captured, then 3 windows of 100

            text = await admin_get(admin, "/metrics")
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip
            assert samples[("mlmirror_calls_total", (("grpc_code", "OK"), ("route", "iris")))] == 400
            assert samples[("mlmirror_mirror_requests_total", (("result", "OK"), ("route", "iris"),
                                                               ("shadow", "candidate")))] == 400  # fmt: skip
            assert samples[("mlmirror_handoff_received_total", (("worker", "0"),))] + samples[
                ("mlmirror_handoff_received_total", (("worker", "1"),))] == 400  # fmt: skip
            assert {dict(labels).get("worker") for name, labels in samples if name == "mlmirror_ready"} == {
                "0", "1", "hub"}  # fmt: skip
            assert samples[("mlmirror_workers", ())] == 2
            promtool = shutil.which("promtool")
            assert promtool is not None, "promtool (Debian package prometheus) is needed; .ci/run installs it"
            checked = await asyncio.to_thread(subprocess.run, [promtool, "check", "metrics"], input=text,
                                              capture_output=True, text=True, check=False)  # fmt: skip
            assert checked.returncode == 0, checked.stdout + checked.stderr

            # Ground truth over gRPC reaches the hub's store through whichever worker takes the call.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{listen}") as channel:
                report = channel.unary_unary(REPORT, feedback_pb2.ReportOutcomeRequest.SerializeToString,
                                             feedback_pb2.ReportOutcomeResponse.FromString)  # fmt: skip
                outcomes = [feedback_pb2.Outcome(request_id=f"call-{i}", labels=["0"]) for i in range(50)]
                answer = await report(feedback_pb2.ReportOutcomeRequest(outcomes=outcomes), timeout=10)
            assert (answer.matched, answer.unknown) == (50, 0)

            # Promotion: the hub checks the verdict (force here), then every worker swaps its primary.
            base = f"http://127.0.0.1:{admin}"
            code, body = await asyncio.to_thread(http_get, f"{base}/promote?route=iris&shadow=nope", "POST")
            assert code == 404, body
            code, body = await asyncio.to_thread(http_get, f"{base}/promote?route=iris&shadow=candidate&force=1",
                                                 "POST")  # fmt: skip
            assert code == 200, body
            assert "primary is now candidate" in body
            assert set(await served_by(listen, 8, rng)) == {"candidate"}

            # A killed worker is started again; the group keeps serving, with the promotion: the new worker serves
            # the promoted primary too, not the one the config file names. (32 connections: each worker gets some.)
            victim = workers[0]["pid"]
            os.kill(victim, signal.SIGKILL)
            await polled(status, lambda s: s["workers"][0]["restarts"] == 1 and s["ready"], "the worker back")
            await send(listen, 100, rng, "after")
            served = await served_by(listen, 32, rng)
            assert set(served) == {"candidate"}, served
            state = await asyncio.to_thread(status)
            assert state["workers"][0]["pid"] != victim
            assert all(w["calls"] > 0 for w in state["workers"]), state["workers"]  # both workers were asked
            pids = [w["pid"] for w in state["workers"]]

            # SIGTERM: the workers drain and stop, then the supervisor exits 0.
            group.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(group.wait, 30) == 0
            assert pids_alive(pids) == []


async def test_workers_stop_when_their_supervisor_dies(tmp_path):
    async with model_server("production") as production, model_server("candidate") as candidate:
        config, listen, admin = group_config(tmp_path, production, candidate)
        async with process_group(config, admin, tmp_path / "group.log") as group:
            state = json.loads(await admin_get(admin, "/status"))
            pids = [state["observer"]["pid"], *(w["pid"] for w in state["workers"])]
            assert len(pids_alive(pids)) == 3
            folder = socket_folder(state["observer"]["pid"])
            assert (folder / "handoff.sock").exists()  # the group's socket folder exists ...
            group.kill()  # no chance to stop them
            await asyncio.to_thread(group.wait)
            await wait_until(lambda: not pids_alive(pids), within=30, what="orphaned children to stop")
            assert not folder.exists()  # ... and the orphaned children removed it


async def test_a_second_stop_signal_kills_the_workers_and_exits_at_once(tmp_path):
    async with EchoServer("slow") as echo:
        echo.sleep = 20.0  # a call that keeps its worker draining
        config, listen, admin = echo_config(tmp_path, echo.address, grace="30s")
        async with process_group(config, admin, tmp_path / "group.log") as group:
            body = await admin_get(admin, "/status")
            pids = [w["pid"] for w in json.loads(body)["workers"]]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{listen}") as channel:
                call = channel.unary_unary(ECHO + "Unary")(b"x", timeout=60)
                await wait_until(lambda: len(echo.received) == 1, what="the call to be in flight")
                group.send_signal(signal.SIGTERM)  # the workers drain: the call keeps one busy for 20 s
                log = tmp_path / "group.log"
                await wait_until(lambda: "SIGTERM: stopping the workers" in log.read_text(), 30,
                                 "the supervisor to take the first SIGTERM")  # fmt: skip
                group.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(group.wait, 10) == 1  # long before the call could finish
                await wait_until(lambda: not pids_alive(pids), within=10, what="the killed workers to be gone")
                call.cancel()


async def test_a_reload_gives_the_supervisor_the_new_shutdown_grace(tmp_path):
    async with EchoServer("slow") as echo:
        listen, admin = free_port(), free_port()
        config = tmp_path / "mlmirror.yaml"

        def write(grace: str) -> None:
            config.write_text(f"""
listen: 127.0.0.1:{listen}
admin: 127.0.0.1:{admin}
shutdown_grace: {grace}
method_types: {{{ECHO}Unary: unary_unary}}
upstreams: {{echo: {echo.address}}}
routes: [{{match: {{}}, primary: echo}}]
""")

        write("1s")
        async with process_group(config, admin, tmp_path / "group.log") as group:
            write("60s")
            code, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{admin}/reload", "POST")
            assert code == 200, body
            echo.sleep = 12.0  # longer than the old grace (1 s) and the 5 s the supervisor adds to it
            async with grpc.aio.insecure_channel(f"127.0.0.1:{listen}") as channel:
                call = channel.unary_unary(ECHO + "Unary")(b"x", timeout=60)
                await wait_until(lambda: len(echo.received) == 1, what="the call to be in flight")
                group.send_signal(signal.SIGTERM)
                assert await call == b"slow:x"  # the worker drained it under the new grace: nobody killed it
            assert await asyncio.to_thread(group.wait, 30) == 0


def test_a_child_started_again_starts_with_the_promotions_the_others_serve(tmp_path):
    config, _, _ = group_config(tmp_path, 1, 2)
    supervisor = Supervisor(str(config), 2)
    try:
        assert supervisor.workers[1].more_args() == []
        supervisor._promotions.append(("iris", "candidate"))  # what a promotion through the admin endpoint records
        for child in supervisor.children:
            assert child.more_args() == ["--promote", "iris", "candidate"]
    finally:
        shutil.rmtree(supervisor.folder, ignore_errors=True)
    promoted = replayed_config(str(config), [("iris", "candidate")])  # what the child then serves
    assert promoted.routes[0].primary == "candidate"
    assert [s.upstream for s in promoted.routes[0].shadows] == ["production"]
    with pytest.raises(StartError, match="cannot apply the promotion of nope on route iris again"):
        replayed_config(str(config), [("iris", "nope")])  # the file changed since: the child says why it stops
