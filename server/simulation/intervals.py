"""95 % intervals for a gain between two compared methods, from test sampling and run to run.

A gain measured on one test set and a few runs has two sources of error: which users happen to
be in the test split (sampling), and which noise and Poisson samples a DP run happened to draw
(run to run). Both cells of a comparison score the very same ranking cases, so the sampling
part comes from a *paired* bootstrap over users: each draw reweights the people (a person's
cases on every platform move together, since one person's tastes correlate across platforms)
and recomputes every platform's mean gain from the run-averaged per-case values. The run part
is the variance of the cell's per-run means on the fixed test set over its runs (σ²/R for
each side; a single run adds none, which is exact only for a deterministic method). The
interval is the estimate ± 1.96 × the square root of their sum: counting the run noise that the
run-averaged values still carry twice makes it slightly conservative, never optimistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Z_95 = 1.959963984540054
DRAWS = 2000
MEAN = "mean"  # the key of the mean over platforms


@dataclass(frozen=True)
class Interval:
    """A gain (ours − theirs) and its 95 % interval; ``sampling``/``runs``: the two SEs."""

    estimate: float
    sampling: float
    runs: float

    @property
    def error(self) -> float:
        return math.hypot(self.sampling, self.runs)

    @property
    def low(self) -> float:
        return self.estimate - Z_95 * self.error

    @property
    def high(self) -> float:
        return self.estimate + Z_95 * self.error

    def text(self) -> str:
        return f"{self.estimate:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def _case_matrix(runs: Sequence[dict[str, Any]], platform: str, metric: str) -> np.ndarray:
    """(runs, cases) per-case values of ``metric`` on ``platform``."""
    return np.array([r["platforms"][platform]["cases"][metric] for r in runs], dtype=np.float64)


def _case_users(runs: Sequence[dict[str, Any]], platform: str) -> list[str]:
    """The cases' users, the same in every run (else the runs scored different cases)."""
    users = runs[0]["platforms"][platform]["cases"]["user"]
    for run in runs[1:]:
        if run["platforms"][platform]["cases"]["user"] != users:
            raise ValueError(f"{platform}: the runs of {runs[0]['method']} scored other cases")
    return users


def _run_variance(per_run: np.ndarray) -> float:
    """Variance of the mean over runs from the spread of the run means (0 for one run)."""
    return float(np.var(per_run, ddof=1) / len(per_run)) if len(per_run) > 1 else 0.0


def has_cases(runs: Sequence[dict[str, Any]], metric: str) -> bool:
    """Whether every run recorded per-case values of ``metric`` on every platform."""
    return all("cases" in m and metric in m["cases"] for r in runs for m in r["platforms"].values())


def paired_gains(
    ours: Sequence[dict[str, Any]],
    theirs: Sequence[dict[str, Any]],
    metric: str = "ndcg@10",
    draws: int = DRAWS,
    seed: int = 0,
) -> dict[str, Interval]:
    """Per platform and over the platforms' mean (``"mean"``), the gain of ``ours`` (a cell's
    runs) over ``theirs`` in ``metric``, each with its 95 % interval (see the module doc)."""
    platforms = sorted(set(ours[0]["platforms"]) & set(theirs[0]["platforms"]))
    if not platforms:
        raise ValueError("the two cells share no platform")
    people: dict[str, int] = {}
    columns = []  # per platform: (user index per case, per-case gain, run means of each side)
    for platform in platforms:
        users = _case_users(ours, platform)
        if _case_users(theirs, platform) != users:
            raise ValueError(f"{platform}: the two cells scored different cases")
        a, b = _case_matrix(ours, platform, metric), _case_matrix(theirs, platform, metric)
        index = np.array([people.setdefault(u, len(people)) for u in users], dtype=np.int64)
        columns.append((index, a.mean(0) - b.mean(0), a.mean(1), b.mean(1)))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(people), np.full(len(people), 1 / len(people)), size=draws)
    result: dict[str, Interval] = {}
    drawn, ours_runs, theirs_runs = [], [], []
    for platform, (index, gain, a_runs, b_runs) in zip(platforms, columns, strict=True):
        total = np.bincount(index, weights=gain, minlength=len(people))
        count = np.bincount(index, minlength=len(people)).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            resampled = (weights @ total) / (weights @ count)
        drawn.append(resampled)  # NaN in a draw holding none of the platform's users
        run_var = _run_variance(a_runs) + _run_variance(b_runs)
        result[platform] = Interval(
            float(gain.mean()), float(np.nanstd(resampled, ddof=1)), math.sqrt(run_var)
        )
        ours_runs.append(a_runs)
        theirs_runs.append(b_runs)
    means = np.mean(np.vstack(drawn), axis=0)
    run_var = _run_variance(np.mean(ours_runs, axis=0)) + _run_variance(
        np.mean(theirs_runs, axis=0)
    )
    result[MEAN] = Interval(
        float(np.mean([result[p].estimate for p in platforms])),
        float(np.nanstd(means, ddof=1)),
        math.sqrt(run_var),
    )
    return result


def _cells(results: Sequence[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Every cell's runs, keyed by (method, target ε)."""
    cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for result in results:
        cells.setdefault((result["method"], result["target_epsilon"]), []).append(result)
    return cells


def _private(runs: Sequence[dict[str, Any]]) -> bool:
    """Whether a cell's runs spent a finite ε anywhere (a non-private method never does)."""
    return any(math.isfinite(e) for r in runs for e in r["epsilon"].values())


def _label(method: str, epsilon: float, runs: Sequence[dict[str, Any]]) -> str:
    level = f"ε = {epsilon:g}" if _private(runs) else "no DP"
    return f"{method} ({level}, {len(runs)} run{'s' if len(runs) > 1 else ''})"


def gain_lines(
    results: Sequence[dict[str, Any]],
    ours: Sequence[str],
    yardsticks: Sequence[str],
    metric: str = "ndcg@10",
) -> list[str]:
    """Markdown lines: for each cell of a method in ``ours``, its gain in ``metric`` over each
    yardstick cell at the same level (or at any level when the yardstick is never private:
    its runs carry ε ∞ on every platform), per platform and on the mean, with 95 % intervals.
    A gain is *established* when its whole interval lies above 0."""
    cells = _cells(results)
    lines = []
    for (method, epsilon), runs in cells.items():
        if method not in ours or not has_cases(runs, metric):
            continue
        for (other, level), against in cells.items():
            if other not in yardsticks or other == method:
                continue
            if level != epsilon and _private(against):
                continue
            if not has_cases(against, metric):
                continue
            gains = paired_gains(runs, against, metric)
            verdict = "established" if gains[MEAN].low > 0 else "not established"
            lines.append(
                f"- {_label(method, epsilon, runs)} over {_label(other, level, against)}, "
                f"{metric}: mean {gains[MEAN].text()} — **{verdict}**; "
                + "; ".join(f"{p} {g.text()}" for p, g in gains.items() if p != MEAN)
            )
    return lines
