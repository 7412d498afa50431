"""The paired bootstrap over users plus run-to-run spread (server/simulation/intervals.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.simulation.intervals import MEAN, gain_lines, paired_gains


def _run(method: str, values: dict[str, np.ndarray], users: dict[str, list[str]], eps=8.0):
    """A cell record as compare writes it, with per-case NDCG@10 columns."""
    return {
        "method": method,
        "target_epsilon": eps,
        "epsilon": dict.fromkeys(values, eps),
        "platforms": {
            p: {
                "ndcg@10": float(np.mean(v)),
                "cases": {"user": users[p], "ndcg@10": [float(x) for x in v]},
            }
            for p, v in values.items()
        },
    }


def _users(n: int, per_user: int = 2) -> list[str]:
    return [f"u{k // per_user}" for k in range(n)]


def test_a_constant_gain_has_no_sampling_error() -> None:
    rng = np.random.default_rng(0)
    base = {"a": rng.random(40), "b": rng.random(30)}
    users = {"a": _users(40), "b": _users(30)}
    theirs = [_run("local", base, users)]
    ours = [_run("fedavg", {p: v + 0.1 for p, v in base.items()}, users)]
    gains = paired_gains(ours, theirs)
    for key in ("a", "b", MEAN):
        assert gains[key].estimate == pytest.approx(0.1)
        assert gains[key].sampling == pytest.approx(0.0, abs=1e-12)
        assert gains[key].runs == 0.0


def test_sampling_error_matches_the_spread_of_per_user_gains() -> None:
    rng = np.random.default_rng(1)
    n = 2000  # one case per user: the bootstrap SE is the SE of a mean
    gain = rng.normal(0.02, 0.2, size=n)
    base = rng.random(n)
    users = {"a": [f"u{k}" for k in range(n)]}
    gains = paired_gains([_run("f", {"a": base + gain}, users)], [_run("l", {"a": base}, users)])
    assert gains["a"].estimate == pytest.approx(gain.mean())
    assert gains["a"].sampling == pytest.approx(gain.std(ddof=1) / math.sqrt(n), rel=0.1)
    assert gains["a"].low < gains["a"].estimate < gains["a"].high


def test_run_to_run_spread_widens_the_interval() -> None:
    base = {"a": np.full(20, 0.3)}
    users = {"a": _users(20)}
    theirs = [_run("l", base, users)]
    ours = [_run("f", {"a": base["a"] + d}, users) for d in (0.0, 0.1)]  # runs disagree
    gains = paired_gains(ours, theirs)
    assert gains["a"].estimate == pytest.approx(0.05)
    assert gains["a"].runs == pytest.approx(np.std([0.3, 0.4], ddof=1) / math.sqrt(2))
    assert gains["a"].low < 0 < gains["a"].high  # two runs that far apart establish nothing


def test_a_person_is_resampled_on_every_platform_at_once() -> None:
    # the same people on two platforms with perfectly correlated gains: the mean's SE is the
    # platforms' SE, not the SE of independent platforms (which would be 1/√2 of it)
    rng = np.random.default_rng(2)
    n = 500
    gain = rng.normal(0.0, 0.3, size=n)
    users = {p: [f"u{k}" for k in range(n)] for p in ("a", "b")}
    zero = np.zeros(n)
    ours = [_run("f", {"a": gain, "b": gain}, users)]
    theirs = [_run("l", {"a": zero, "b": zero}, users)]
    gains = paired_gains(ours, theirs)
    assert gains[MEAN].sampling == pytest.approx(gains["a"].sampling, rel=0.05)


def test_cells_that_scored_different_cases_are_refused() -> None:
    base = {"a": np.zeros(4)}
    with pytest.raises(ValueError, match="different cases"):
        paired_gains(
            [_run("f", base, {"a": ["u0", "u1", "u2", "u3"]})],
            [_run("l", base, {"a": ["u0", "u1", "u2", "u9"]})],
        )


def test_gain_lines_say_established_only_when_the_interval_clears_zero() -> None:
    rng = np.random.default_rng(3)
    base = {"a": rng.random(400)}
    users = {"a": _users(400)}
    local = [_run("local", base, users)]
    popularity = [_run("popularity", {"a": base["a"] - 0.2}, users, eps=math.inf)]
    fed = [_run("fedavg", {"a": base["a"] + rng.normal(0, 0.05, 400) + 0.001}, users)]
    lines = gain_lines([*fed, *local, *popularity], ["fedavg"], ["local", "popularity"])
    assert len(lines) == 2
    over_local = next(line for line in lines if "over local" in line)
    over_popularity = next(line for line in lines if "over popularity" in line)
    assert "not established" in over_local
    assert "**established**" in over_popularity  # a non-private yardstick at any level
