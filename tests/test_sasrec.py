"""SASRec baselines: they learn a planted sequential pattern that popularity cannot see, are
deterministic, score unknown items neutrally, merge a person's platforms by time when pooled,
read their point from ``[baselines]`` and run as ``fedfuse compare`` cells."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import server.simulation.sasrec as sasrec
from client.popularity_prior import positive_counts
from common.config import RunConfig, load_config
from common.errors import ConfigError
from common.evaluation import CountScorer, evaluate
from common.task import Example, PlatformTask, RankingCase
from server.cli import main
from server.simulation.compare import Cell, parse_levels

torch.set_num_threads(1)
SMALL = sasrec.SASRecSettings(
    dim=16, layers=1, heads=1, dropout=0.0, lr=1e-2, max_len=5, batch_size=32,
    max_epochs=30, eval_every=5, patience=2,
)  # fmt: skip


def cycle_task(name: str = "p", users: int = 40, items: int = 20, length: int = 10) -> PlatformTask:
    """Every user walks the item cycle i0 -> i1 -> ... from a random start, so each item is
    about equally popular and only the last item tells the next. The held-out positive (valid,
    then test) is the next step; the negatives are other items of the cycle."""
    rng = np.random.default_rng(0)
    task = PlatformTask(name, catalogue=tuple(f"i{k}" for k in range(items)))
    for u in range(users):
        user, start = f"u{u}", int(rng.integers(items))
        walk = [f"i{(start + k) % items}" for k in range(length + 2)]
        history: list[str] = []
        for t, item in enumerate(walk):
            recent, when = tuple(reversed(history[-5:])), 1000.0 * u + t + 1
            if t < length:
                task.train.append(Example(user, recent, item, 1, time=when))
            else:
                split = "valid" if t == length else "test"
                others = [f"i{k}" for k in range(items) if f"i{k}" not in walk]
                negatives = tuple(rng.permutation(others)[:9].tolist())
                task.split(split).append(Example(user, recent, item, 1, time=when))
                task.ranking(split).append(RankingCase(user, recent, item, negatives, when))
            history.append(item)
        task.seen[user] = frozenset(walk)
    return task


def test_sasrec_learns_the_planted_sequence_far_above_popularity() -> None:
    task = cycle_task()
    model, sequences, record = sasrec.fit({"p": task}, False, SMALL)
    scorer = sasrec.SASRecScorer(model, sequences.data.items, SMALL.max_len)
    learned = evaluate(scorer, None, task, "test")  # type: ignore[arg-type]
    popular = evaluate(CountScorer(positive_counts(task)), None, task, "test")  # type: ignore[arg-type]
    assert record["valid_ndcg@10"] > 0.8 and learned["ndcg@10"] > 0.8
    assert popular["ndcg@10"] < learned["ndcg@10"] - 0.25  # counts are about flat
    assert 0 < record["best_epoch"] <= record["epochs_run"] <= SMALL.max_epochs
    assert record["dim"] == SMALL.dim and record["lr"] == SMALL.lr


def test_training_is_deterministic() -> None:
    task = cycle_task(users=16)
    quick = replace(SMALL, max_epochs=5, dropout=0.1)
    first, _, one = sasrec.fit({"p": task}, False, quick)
    second, _, two = sasrec.fit({"p": task}, False, quick)
    assert one == two and torch.equal(first.item.weight, second.item.weight)
    third, _, _ = sasrec.fit({"p": task}, False, replace(quick, seed=1))
    assert not torch.equal(first.item.weight, third.item.weight)


def test_a_kept_model_is_reused_as_trained_and_a_new_digest_trains_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed comparison reuses its in-house models (TrainedStore): the kept state and
    record are exactly the trained ones, for SASRec and BPR; nothing is trained again; and
    a different digest (settings, data or code changed) is a different file: trained anew."""
    from server.simulation import bpr
    from server.simulation.inhouse import TrainedStore

    task = cycle_task(users=16)
    quick = replace(SMALL, max_epochs=5, dropout=0.1)
    store = TrainedStore(tmp_path / "p", "a" * 64)
    model, _, record = sasrec.fit({"p": task}, False, quick, store=store, name="sasrec_local")
    settings = bpr.Settings(dim=8, reg=0.01, max_epochs=4, eval_every=2)
    factors, _, chosen = bpr.train_bpr({"p": task}, False, settings, store)
    assert sorted(p.name for p in store.folder.iterdir()) == [
        f"{name}-{'a' * 16}.{ext}"
        for name in ("bpr_local", "sasrec_local")
        for ext in ("json", "safetensors")
    ]

    def never(*_: object) -> None:
        raise AssertionError("trained again")

    monkeypatch.setattr(sasrec, "_train_epoch", never)
    monkeypatch.setattr(bpr.BPRModel, "loss", never)
    again, _, kept = sasrec.fit({"p": task}, False, quick, store=store, name="sasrec_local")
    assert kept == record and not again.training
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    refit, _, same = bpr.train_bpr({"p": task}, False, settings, store)
    assert same == chosen and all(
        torch.equal(refit.state_dict()[k], v) for k, v in factors.state_dict().items()
    )
    with pytest.raises(AssertionError, match="trained again"):
        sasrec.fit({"p": task}, False, quick, store=TrainedStore(store.folder, "b" * 64))


def test_the_digest_follows_the_settings_and_every_byte_of_the_data(tmp_path: Path) -> None:
    from server.simulation.inhouse import training_digest

    data = tmp_path / "interactions.tsv"
    data.write_text("u1\ti1\t5\t1\n", encoding="utf-8")
    first = training_digest("settings", "p", files=[data])
    assert training_digest("settings", "p", files=[data]) == first
    assert training_digest("other settings", "p", files=[data]) != first
    assert training_digest("settings", "q", files=[data]) != first
    data.write_text("u1\ti1\t4\t1\n", encoding="utf-8")
    assert training_digest("settings", "p", files=[data]) != first


def test_unknown_items_score_zero_and_unknown_history_is_ignored() -> None:
    task = cycle_task(users=8)
    model, sequences, _ = sasrec.fit({"p": task}, False, replace(SMALL, max_epochs=2))
    scorer = sasrec.SASRecScorer(model, sequences.data.items, SMALL.max_len)
    [plain] = scorer.score_cases(None, [RankingCase("u0", ("i2", "i1"), "i3", ("nowhere",))], 1)
    [noisy] = scorer.score_cases(None, [RankingCase("u0", ("x", "i2", "i1"), "i3", ("i4",))], 1)
    assert plain[1] == 0.0 and plain[0] != 0.0 and noisy[0] == pytest.approx(plain[0])
    [empty] = scorer.score_cases(None, [RankingCase("ghost", (), "i3", ("i4", "zz"))], 1)
    assert np.isfinite(empty).all() and empty[2] == 0.0
    matrix = scorer.score_catalogue(None, [RankingCase("u0", ("i2", "i1"), "i3", ())], ["i3"], 1)
    assert matrix.shape == (1, 1) and matrix[0, 0] == pytest.approx(plain[0])
    logits = scorer.score_examples(None, [Example("u0", ("i2", "i1"), "i3", 1)], 1)
    assert logits[0] == pytest.approx(plain[0])


def test_pooled_sequences_and_histories_merge_platforms_by_time() -> None:
    """One person on two platforms, interleaved in time: training reads one merged sequence;
    a case on ``b`` is scored from everything before its time on both platforms."""
    a, b = PlatformTask("a"), PlatformTask("b")
    a.train = [Example("u", (), "x", 1, ("n",), time=1.0), Example("u", (), "n", 0, time=1.0)]
    a.train += [Example("u", (), "y", 1, time=3.0), Example("u", (), "bad", 0, time=4.0)]
    b.train = [Example("u", (), "x", 1, time=2.0)]  # the same id on b is another item
    b.train += [Example("v", (), "w", 1, time=0.5)]  # someone else: w is in the vocabulary
    a.valid = [Example("u", (), "z", 1, time=6.0)]  # after the case below
    b.valid = [Example("u", (), "w", 1, time=5.0)]
    tasks = {"a": a, "b": b}
    sequences = sasrec.Sequences(tasks, pooled=True)
    items = sequences.data.items
    row = lambda platform, item: items[f"{platform}\x1f{item}"] + 1  # noqa: E731
    assert sequences.of_user["u"] == [row("a", "x"), row("b", "x"), row("a", "y")]
    assert "a\x1fn" not in items  # a sampled negative is no interaction
    merged = sasrec.timeline(tasks, ("train", "valid"), items)
    model = sasrec.SASRec(sequences.n_items, replace(SMALL, max_len=3))
    scorer = sasrec.SASRecScorer(model, items, 3, "b", merged)
    assert scorer._history("u", ("x",), 5.5) == [row("b", "x"), row("a", "y"), row("b", "w")]
    assert scorer._history("u", (), 2.5) == [row("a", "x"), row("b", "x")]
    # same-second items count only where they are the case's own history
    assert scorer._history("u", (), 5.0) == [row("a", "x"), row("b", "x"), row("a", "y")]
    assert scorer._history("u", ("w",), 5.0)[-1] == row("b", "w")
    assert scorer._history("u", ("x",), 0.0) == [row("b", "x")]  # no time: its own history


def test_the_point_comes_from_the_baselines_section() -> None:
    config = load_config(None, ["baselines.sasrec_dim=32", "baselines.sasrec_heads=4"])
    settings = sasrec.SASRecSettings.of(config)
    assert (settings.dim, settings.heads, settings.max_len) == (32, 4, config.task.history_len)
    config = RunConfig.model_validate({"baselines": {"sasrec_max_len": 50}, "task": {"seed": 3}})
    assert sasrec.SASRecSettings.of(config).max_len == 50
    assert sasrec.SASRecSettings.of(config).seed == 3
    with pytest.raises(ConfigError, match="sasrec_heads"):
        load_config(None, ["baselines.sasrec_dim=30", "baselines.sasrec_heads=4"])
    with pytest.raises(ConfigError, match="baselines.sasrec_dims: unknown key"):
        load_config(None, ["baselines.sasrec_dims=30"])
    with pytest.raises(ConfigError, match="baselines.sasrec_dropout"):
        load_config(None, ["baselines.sasrec_dropout=1.0"])


def test_compare_runs_sasrec_cells_as_non_private_baselines(
    tmp_path: Path, write_run_config
) -> None:
    assert parse_levels(["2:sasrec_local,sasrec_pooled"]) == [
        Cell("sasrec_local", 2.0),
        Cell("sasrec_pooled", 2.0),
    ]
    small = {"sasrec_dim": 8, "sasrec_layers": 1, "sasrec_max_epochs": 2, "sasrec_eval_every": 1}
    config = write_run_config(tmp_path / "run.toml", dp={"delta": 1e-4}, baselines=small)
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(config), "--out", str(out), "--split", "valid"]
    assert main([*args, "--epsilon", "2:sasrec_local,sasrec_pooled"]) == 0
    results = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in results] == ["sasrec_local", "sasrec_pooled"]
    for result in results:
        assert sorted(result["platforms"]) == ["p0", "p1"]
        assert all(math.isinf(e) for e in result["epsilon"].values())  # ignores the level
        for metrics in result["platforms"].values():
            assert np.isfinite(metrics["ndcg@10"])
    local, pooled = results[0]["tuning"], results[1]["tuning"]
    for tuning in [*local.values(), pooled]:
        assert tuning["chosen"]["dim"] == 8 and tuning["chosen"]["epochs_run"] <= 2
