"""CPU pressure and the CPU budget (proxy/observing/pressure.py), and the observing process shedding on them
(Deliveries)."""

import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from mlmirror.handoff.tap import CallRecord
from mlmirror.observing.pressure import PSI_FILES, CpuBudget, CpuPressure, stall_microseconds
from mlmirror.runtime.observer_process import Deliveries
from prometheus_client import CollectorRegistry, Counter

from tests.support import wait_until

PSI = "some avg10=1.50 avg60=0.40 avg300=0.10 total={some}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"


def write_psi(path: Path, some: int) -> None:
    path.write_text(PSI.format(some=some))


def test_the_some_line_total_is_read_and_anything_else_is_none(tmp_path):
    psi = tmp_path / "cpu.pressure"
    write_psi(psi, 123456)
    assert stall_microseconds(psi) == 123456
    assert stall_microseconds(tmp_path / "absent") is None
    (tmp_path / "other").write_text("full avg10=0.00 total=7\n")
    assert stall_microseconds(tmp_path / "other") is None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_the_ratio_is_the_stalled_share_of_each_interval_and_sheds_above_the_limit(tmp_path):
    psi, clock = tmp_path / "cpu.pressure", Clock()
    write_psi(psi, 1_000_000)
    pressure = CpuPressure(0.10, interval=3600, sources=[tmp_path / "absent", psi], clock=clock)
    assert pressure.source == psi  # the first file that can be read
    pressure.start()
    assert pressure.rate is None
    assert not pressure.shedding
    steps = [(0.5, 25_000), (0.5, 100_000), (0.25, 0), (2.0, 150_000)]  # (seconds, µs stalled in them)
    total = 1_000_000
    for seconds, stalled in steps:
        clock.now += seconds
        total += stalled
        write_psi(psi, total)
        pressure.sample()
        assert pressure.rate == pytest.approx(stalled / (seconds * 1e6))
        assert pressure.shedding == (stalled / (seconds * 1e6) > 0.10)
    pressure.limit = None  # a reload turned it off
    clock.now += 1.0
    write_psi(psi, total + 900_000)
    pressure.sample()
    assert pressure.rate == pytest.approx(0.9)
    assert not pressure.shedding
    assert pressure.snapshot() == {"source": str(psi), "limit": None, "ratio": 0.9, "shedding": False}
    pressure.stop()


def test_without_pressure_information_nothing_is_shed(tmp_path):
    pressure = CpuPressure(0.0, sources=[tmp_path / "absent"])
    pressure.start()
    assert pressure.source is None
    assert not pressure.shedding
    assert pressure.snapshot()["ratio"] is None


@pytest.mark.skipif(not any(stall_microseconds(p) is not None for p in PSI_FILES), reason="this kernel has no PSI")
async def test_the_machines_own_pressure_is_a_share():
    pressure = CpuPressure(0.5, interval=0.05)
    pressure.start()
    await wait_until(lambda: pressure.rate is not None, within=30, what="two samples of the machine's PSI")
    pressure.stop()
    assert pressure.rate is not None
    assert 0.0 <= pressure.rate <= 1.0


def record(route: str) -> CallRecord:
    return CallRecord(route, "/inference.GRPCInferenceService/ModelInfer", b"in", b"out", grpc.StatusCode.OK,
                      "production", "primary", "id-1", (), 0.0, 0.001, 0.001)  # fmt: skip


def deliveries_of(
    limits: dict[str, float | None], pressure: CpuPressure, budget: CpuBudget
) -> tuple[Deliveries, list[CallRecord], CollectorRegistry]:
    """Deliveries to one route ``iris`` of a hub whose config sets the observer's ``limits``, shedding on ``pressure``
    and ``budget``: (the deliveries, the records the route's tap took, the registry of its counters)."""
    taken: list[CallRecord] = []
    route = SimpleNamespace(name="iris", tap=SimpleNamespace(offer=taken.append))
    config = SimpleNamespace(observer=SimpleNamespace(**limits))
    hub = SimpleNamespace(table=SimpleNamespace(routes=[route], config=config))
    registry = CollectorRegistry()
    unrouted = Counter("unrouted", "", registry=registry)
    shed = Counter("shed", "", ["reason"], registry=registry)
    return Deliveries(hub, unrouted, {"cpu_pressure": pressure, "cpu_limit": budget}, shed), taken, registry


async def test_deliveries_drop_and_count_the_calls_that_arrive_under_pressure(tmp_path):
    psi, clock = tmp_path / "cpu.pressure", Clock()
    write_psi(psi, 0)
    pressure = CpuPressure(0.5, interval=3600, sources=[psi], clock=clock)
    budget = CpuBudget(None, interval=3600, cpu_seconds=lambda: 0.0, clock=clock)
    deliveries, taken, registry = deliveries_of({"cpu_pressure_limit": 0.2, "cpu_limit": None}, pressure, budget)
    deliveries(record("iris"))
    assert pressure.limit == 0.2  # taken from the hub's config
    assert len(taken) == 1
    pressure.start()
    clock.now += 1.0
    write_psi(psi, 300_000)  # 0.3 of the last second stalled: above the config's 0.2, below the 0.5 it started with
    pressure.sample()
    assert pressure.shedding
    for _ in range(3):
        deliveries(record("iris"))
    assert len(taken) == 1
    assert deliveries.shed == {"cpu_pressure": 3, "cpu_limit": 0}
    assert registry.get_sample_value("shed_total", {"reason": "cpu_pressure"}) == 3
    clock.now += 1.0
    write_psi(psi, 400_000)
    pressure.sample()
    pressure.stop()
    deliveries(record("iris"))
    deliveries(record("gone"))
    assert len(taken) == 2
    assert registry.get_sample_value("unrouted_total") == 1


async def test_the_budget_is_the_cpu_this_process_used_per_second_and_sheds_above_its_limit():
    clock, used = Clock(), [50.0]
    budget = CpuBudget(0.5, interval=3600, cpu_seconds=lambda: used[0], clock=clock)
    budget.start()
    assert (budget.rate, budget.shedding) == (None, False)
    steps = [(0.1, 0.02), (0.1, 0.08), (0.2, 0.1), (0.5, 0.9)]  # (seconds, CPU seconds used in them: 2 threads)
    for seconds, cpu in steps:
        clock.now += seconds
        used[0] += cpu
        budget.sample()
        assert budget.rate == pytest.approx(cpu / seconds)
        assert budget.shedding == (cpu / seconds > 0.5)
    assert budget.snapshot() == {"limit": 0.5, "cpus": 1.8, "shedding": True}
    budget.limit = None  # a reload turned it off
    clock.now += 0.1
    used[0] += 0.2
    budget.sample()
    assert not budget.shedding
    budget.stop()


async def test_deliveries_shed_while_this_process_is_over_its_cpu_budget():
    clock, used = Clock(), [0.0]
    budget = CpuBudget(None, interval=3600, cpu_seconds=lambda: used[0], clock=clock)
    pressure = CpuPressure(None, sources=[])
    deliveries, taken, registry = deliveries_of({"cpu_pressure_limit": None, "cpu_limit": 0.25}, pressure, budget)
    deliveries(record("iris"))
    assert budget.limit == 0.25  # taken from the hub's config
    budget.start()
    clock.now += 0.1
    used[0] += 0.03  # 0.3 CPUs
    budget.sample()
    for _ in range(4):
        deliveries(record("iris"))
    assert len(taken) == 1
    assert deliveries.shed == {"cpu_pressure": 0, "cpu_limit": 4}
    assert registry.get_sample_value("shed_total", {"reason": "cpu_limit"}) == 4
    clock.now += 0.1
    used[0] += 0.01  # back under it: observed again
    budget.sample()
    budget.stop()
    deliveries(record("iris"))
    assert len(taken) == 2


async def test_the_budget_reads_this_processs_own_cpu_time():
    readings: list[float] = []

    def clock() -> float:
        readings.append(time.monotonic())
        return readings[-1]

    budget = CpuBudget(1.0, interval=3600, clock=clock)
    budget.start()
    spun = time.process_time() + 0.05
    while time.process_time() < spun:  # 50 ms of this process's CPU, however long a busy machine takes for them
        pass
    budget.sample()
    budget.stop()
    assert budget.rate is not None
    assert budget.rate * (readings[1] - readings[0]) >= 0.05  # at least the CPU time spun, counted as this process's
