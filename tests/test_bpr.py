"""BPR-MF baselines: they learn planted structure, train the configured point early-stopped on
validation only, sample negatives from the user's real train interactions, pool users across
platforms with namespaced items, and run as ``fedfuse compare`` cells."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import server.simulation.bpr as bpr
import server.simulation.inhouse as inhouse
from client.popularity_prior import positive_counts
from common.config import RunConfig, load_config
from common.evaluation import CountScorer, evaluate
from common.task import Example, PlatformTask, RankingCase
from server.cli import main
from server.simulation.baselines import pooled_task
from server.simulation.compare import Cell, parse_levels
from server.simulation.methods import DEFAULT_METHODS

torch.set_num_threads(1)
POINT = bpr.Settings(dim=8, reg=1e-2)


class Untouchable(list):
    """A split that fails the test if anything reads it (tuning must never look at test)."""

    def _fail(self, *_: object) -> None:
        raise AssertionError("the test split was read")

    __iter__ = __len__ = __getitem__ = __bool__ = __contains__ = _fail  # type: ignore[assignment]


def planted_task(
    name: str = "p",
    users: int = 40,
    items: int = 40,
    likes: int = 10,
    seed: int = 0,
    item_prefix: str = "i",
    held_out: bool = True,
) -> PlatformTask:
    """Two taste groups: user ``u{k}`` likes only items of its group (``k % 2``), every item
    about equally often, so popularity is at chance and only collaborative signal ranks. Each
    user's held-out positives (valid, test) are unseen items of its group among negatives of the
    other group."""
    rng = np.random.default_rng(seed)
    group = {g: [f"{item_prefix}{k}" for k in range(g, items, 2)] for g in (0, 1)}
    task = PlatformTask(name)
    for k in range(users):
        user, own, other = f"u{k}", group[k % 2], group[1 - k % 2]
        chosen = [own[j] for j in rng.permutation(len(own))[: likes + 2]]
        task.train += [Example(user, (), item, 1) for item in chosen[:likes]]
        if not held_out:
            continue
        negatives = tuple(other[j] for j in rng.permutation(len(other))[:15])
        for split, positive in (("valid", chosen[likes]), ("test", chosen[likes + 1])):
            task.split(split).append(Example(user, (), positive, 1))
            task.split(split).append(Example(user, (), negatives[0], 0))
            task.ranking(split).append(RankingCase(user, (), positive, negatives))
    return with_catalogue(task)


def with_catalogue(task: PlatformTask) -> PlatformTask:
    """``task`` with the catalogue and per-user items the full-catalogue metrics read."""
    examples = [*task.train, *task.valid, *task.test]
    cases = [*task.valid_ranking, *task.test_ranking]
    items = {e.candidate for e in examples} | {i for c in cases for i in c.candidates}
    task.catalogue = tuple(sorted(items))
    seen: dict[str, set[str]] = {}
    for e in examples:
        seen.setdefault(e.user, set()).add(e.candidate)
    task.seen = {user: frozenset(items) for user, items in seen.items()}
    return task


def test_bpr_ranks_planted_taste_far_above_popularity_and_chance() -> None:
    task = planted_task()
    model, data, tuning = bpr.train_bpr({"p": task}, False, POINT)
    learned = evaluate(bpr.BPRScorer(model, data), None, task, "test")  # type: ignore[arg-type]
    popular = evaluate(CountScorer(positive_counts(task)), None, task, "test")  # type: ignore[arg-type]
    assert learned["mrr"] > 0.9 and learned["auc"] > 0.9
    assert popular["mrr"] < 0.4  # 16 candidates with flat counts: chance is about 0.2
    assert tuning["chosen"]["valid_ndcg@10"] > 0.9


def test_training_reads_validation_only_and_trains_the_configured_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task = planted_task()
    task.test, task.test_ranking = Untouchable(task.test), Untouchable(task.test_ranking)
    splits: list[str] = []
    protocol = inhouse.evaluate

    def spy(scorer: object, featurizer: object, task: PlatformTask, split: str) -> dict:
        splits.append(split)
        return protocol(scorer, featurizer, task, split)  # type: ignore[arg-type]

    monkeypatch.setattr(inhouse, "evaluate", spy)
    settings = bpr.Settings(dim=12, reg=3e-2, eval_every=4, patience=2, max_epochs=40, seed=1)
    model, _, tuning = bpr.train_bpr({"p": task}, False, settings)
    assert splits and set(splits) == {"valid"}
    assert model.user.shape[1] == 12 and tuning["settings"]["reg"] == 3e-2
    chosen = tuning["chosen"]
    assert (chosen["dim"], chosen["reg"]) == (12, 3e-2) and chosen["best_epoch"] % 4 == 0
    assert set(chosen) == {"dim", "reg", "best_epoch", "epochs_run", "valid_ndcg@10"}


def test_the_point_comes_from_the_baselines_section() -> None:
    config = RunConfig.model_validate({"baselines": {"bpr_dim": 24, "bpr_reg": 0.05}})
    assert bpr.Settings.of(config.baselines, 7) == bpr.Settings(dim=24, reg=0.05, seed=7)
    assert len(bpr.grid_overrides()) == len(bpr.GRID)
    assert load_config(None, bpr.grid_overrides()[0]).baselines.bpr_dim == bpr.GRID[0][0]


def test_early_stopping_keeps_the_best_validated_state() -> None:
    data = bpr.Interactions.of_tasks({"p": planted_task()}, pooled=False)
    settings = bpr.Settings(dim=4, reg=1e-3, eval_every=2, patience=3, max_epochs=50)
    seen: list[torch.Tensor] = []

    def worsening(model: bpr.BPRModel) -> float:
        seen.append(model.user.detach().clone())
        return -float(len(seen))  # the first validation is the best

    model, record = bpr.fit(data, settings, worsening)
    assert record["best_epoch"] == 2 and record["epochs_run"] == 2 * (1 + 3)
    assert torch.equal(model.user.detach(), seen[0]) and not torch.equal(seen[0], seen[-1])


def test_training_is_deterministic() -> None:
    task = planted_task()
    first, _, one = bpr.train_bpr({"p": task}, False, replace(POINT, seed=3))
    second, _, two = bpr.train_bpr({"p": task}, False, replace(POINT, seed=3))
    assert one == two and torch.equal(first.item, second.item)
    third, _, _ = bpr.train_bpr({"p": task}, False, replace(POINT, seed=4))
    assert not torch.equal(first.item, third.item)


def test_negatives_are_never_seen_in_train() -> None:
    task = planted_task(items=12, likes=4, held_out=False)
    task.train += [Example("u0", (), "i1", 0)]  # a rated-but-disliked item counts as seen
    data = bpr.Interactions.of_tasks({"p": task}, pooled=False)
    users = np.repeat(np.arange(len(data.users)), 200)
    negatives = data.sample_negatives(np.random.default_rng(0), users)
    codes = users * len(data.items) + negatives
    assert (negatives >= 0).all() and not np.isin(codes, data.seen).any()
    assert data.items["i1"] in set(negatives.tolist())  # users of the other group may get it
    u0 = data.users["u0"]
    assert data.items["i1"] not in set(negatives[users == u0].tolist())


def test_sampled_negatives_are_not_interactions() -> None:
    """The protocol's sampled negatives (label-0 examples, also on their positive's
    ``negatives``) are candidates BPR may sample; a rated dislike stays excluded."""
    task = PlatformTask("p")
    task.train = [
        Example("u0", (), "a", 1, ("x", "y")),
        Example("u0", (), "x", 0),  # sampled for u0's positive: never an interaction
        Example("u0", (), "y", 0),
        Example("u0", (), "b", 0),  # rated and disliked
        Example("u1", (), "x", 1, ("a",)),
        Example("u1", (), "a", 0),  # sampled for u1 (u0's positive is no reason to drop it)
        Example("u1", (), "y", 0),  # u1 rated y: not among u1's own sampled negatives
    ]
    assert [(e.user, e.candidate) for e in inhouse.rated_train(task.train)] == [
        ("u0", "a"),
        ("u0", "b"),
        ("u1", "x"),
        ("u1", "y"),
    ]
    data = bpr.Interactions.of_tasks({"p": task}, pooled=False)
    index = lambda user, item: data.users[user] * len(data.items) + data.items[item]  # noqa: E731
    pairs = [("u0", "a"), ("u0", "b"), ("u1", "x"), ("u1", "y")]
    assert data.seen.tolist() == sorted(index(*pair) for pair in pairs)
    users = np.repeat([data.users["u0"]], 400)
    drawn = set(data.sample_negatives(np.random.default_rng(0), users).tolist())
    assert {data.items["x"], data.items["y"]} <= drawn and data.items["b"] not in drawn


def test_pooled_model_shares_users_and_keeps_platform_items_apart() -> None:
    """Same item id on both platforms, same users: the pooled model has one vector per user,
    one per (platform, item), with ``pooled_task``'s keys. A user with no train data on ``b``
    is ranked there through what ``a`` taught; ``b``'s own model can only give chance."""
    a = planted_task("a", seed=1)
    b = planted_task("b", seed=2)
    cold = {f"u{k}" for k in range(0, 40, 4)} | {f"u{k}" for k in range(1, 40, 4)}
    b.train = [e for e in b.train if e.user not in cold]
    tasks = {"a": a, "b": b}
    data = bpr.Interactions.of_tasks(tasks, pooled=True)
    assert len(data.users) == 40 and len(data.items) == 80
    fake = [
        SimpleNamespace(
            identity=SimpleNamespace(name=n), task=t, featurizer=SimpleNamespace(item_text={})
        )
        for n, t in tasks.items()
    ]
    assert {e.candidate for e in pooled_task(fake)[0].train} == set(data.items)  # type: ignore[arg-type]

    pooled, data, _ = bpr.train_bpr(tasks, True, POINT)
    local, own, _ = bpr.train_bpr({"b": b}, False, POINT)
    cold_b = PlatformTask("b", test=[e for e in b.test if e.user in cold])
    cold_b.test_ranking = [c for c in b.test_ranking if c.user in cold]
    with_catalogue(cold_b)
    across = evaluate(bpr.BPRScorer(pooled, data, "b"), None, cold_b, "test")  # type: ignore[arg-type]
    alone = evaluate(bpr.BPRScorer(local, own), None, cold_b, "test")  # type: ignore[arg-type]
    assert across["mrr"] > 0.7
    assert alone["mrr"] < 0.4  # unseen user: zero vector, only the item biases rank


def test_unseen_users_and_items_score_neutral() -> None:
    model, data, _ = bpr.train_bpr({"p": planted_task()}, False, POINT)
    scorer = bpr.BPRScorer(model, data)
    [known] = scorer.score_cases(None, [RankingCase("u0", (), "i0", ("nowhere",))], 1)
    [stranger] = scorer.score_cases(None, [RankingCase("ghost", (), "i0", ("i1", "nowhere"))], 1)
    assert known[1] == 0.0 and known[0] != 0.0
    assert stranger[2] == 0.0 and stranger[0] == pytest.approx(
        float(model.bias.detach()[data.items["i0"]])
    )
    logits = scorer.score_examples(None, [Example("ghost", (), "nowhere", 1)], 1)
    assert logits.tolist() == [0.0]


def test_compare_runs_bpr_cells_as_non_private_baselines(
    tmp_path: Path, write_run_config, capsys: pytest.CaptureFixture[str]
) -> None:
    assert [c.method for c in parse_levels(["8"])] == list(DEFAULT_METHODS)  # only when named
    assert parse_levels(["inf:bpr_local,bpr_pooled"]) == [
        Cell("bpr_local", math.inf),
        Cell("bpr_pooled", math.inf),
    ]
    config = write_run_config(tmp_path / "run.toml", dp={"delta": 1e-4})
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(config), "--out", str(out), "--test-cases", "6"]
    assert main([*args, "--epsilon", "4:popularity,bpr_local,bpr_pooled"]) == 0
    results = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in results] == ["popularity", "bpr_local", "bpr_pooled"]
    for result in results:
        assert sorted(result["platforms"]) == ["p0", "p1"]
        assert all(math.isinf(e) for e in result["epsilon"].values())  # ignores the level
        for metrics in result["platforms"].values():
            assert metrics["num-examples"] == 6 and np.isfinite(list(metrics.values())).all()
    local, pooled = results[1]["tuning"], results[2]["tuning"]
    assert sorted(local) == ["p0", "p1"]
    for tuning in [*local.values(), pooled]:
        chosen = tuning["chosen"]
        assert (chosen["dim"], chosen["reg"]) == (32, 1e-1)  # the [baselines] defaults
        assert 0 < chosen["best_epoch"] <= chosen["epochs_run"]
    report = (out / "comparison.md").read_text()
    assert "| bpr_local |" in report and "| **bpr_pooled** | **mean** |" in report
    capsys.readouterr()
    assert main([*args, "--epsilon", "4:bpr_pooled"]) == 0
    assert "bpr_pooled@eps4: cached" in capsys.readouterr().out
