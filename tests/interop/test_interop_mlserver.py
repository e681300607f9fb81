"""MLServer specifics: a model whose model-settings.json declares no inputs answers ModelMetadata with none, and
a drift route in front of it must still start (warning once) and watch the inputs the calls carry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest

from tests.interop.flows import check_drift, drift_config
from tests.interop.harness import SERVICE, inference_pb2, kserve_request, profile_build, raw_call, running_mlmirror
from tests.interop.servers import Peer

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def test_undeclared_inputs_metadata_passes_through_empty(mlserver_peer: Peer, tmp_path: Path):
    bare = dataclasses.replace(mlserver_peer, model="iris-bare")
    request = kserve_request("ModelMetadata", name=bare.model)
    config = f"""\
upstreams: {{v1: {bare.primary.address}}}
routes:
  - name: mlserver
    match: {{model: {bare.model}}}
    primary: v1
"""
    with (running_mlmirror(config, tmp_path) as mirror, grpc.insecure_channel(bare.primary.address) as direct,
          mirror.channel() as proxied):  # fmt: skip
        expected, _ = raw_call(direct, SERVICE + "ModelMetadata", request)
        got, _ = raw_call(proxied, SERVICE + "ModelMetadata", request)
    assert got == expected
    metadata = inference_pb2.ModelMetadataResponse.FromString(got)
    assert metadata.name == bare.model
    assert list(metadata.inputs) == []  # what MLServer 1.7 says when model-settings.json declares no inputs


def test_drift_starts_and_works_when_the_model_declares_no_inputs(mlserver_peer: Peer, tmp_path: Path):
    bare = dataclasses.replace(mlserver_peer, model="iris-bare")
    profile = profile_build(bare.train, tmp_path / "profile.npz", "--input", bare.input_name)
    with running_mlmirror(drift_config(bare, profile, 50), tmp_path) as mirror:
        check_drift(bare, mirror)
