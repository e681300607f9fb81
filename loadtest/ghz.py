"""Load runs described by ghz's JSON configuration, reported in ghz's JSON format — with ghz when it is installed,
else with a built-in asyncio generator that reads the same configuration and writes the same report.

Configuration keys read (ghz's names): ``call`` (``package.Service/Method`` or ``package.Service.Method``),
``host``, ``total`` (``n``), ``concurrency`` (``c``), ``rps`` (0: as fast as answers come), ``timeout`` (``"20s"``),
``binary-file`` (the serialized request, as ``-B``), ``metadata`` (an object), ``name``. A relative ``binary-file``
is relative to the configuration file.

Report (ghz's JSON, durations in nanoseconds): ``name``, ``date``, ``count``, ``total``, ``average``, ``fastest``,
``slowest``, ``rps``, ``latencyDistribution`` ([{percentage, latency}] for 10, 25, 50, 75, 90, 95, 99),
``histogram`` ([{mark (seconds), count, frequency}]), ``statusCodeDistribution`` ({code name: count}),
``errorDistribution`` ({message: count}), plus ``generator`` (``ghz`` or ``mlmirror-asyncio``).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from mlmirror.config.yamlsource import parse_duration

__all__ = ["GhzConfig", "load_config", "report", "run"]

PERCENTILES = (10, 25, 50, 75, 90, 95, 99)


@dataclass(frozen=True)
class GhzConfig:
    name: str
    method: str  # /package.Service/Method
    host: str
    total: int
    concurrency: int
    rps: float
    timeout: float
    request: bytes
    metadata: tuple[tuple[str, str], ...]
    path: Path


def load_config(path: Path) -> GhzConfig:
    """Read a ghz JSON configuration; raises ValueError naming the key at fault."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the configuration: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    call = raw.get("call")
    if not isinstance(call, str) or "." not in call:
        raise ValueError(f"{path}: call: expected package.Service/Method, got {call!r}")
    service, _, method = call.replace("/", ".").rpartition(".")
    binary = raw.get("binary-file")
    if not isinstance(binary, str):
        raise ValueError(f"{path}: binary-file: the serialized request is required (this runner sends bytes)")
    request_path = (path.parent / binary) if not Path(binary).is_absolute() else Path(binary)
    try:
        request = request_path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: binary-file: {exc}") from None
    timeout = parse_duration(raw.get("timeout", "20s"))
    if timeout is None:
        raise ValueError(f"{path}: timeout: expected a duration such as 20s, got {raw.get('timeout')!r}")
    numbers = {key: raw.get(key, default) for key, default in (("total", 200), ("concurrency", 50), ("rps", 0))}
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{path}: {key}: expected a non-negative number, got {value!r}")
    metadata = raw.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: metadata: expected an object")
    return GhzConfig(
        name=str(raw.get("name", path.stem)),
        method=f"/{service}/{method}",
        host=str(raw.get("host", "127.0.0.1:8500")),
        total=int(numbers["total"]),
        concurrency=max(1, int(numbers["concurrency"])),
        rps=float(numbers["rps"]),
        timeout=timeout,
        request=request,
        metadata=tuple((str(k).lower(), str(v)) for k, v in metadata.items()),
        path=path,
    )


async def _generate(config: GhzConfig, progress: bool) -> tuple[list[float], Counter, Counter, float]:
    """Send the calls; returns (latencies in seconds of all calls, codes, error messages, wall seconds)."""
    latencies: list[float] = []
    codes: Counter = Counter()
    errors: Counter = Counter()
    interval = 1.0 / config.rps if config.rps else 0.0
    limit = asyncio.Semaphore(config.concurrency)
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(config.host) as channel:
        stub = channel.unary_unary(config.method)

        async def one() -> None:
            async with limit:
                begun = time.perf_counter()
                try:
                    await stub(config.request, metadata=config.metadata, timeout=config.timeout)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1
                    errors[f"rpc error: code = {error.code().name} desc = {error.details()}"] += 1
                latencies.append(time.perf_counter() - begun)
                if progress and len(latencies) % max(1, config.total // 50) == 0:
                    _bar(len(latencies), config.total)

        tasks = []
        for n in range(config.total):
            tasks.append(asyncio.ensure_future(one()))
            if interval:
                delay = started + (n + 1) * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif n % config.concurrency == 0:
                await asyncio.sleep(0)
        await asyncio.gather(*tasks)
    if progress:
        _bar(config.total, config.total)
        print(file=sys.stderr)
    return latencies, codes, errors, time.perf_counter() - started


def _bar(done: int, total: int) -> None:
    width = 40
    filled = int(width * done / max(total, 1))
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr, flush=True)


def report(name: str, latencies: list[float], codes: Counter, errors: Counter, seconds: float) -> dict:
    """A ghz-format JSON report (durations in nanoseconds)."""
    values = np.asarray(latencies, dtype=np.float64)
    ns = 1e9
    count = int(values.size)
    histogram = []
    if count:
        counts, edges = np.histogram(values, bins=10)
        histogram = [
            {"mark": float(edges[i + 1]), "count": int(c), "frequency": float(c) / count} for i, c in enumerate(counts)
        ]
    return {
        "name": name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "generator": "mlmirror-asyncio",
        "count": count,
        "total": int(seconds * ns),
        "average": int(values.mean() * ns) if count else 0,
        "fastest": int(values.min() * ns) if count else 0,
        "slowest": int(values.max() * ns) if count else 0,
        "rps": count / seconds if seconds else 0.0,
        "latencyDistribution": [
            {"percentage": p, "latency": int(np.percentile(values, p) * ns) if count else 0} for p in PERCENTILES
        ],
        "histogram": histogram,
        "statusCodeDistribution": dict(codes),
        "errorDistribution": dict(errors),
    }


def run(path: Path, *, progress: bool = True, use_ghz: bool = True) -> dict:
    """Run the configuration at ``path``; ghz when installed (and ``use_ghz``), else the built-in generator."""
    config = load_config(path)
    ghz = shutil.which("ghz") if use_ghz else None
    if ghz is not None:
        done = subprocess.run([ghz, "--config", str(path), "--format", "json"], capture_output=True, text=True,
                              check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"ghz failed: {done.stderr.strip()}")
        result = json.loads(done.stdout)
        result["generator"] = "ghz"
        return result
    latencies, codes, errors, seconds = asyncio.run(_generate(config, progress))
    return report(config.name, latencies, codes, errors, seconds)


def compare(reports: list[dict]) -> str:
    """A markdown table of ghz-format reports side by side. Reports may carry ``cpuPerCallMicros`` (with
    ``cpuBreakdown`` per process) and ``saturationRps``; their columns appear when any report has them."""

    def ms(result: dict, p: int) -> str:
        latency = next((d["latency"] for d in result["latencyDistribution"] if d["percentage"] == p), None)
        return "-" if latency is None else f"{latency / 1e6:.2f}"

    def cpu(result: dict) -> str:
        total = result.get("cpuPerCallMicros")
        if total is None:
            return "-"
        parts = result.get("cpuBreakdown")
        detail = " + ".join(f"{label} {value:.0f}" for label, value in parts.items()) if parts else ""
        return f"{total:.0f}" + (f" ({detail})" if detail else "")

    saturation = any("saturationRps" in result for result in reports)
    lines = [
        "| run | generator | calls | OK | calls/s | p50 (ms) | p90 (ms) | p99 (ms) | CPU per call (µs) |"
        + (" saturation (calls/s) |" if saturation else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if saturation else ""),
    ]
    for result in reports:
        row = (
            f"| {result.get('name', '?')} | {result.get('generator', '?')} | {result['count']} "
            f"| {result['statusCodeDistribution'].get('OK', 0)} | {result['rps']:.0f} | {ms(result, 50)} "
            f"| {ms(result, 90)} | {ms(result, 99)} | {cpu(result)} |"
        )
        if saturation:
            rate = result.get("saturationRps")
            row += " - |" if rate is None else f" {rate:.0f} |"
        lines.append(row)
    return "\n".join(lines)
