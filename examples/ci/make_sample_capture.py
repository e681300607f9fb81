"""Make the sample capture the CI examples replay: iris traffic captured through mlmirror in front of the demo
``production`` model, with the true class of every other call reported afterwards as its outcome.

    python examples/ci/make_sample_capture.py examples/ci/capture

Deterministic traffic (seeded); the capture keeps request and response bytes (``tensors: false``, to stay small).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
from mlmirror.config import parse_config
from mlmirror.demo.models import CLASS_MEANS, MODELS, serve_model
from mlmirror.demo.traffic import infer_request
from mlmirror.protos import feedback_pb2
from mlmirror.runtime.proxy import Proxy

CALLS, ROWS = 250, 2
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
REPORT_OUTCOME = "/mlmirror.v1.Feedback/ReportOutcome"


async def capture(directory: Path) -> None:
    rng = np.random.default_rng(2026)
    classes = rng.integers(0, 3, size=(CALLS, ROWS))
    x = (CLASS_MEANS[classes] + rng.normal(size=(CALLS, ROWS, 4)) * np.array([0.35, 0.35, 0.45, 0.2])).astype("<f4")
    server, port = await serve_model(MODELS["production"], "127.0.0.1:0")
    config = parse_config(textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin: off
        mirror_shed_lag: off
        upstreams: {{production: 127.0.0.1:{port}}}
        routes:
          - name: iris
            match: {{}}
            primary: production
            capture: {{path: {directory}, tensors: false}}
    """))  # fmt: skip
    proxy = Proxy(config)
    await proxy.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
            infer = channel.unary_unary(MODEL_INFER)
            ids = [f"sample-{i:04d}" for i in range(CALLS)]
            for i, request_id in enumerate(ids):
                await infer(infer_request(x[i], request_id=request_id), timeout=10)
            report = channel.unary_unary(REPORT_OUTCOME, feedback_pb2.ReportOutcomeRequest.SerializeToString)
            outcomes = [feedback_pb2.Outcome(request_id=ids[i], labels=[str(c) for c in classes[i]])
                        for i in range(0, CALLS, 2)]  # fmt: skip
            await report(feedback_pb2.ReportOutcomeRequest(outcomes=outcomes), timeout=10)
        writer = proxy._captures["iris"]
        deadline = time.monotonic() + 30
        while writer.stats.records < CALLS or writer.stats.outcomes < len(outcomes):
            if time.monotonic() > deadline:
                raise SystemExit("the capture did not complete within 30 s")
            await asyncio.sleep(0.05)
    finally:
        await proxy.stop(grace=0)
        await server.stop(None)


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        asyncio.run(capture(Path(scratch)))
        [file] = sorted(Path(scratch).glob("*.jsonl"))
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.jsonl"):
            old.unlink()
        shutil.copy(file, out / "sample.jsonl")
    print(f"{out / 'sample.jsonl'}: {CALLS} calls, {CALLS // 2} outcomes")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/ci/capture"))
