"""The source rule: which CLT source layers write into a substituted target layer (the one home of it).

A CLT reconstructs the MLP output of layer j as ŷ_j = Σ_{i≤j} z_i W_dec^{i→j} (+ b_dec_j). When only the layers
of a window W = first..last are substituted, two readings of "substitute ŷ_j" exist:

* ``full`` (the default, ``sources_before_window = true``): ŷ_j is the CLT's own reconstruction, every source
  0..j. Codes of layers before the window are computed from their live inputs, which are still the unmodified
  model's there, so ŷ_j is exactly what the fidelity part measures.
* ``window`` (``sources_before_window = false``): only sources inside the window write (first..j). This is a
  truncated ŷ_j, not the CLT's reconstruction (on the demo its CLS R² at layer 1 is −4.84 where the
  full one is 0.884: ``python -m clt_pipe.demo.figures``), so substitution then also measures the missing
  cross-layer writes.

Ablations additionally drop whole source layers (their features write into no target).
"""

from __future__ import annotations

RULES = {True: "full", False: "window"}
DESCRIPTIONS = {
    "full": "full reconstruction: substituted ŷ_j = Σ_{i≤j} CLT sources (layers before the window encoded from "
            "their live, unmodified inputs)",
    "window": "in-window sources only: substituted ŷ_j = Σ over sources first..j of the window",
}


def rule(sources_before_window: bool) -> str:
    return RULES[bool(sources_before_window)]


def describe(sources_before_window: bool) -> str:
    return DESCRIPTIONS[rule(sources_before_window)]


def source_floor(first_replaced: int, sources_before_window: bool) -> int:
    """The lowest source layer that writes when ``first_replaced`` is the first substituted layer."""
    return 0 if sources_before_window else first_replaced


def sources_for(target: int, floor: int, dropped: frozenset[int] | set[int] = frozenset()) -> list[bool]:
    """Per source layer 0..target: does it write into ``target``?"""
    return [floor <= i and i not in dropped for i in range(target + 1)]
