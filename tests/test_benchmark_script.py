"""The benchmark script runs end to end (tiny sizes: this checks that it works, not how fast anything is)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.slow

SMALL = ("--rounds", "1", "--calls", "200", "--rate", "200", "--warmup", "50")  # a run that checks, not measures


def bench(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m loadtest.<module> ARGS`` from the repository, its output captured; it must succeed."""
    result = subprocess.run([sys.executable, "-m", f"loadtest.{module}", *args], capture_output=True, text=True,
                            cwd=REPO, timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def test_bench_proxy_prints_its_table():
    assert shutil.which("h2load") is not None, "h2load (Debian package nghttp2-client) is needed; .ci/run installs it"
    result = bench("bench_proxy", *SMALL, "--saturation-calls", "300")
    systems, processes = (
        [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
        for table in result.stdout.split("CPU per call by process")
    )
    names = [row.split(" | ")[0].lstrip("| ") for row in systems]
    assert names == [
        "direct (the model server)",
        "floor: grpc.aio pass-through (asyncio)",
        "floor: grpc.aio pass-through (uvloop)",
        "transparent floor: + metadata, deadline, trailers (uvloop)",
        "mlmirror (fallback configured)",
        "mlmirror --single-process (the same)",
    ]
    for mlmirror in (row.split(" | ") for row in systems[-2:]):
        assert float(mlmirror[1]) > 0  # throughput
        assert mlmirror[4].split(" ")[0].isdigit()  # CPU µs per call
    assert [row.split(" | ")[0].lstrip("| ") for row in processes] == ["supervisor", "observer", "worker 0"]
    assert all(row.split(" | ")[1].split(" ")[0].isdigit() for row in processes)


def test_bench_extproc_measures_each_way_envoy_hands_calls_to_the_observer():
    result = bench("bench_extproc", "--rounds", "1", "--calls", "200", "--rate", "200", "--warmup", "50")
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    table = {row[0].lstrip("| "): row for row in rows[1:]}
    assert list(table) == [
        "nothing observed (forward + mirror)",
        "ext_proc, five messages (request headers sent)",
        "ext_proc, dataplane.yaml (four messages, attributes)",
        "tap filter, dataplane-tap.yaml (batches read from Envoy's admin)",
    ]
    none = table["nothing observed (forward + mirror)"]
    assert (none[1], none[3].rstrip(" |")) == ("-", "-")  # no observer, nothing observed
    for name, row in table.items():
        assert float(row[2].split(" ")[0]) > 0, (name, row)  # Envoy's CPU per call
        if name != "nothing observed (forward + mirror)":
            assert float(row[1].split(" ")[0]) > 0, (name, row)  # the observer's CPU per observed call
            share = float(row[3].split(" ")[0])
            if name.startswith("ext_proc"):
                assert share == 1.0, (name, row)  # ext_proc sees every call
            else:
                assert 0.9 <= share <= 1.0, (name, row)  # the tap: all but the calls in flight at a batch boundary


def test_bench_envoy_compares_both_modes_with_the_envoy_anchors(tmp_path):
    result = bench("bench_envoy", *SMALL, "--saturation-calls", "200", "--out", str(tmp_path))
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    table = {row[0].lstrip("| "): row for row in rows[1:8]}
    ext_proc, tap = "Envoy + 1 mirror + ext_proc to mlmirror observer (drift)", "Envoy + 1 mirror + tap read by " \
        "mlmirror observer (drift)"  # fmt: skip
    assert list(table) == [
        "direct (the model server)",
        "mlmirror proxy",
        "mlmirror proxy + 1 shadow (compared)",
        "Envoy, forward only",
        "Envoy + 1 mirror",
        ext_proc,
        tap,
    ]
    for name, row in table.items():
        assert row[3] == "200", (name, row)  # every fixed-rate call answered OK
        assert float(row[-1].rstrip(" |")) > 0  # saturation throughput
    for name in (ext_proc, tap):
        assert "envoy" in table[name][8], table[name]  # the CPU breakdown
        assert "observer" in table[name][8], table[name]
    observed = {row[0].lstrip("| "): row for row in rows[-2:]}
    assert list(observed) == [ext_proc, tap]
    assert observed[ext_proc][1] == "450"  # warm-up + fixed + saturation calls carried by the data plane
    assert observed[ext_proc][2] == "450"  # every one observed
    assert observed[tap][1] == "450"
    # the tap loses the calls in flight at a batch boundary (at most one in so short a run: 32 streams at most)
    assert 450 - 40 <= int(observed[tap][2]) <= 450, observed[tap]
    reports = sorted(p.name for p in tmp_path.glob("*.json"))
    assert len(reports) == 7
    compared = subprocess.run([sys.executable, "-m", "loadtest", "compare", *map(str, sorted(tmp_path.glob("*.json")))],
                              capture_output=True, text=True, cwd=REPO, timeout=60)  # fmt: skip
    assert compared.returncode == 0
    assert sum(line.startswith("| ") for line in compared.stdout.splitlines()) == 8  # header + seven systems


def test_bench_workers_compares_one_process_with_two_workers():
    result = bench("bench_workers", *SMALL, "--saturation-calls", "300")
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    table = {row[0].lstrip("| "): row for row in rows[1:5]}
    assert list(table) == ["1 process", "--workers 2", "1 process, shadow + drift", "--workers 2, shadow + drift"]
    for name, row in table.items():
        assert row[3] == "200", (name, row)  # every fixed-rate call answered OK
    assert "observer" in table["--workers 2, shadow + drift"][8]  # CPU per process of the group
    assert "worker 1" in table["--workers 2"][8]
    scaling = [row for row in rows if "→" in row[0]]
    assert len(scaling) == 2
    assert all(float(row[1].rstrip("x")) > 0 for row in scaling)


def test_the_floor_proxy_relays_calls_transparently_when_asked():
    # The transparent floor must really pass statuses through, or the comparison would flatter it.
    script = """
import asyncio, grpc, subprocess, sys, socket, time
from loadtest.ports import free_port, wait_for_port
from tests.support import EchoServer

async def main():
    async with EchoServer("a") as echo:
        port = free_port()
        floor = subprocess.Popen([sys.executable, "-m", "loadtest.floor_proxy", f"127.0.0.1:{port}", echo.address,
                                  "--transparent"])
        try:
            await asyncio.to_thread(wait_for_port, port)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                ok = await channel.unary_unary("/test.Echo/Unary")(b"x", metadata=(("x-test-initial", "i"),))
                try:
                    await channel.unary_unary("/test.Echo/Unary")(b"x", metadata=(("x-test-code", "ABORTED"),))
                except grpc.aio.AioRpcError as error:
                    print(ok, error.code().name, dict(error.trailing_metadata())["x-trailer"])
        finally:
            floor.terminate()
            floor.wait()

asyncio.run(main())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "b'a:x' ABORTED a"


def _tables(text: str) -> list[list[list[str]]]:
    """The markdown tables in ``text``: rows of cells, header first, separator rows left out."""
    tables: list[list[list[str]]] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("| ") and "---" not in line:
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append([cell.strip() for cell in line.strip().strip("|").split("|")])
        previous = line
    return tables


def test_bench_shadows_prints_its_tables():
    assert shutil.which("h2load") is not None, "h2load (Debian package nghttp2-client) is needed; .ci/run installs it"
    result = bench("bench_shadows", "--rounds", "1", "--calls", "300", "--rate", "100", "--warmup", "50")
    assert "Command: `python -m loadtest.bench_shadows --rounds 1 --calls 300 --rate 100 --warmup 50`" in result.stdout
    latency, mirrors, drift = _tables(result.stdout)
    assert [row[0] for row in latency[1:]] == [
        "no shadow",
        "1 shadow (candidate), 100%",
        "2 shadows (candidate + control), 100%",
        "1 hung shadow, 100%",
        "drift engine, no shadow",
    ]
    (engine,) = drift[1:]
    assert engine[0] == "drift engine, no shadow"
    assert int(engine[1]) == 350  # warm-up + measured client calls
    assert int(engine[2]) == 350  # every one counted by the engine...
    assert (engine[3], engine[4]) == ("0", "0")  # ...none dropped, none undecodable
    one = latency[2]
    assert one[1].startswith("100 / ")  # offered / achieved calls/s
    assert float(one[4].rstrip("x")) > 0  # p99 vs none
    assert one[5].isdigit()  # CPU µs per call
    assert one[7:] == ["p99 ≤ 1.10x; CPU ≤ 1.25x", one[8]]
    assert all(word in ("p99", "CPU", "met;", "met", "missed;", "missed") for word in one[8].split())
    copies = {(row[0], row[1]): row for row in mirrors[1:]}
    assert set(copies) == {
        ("1 shadow (candidate), 100%", "candidate"),
        ("2 shadows (candidate + control), 100%", "candidate"),
        ("2 shadows (candidate + control), 100%", "control"),
        ("1 hung shadow, 100%", "hung"),
    }
    candidate = copies["1 shadow (candidate), 100%", "candidate"]
    assert int(candidate[3]) > 0  # mlmirror_mirror_requests_total
    assert "OK" in candidate[4]
    assert "OK" not in copies["1 hung shadow, 100%", "hung"][4]  # the hung shadow never answers
