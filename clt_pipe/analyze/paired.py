"""Paired comparison of two classifiers on the same images: what a substitution costs against the baseline.

Accuracies of a substituted model and of the unmodified one come from the *same* images, so their difference
is judged on the discordant pairs, not with two independent binomial errors:

* ``lost`` = images the baseline got right and the variant wrong; ``gained`` the reverse.
* ``mcnemar_p`` = exact (binomial) McNemar test, two-sided: P(≤ min(lost, gained) of lost+gained fair coin
  flips, both tails); 1.0 when nothing changed.
* ``ci_lo_pp`` / ``ci_hi_pp`` = percentile interval (``level``) of Δaccuracy in pp from a seeded paired
  bootstrap over images. The per-image difference takes only the values −1 / 0 / +1, so resampling n images is
  exactly a multinomial draw of the three counts: ``n_boot`` draws cost O(n_boot), not O(n_boot · n).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

BOOT_DRAWS = 4000
BOOT_LEVEL = 0.95
BOOT_SEED = 0
PAIRED_KEYS = ("lost", "gained", "mcnemar_p", "ci_lo_pp", "ci_hi_pp")


def mcnemar_exact(lost: int, gained: int) -> float:
    n = lost + gained
    return 1.0 if n == 0 else float(binomtest(min(lost, gained), n, 0.5).pvalue)


def paired_delta(base_correct, new_correct, n_boot: int = BOOT_DRAWS, level: float = BOOT_LEVEL,
                 seed: int = BOOT_SEED) -> dict:
    """Paired statistics of ``new`` against ``base`` (boolean per-image correctness, same images, same order)."""
    b = np.asarray(base_correct, bool)
    v = np.asarray(new_correct, bool)
    if b.shape != v.shape:
        raise ValueError(f"paired_delta: {b.shape} vs {v.shape} images")
    n = int(b.size)
    lost, gained = int((b & ~v).sum()), int((~b & v).sum())
    out = {"lost": lost, "gained": gained, "mcnemar_p": mcnemar_exact(lost, gained)}
    if n == 0:
        return {**out, "ci_lo_pp": float("nan"), "ci_hi_pp": float("nan")}
    draws = np.random.default_rng(seed).multinomial(n, [lost / n, gained / n, (n - lost - gained) / n], n_boot)
    deltas = 100.0 * (draws[:, 1] - draws[:, 0]) / n
    tail = 100.0 * (1.0 - level) / 2
    lo, hi = np.percentile(deltas, [tail, 100.0 - tail])
    return {**out, "ci_lo_pp": float(lo), "ci_hi_pp": float(hi)}


def paired_columns(base_hits: np.ndarray, hits: np.ndarray, with_top5: bool) -> dict:
    """The paired columns of a result row from [n, 2] (top-1, top-k) hit arrays; top-k only when it can move."""
    cols = paired_delta(base_hits[:, 0], hits[:, 0])
    if with_top5:
        cols.update({f"top5_{k}": v for k, v in paired_delta(base_hits[:, 1], hits[:, 1]).items()})
    return cols


def paired_text(row: dict) -> str:
    """One line for the CLI summary: Δtop-1 with its interval, lost / gained and the McNemar p."""
    return (f"Δ {row['delta_top1_pp']:+.2f} pp [{row['ci_lo_pp']:+.2f}, {row['ci_hi_pp']:+.2f}], "
            f"lost {row['lost']} gained {row['gained']}, McNemar p {row['mcnemar_p']:.2g}")
