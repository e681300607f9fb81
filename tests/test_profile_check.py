"""A drift profile that does not fit the model's declared inputs (KServe ModelMetadata) stops the proxy's start,
saying what differs; one that fits starts; a model that cannot be asked is logged, not fatal."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from mlmirror.config import parse_config
from mlmirror.errors import StartError
from mlmirror.observing.drift.profile_build import build_profile
from mlmirror.runtime.proxy import Proxy

from tests.support import model_server


def profile(tmp_path: Path, columns: int, input_name: str = "input", text: bool = False) -> Path:
    data = tmp_path / "ref.npy"
    values = np.random.default_rng(0).normal(size=(200, columns))
    np.save(data, values.astype(str) if text else values)
    out = tmp_path / f"profile-{input_name}-{columns}-{text}.npz"
    build_profile(data, out, bins=5, model="iris", version="1", input_name=input_name, names=None)
    return out


def config(port: int, path: Path) -> str:
    return f"""
listen: 127.0.0.1:0
admin: 127.0.0.1:0
upstreams: {{production: 127.0.0.1:{port}}}
routes:
  - name: iris
    match: {{model: iris}}
    primary: production
    drift: {{profile: {path}}}
"""


@pytest.mark.parametrize(
    ("columns", "input_name", "text", "message"),
    [
        (6, "input", False, "input[4]: column 4, but input 'input' has 4"),
        (4, "features", False, "the model has no input 'features' (it has ['input'])"),
        (4, "input", True, "input[0]: categorical in the profile, but input 'input' is FP32"),
    ],
    ids=["too-wide", "wrong-tensor", "wrong-kind"],
)
async def test_a_profile_that_does_not_fit_the_model_stops_the_start(tmp_path, columns, input_name, text, message):
    async with model_server("production") as port:
        proxy = Proxy(parse_config(config(port, profile(tmp_path, columns, input_name, text))))
        with pytest.raises(StartError) as caught:
            await proxy.start()
    assert "route iris: profile" in str(caught.value)
    assert "does not fit the inputs of production" in str(caught.value)
    assert message in str(caught.value)


async def test_a_profile_that_fits_starts_and_an_unreachable_model_is_only_logged(tmp_path, caplog):
    good = profile(tmp_path, 4)
    async with model_server("production") as port:
        proxy = Proxy(parse_config(config(port, good)))
        await proxy.start()
        assert proxy.status()["routes"][0]["drift"]["reference"]["rows"] == 200
        await proxy.stop(grace=0)
    with caplog.at_level(logging.WARNING, logger="mlmirror.runtime.proxy"):
        proxy = Proxy(parse_config(config(1, good)))  # nothing listens on port 1
        await proxy.start()
        await proxy.stop(grace=0)
    assert any("cannot check profile" in record.getMessage() for record in caplog.records)
