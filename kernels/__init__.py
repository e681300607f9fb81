"""Numba kernels for drift (histogram updates and divergences over binned counts) and for comparing a shadow's answer
with production's (kernels/agreement.py).

The package never imports ``proxy``. Kernels are ``@njit(nogil=True, cache=True)`` behind Python wrappers that
validate their inputs; ``warm_up()`` compiles (or loads from the cache) every kernel, so that a service pays for it
at start-up rather than on its first window. Formulas, log bases and epsilons are in each module's docstring.
"""

from __future__ import annotations

import numpy as np
from mlmirror.kernels import agreement
from mlmirror.kernels.agreement import argmax_agreement, differences
from mlmirror.kernels.divergence import chi_square, hellinger, js, kl, ks, linf, psi, slot_positions, wasserstein
from mlmirror.kernels.edges import quantile_edges, uniform_edges
from mlmirror.kernels.histogram import edge_guide, new_counts, update_categorical, update_sorted_edges, update_uniform

__all__ = [
    "argmax_agreement",
    "chi_square",
    "differences",
    "edge_guide",
    "hellinger",
    "js",
    "kl",
    "ks",
    "linf",
    "new_counts",
    "psi",
    "quantile_edges",
    "slot_positions",
    "uniform_edges",
    "update_categorical",
    "update_sorted_edges",
    "update_uniform",
    "warm_up",
    "wasserstein",
]


def warm_up() -> None:
    """Compile every kernel for the types the engine uses (a no-op after the first call in a process)."""
    edges = uniform_edges(np.zeros(2), np.ones(2), 4)
    counts = new_counts(2, 4)
    values = np.full((3, 2), 0.5)
    update_uniform(counts, values, edges)
    update_sorted_edges(counts, values, edges)
    update_categorical(np.zeros((2, 3), dtype=np.int64), np.zeros((3, 2), dtype=np.int64))
    reference = counts[:, :-1].astype(np.float64) + 1.0
    psi(reference, reference)
    kl(reference, reference)
    js(reference, reference)
    wasserstein(reference, reference, slot_positions(edges))
    chi_square(reference, reference)
    agreement.warm_up()
