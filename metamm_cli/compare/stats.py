"""The one interval ``metamm compare`` shows, in its table and its plot alike: the 95% confidence
interval of a mean over seeds, ``t(0.975, n-1) * std / sqrt(n)`` (Student t with n-1 degrees of
freedom: at n = 2 the normal 1.96 would be 6.5 times too narrow). One run has no spread over
seeds; it shows its own 95% CI over its episodes (:func:`metamm_cli.evaluate.mean_ci95`, where n
is hundreds of episodes and t is 1.96). No scipy: the quantiles are a table and, past 30 degrees
of freedom, the Cornish-Fisher expansion of t about the normal quantile."""
from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

INTERVAL = "95% CI (t, n-1)"  # the interval's name in column headers, legends and axis labels
Z975 = 1.959963984540054  # the normal quantile of 0.975
# t(0.975, dof) for dof = 1..30 (the standard table; e.g. scipy.stats.t.ppf(0.975, dof))
T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
        2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
        2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
        2.048407, 2.045230, 2.042272)


def t975(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` degrees of freedom (1.96 as dof grows)."""
    if dof < 1:
        raise ValueError(f"t quantile: dof={dof}, needs at least 1")
    if dof <= len(T975):
        return T975[dof - 1]
    z, v = Z975, float(dof)  # Cornish-Fisher; under 1e-5 off at dof = 31, closer beyond
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3))


def ci95(values: Sequence[float]) -> Optional[float]:
    """Half-width of the 95% CI of the mean of ``values`` (n >= 2), else None."""
    n = len(values)
    if n < 2:
        return None
    return t975(n - 1) * statistics.stdev(values) / math.sqrt(n)
