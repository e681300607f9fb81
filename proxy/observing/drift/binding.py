"""Which model input a profile's unnamed features read.

A profile built from a bare array or table without ``--input`` names no input tensor: its features are "the
model's only input", whatever the model calls it (``input-0`` in MLServer, ``x``, ``INPUT0`` in Triton). Such a
profile records the tensor as null. Profiles written before that recorded the default name ``input``; they load
with the tensor unnamed and ``input`` preferred (see ``Reference.load``), so they keep working where they did.

The name is bound once: at start-up from the model's ``ModelMetadata`` when it declares its inputs
(``metadata_check.fit_profile``), otherwise from the inputs of the first call the drift engine decodes.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["LEGACY_INPUT", "choose_input"]

#: The tensor name ``mlmirror profile build`` recorded when ``--input`` was not given, before unnamed tensors.
LEGACY_INPUT = "input"


def choose_input(inputs: Sequence[str], preferred: str | None = None) -> str:
    """The input unnamed features read, among the model's ``inputs`` (in the model's order): ``preferred`` when the
    model has it, else the only input; ValueError listing the inputs when there is none or several."""
    if preferred is not None and preferred in inputs:
        return preferred
    if len(inputs) == 1:
        return inputs[0]
    if not inputs:
        raise ValueError("the profile names no input tensor, and the model has no inputs")
    raise ValueError(
        f"the profile names no input tensor (built without --input), and the model has {len(inputs)} inputs: "
        f"{', '.join(inputs)}; build the profile with --input NAME"
    )
