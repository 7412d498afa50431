"""What a person brings from other platforms (``carried/``, ``model.carried_history``): written
by ``data prepare``, read into each example as of its time, and scored as a third feature."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.backbone import load_backbone
from common.config import LoraSettings, ModelConfig, TaskConfig, load_config
from common.errors import ConfigError, DataError
from common.featurizer import TextFeaturizer
from common.item_tower_head import ItemTowerHead
from common.model import build_scorer
from common.movielens import build_ml100k
from common.platform_data import read_platform
from common.platform_format import CARRIED
from common.platform_writer import PlatformTables, write_dataset
from common.task import CARRIED_PREFIX, Example, build_task
from server.simulation.sasrec import sasrec_carried_scorer, with_carried


def _tables() -> list[PlatformTables]:
    """Two platforms sharing user u1; u2 is on the first only."""
    items = lambda names: [{"item_id": n, "title": f"Movie {n}"} for n in names]  # noqa: E731
    rows = lambda data: [  # noqa: E731
        {"user_id": u, "item_id": i, "rating": r, "timestamp": t} for u, i, r, t in data
    ]
    here = rows([("u1", "a", 5, 10), ("u1", "b", 5, 30), ("u1", "c", 5, 50), ("u2", "a", 5, 20)])
    there = rows([("u1", "x", 5, 5), ("u1", "y", 2, 20), ("u1", "z", 4, 40), ("u3", "x", 5, 1)])
    carried_here = PlatformTables(
        "here/carried",
        [r | {"item_id": f"there:{r['item_id']}"} for r in there if r["user_id"] == "u1"],
        [i | {"item_id": f"there:{i['item_id']}"} for i in items("xyz")],
    )
    return [
        PlatformTables("here", here, items("abcdef"), carried_here),
        PlatformTables("there", there, items("xyz")),
    ]


def test_a_platform_folder_carries_what_its_users_brought(tmp_path: Path) -> None:
    out = write_dataset(tmp_path / "data", _tables())
    assert (out / "here" / CARRIED / "interactions.tsv").is_file()
    assert not (out / "there" / CARRIED).exists()  # nothing brought: no folder
    data = read_platform(out / "here")
    config = TaskConfig(split="global_time", valid_from=25, test_from=45, history_len=2)
    plain, task = build_task(data, config), build_task(data, config, carried=True)
    assert [(e.user, e.history, e.candidate) for e in plain.train] == [
        (e.user, e.history, e.candidate) for e in task.train
    ]  # the platform's own examples are unchanged
    assert all(not e.carried for e in plain.train + plain.test)
    brought = {(e.user, e.time): e.carried for e in task.train + task.valid + task.test}
    x, z = f"{CARRIED_PREFIX}there:x", f"{CARRIED_PREFIX}there:z"
    assert brought[("u1", 10.0)] == (x,)  # only what was liked before the event, newest first
    assert brought[("u1", 30.0)] == (x,)  # y was rated 2: not liked
    assert brought[("u1", 50.0)] == (z, x)  # at most history_len
    assert brought[("u2", 20.0)] == ()  # u2 brought nothing
    assert [c.carried for c in task.test_ranking if c.user == "u1"] == [(z, x)]
    assert task.carried_text[x] == "Movie x" and set(plain.carried_text) == set()
    with pytest.raises(DataError, match=r"there/carried: model\.carried_history needs"):
        build_task(read_platform(out / "there"), config, carried=True)


def test_movielens_platforms_carry_each_users_ratings_elsewhere() -> None:
    tables = {t.name: t for t in build_ml100k()}
    kids = tables["kids_family"]
    assert kids.carried is not None
    users = {r["user_id"] for r in kids.interactions}
    elsewhere = [r for name, t in tables.items() if name != "kids_family" for r in t.interactions]
    expected = sorted(
        (str(r["user_id"]), r["timestamp"]) for r in elsewhere if r["user_id"] in users
    )
    got = sorted((str(r["user_id"]), r["timestamp"]) for r in kids.carried.interactions)
    assert got == expected and all(":" in str(r["item_id"]) for r in kids.carried.interactions)
    texts = {i["item_id"]: i["title"] for i in kids.carried.items}
    assert {r["item_id"] for r in kids.carried.interactions} == set(texts)
    assert texts["comedy:13"] == "Mighty Aphrodite (1995)"


def test_the_carried_feature_scores_what_was_brought(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """With ``carried_history`` the head adds w · cos(brought-user, item) at the history's own
    weight w (tied: no weight of its own); nothing brought adds nothing; the batched, per-case
    and catalogue paths agree."""
    head = ItemTowerHead(8, 0, 0.2, 1.0, carried=True)
    assert head.mix.weight.tolist() == [[5.0, 1.0]]  # w and the prior's weight, nothing more
    history, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.long)
    rows, item = torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 4, 8)
    prior = torch.zeros(2, 4)
    alone = head.logits(history, mask, rows, item, rows[:, :1], prior)
    empty = (torch.zeros(2, 1, 8), torch.zeros(2, 1, dtype=torch.long))
    torch.testing.assert_close(
        head.logits(history, mask, rows, item, rows[:, :1], prior, empty), alone
    )
    brought = (torch.randn(2, 2, 8), torch.ones(2, 2, dtype=torch.long))
    with torch.no_grad():
        head.mix.weight[0, 0] = 3.0  # as training may set w: both cosines follow it
        alone = head.logits(history, mask, rows, item, rows[:, :1], prior)
    with_it = head.logits(history, mask, rows, item, rows[:, :1], prior, brought)
    elsewhere = brought[0].mean(dim=1, keepdim=True)  # uniform recency weights at the start
    cosine = torch.nn.functional.cosine_similarity(elsewhere, item, dim=-1)
    torch.testing.assert_close(with_it, alone + 3.0 * cosine)

    out = write_dataset(tmp_path / "data", _tables())
    data = read_platform(out / "here")
    config = TaskConfig(split="global_time", valid_from=25, test_from=45)
    task = build_task(data, config, carried=True)
    model, tokenizer = load_backbone(str(tiny_bert_dir))
    config = ModelConfig(backbone=str(tiny_bert_dir), carried_history=True, private_factors=4)
    scorer = build_scorer(model, config, LoraSettings(rank=4)).eval()
    featurizer = TextFeaturizer(tokenizer, data.item_text | task.carried_text, max_length=16)
    case = next(c for c in task.test_ranking if c.carried)
    case = type(case)(case.user, case.history, "a", ("b", "c"), case.time, case.carried)
    [ranked] = scorer.score_cases(featurizer, [case], 4)
    pairs = [Example(case.user, case.history, i, 0, carried=case.carried) for i in "abc"]
    with torch.no_grad():
        batched = scorer(**scorer.batch(featurizer, pairs))
    torch.testing.assert_close(torch.from_numpy(ranked), batched, atol=1e-5, rtol=1e-4)
    matrix = scorer.score_catalogue(featurizer, [case], ["a", "b", "c"], 4)
    torch.testing.assert_close(torch.from_numpy(matrix[0]), batched, atol=1e-5, rtol=1e-4)
    nothing = type(case)(case.user, case.history, "a", ("b", "c"), case.time)
    [without] = scorer.score_cases(featurizer, [nothing], 4)
    assert not torch.allclose(torch.from_numpy(without), torch.from_numpy(ranked))


def test_the_in_house_sasrec_reads_carried_histories_merged_by_time(tmp_path: Path) -> None:
    """``sasrec_carried``: the platform's own SASRec over its people's histories here and
    elsewhere, split at the same cuts; a case reads everything brought before its time."""
    out = write_dataset(tmp_path / "data", _tables())
    cuts = ["task.split=global_time", "task.valid_from=25", "task.test_from=45"]
    config = load_config(None, [*cuts, "model.carried_history=true"])
    task = build_task(read_platform(out / "here"), config.task, carried=True)
    tasks = with_carried(task, config)
    brought = tasks["here/carried"]
    assert [(e.candidate, e.time) for e in brought.train] == [(f"{CARRIED_PREFIX}there:x", 5.0)]
    assert [(e.candidate, e.time) for e in brought.valid] == [(f"{CARRIED_PREFIX}there:z", 40.0)]
    tiny = [
        "baselines.sasrec_max_epochs=1",
        "baselines.sasrec_eval_every=1",
        "baselines.sasrec_dim=4",
    ]
    scorer, chosen = sasrec_carried_scorer(
        task, load_config(None, [*cuts, *tiny, "model.carried_history=true"])
    )
    assert chosen["epochs_run"] == 1
    [case] = [c for c in task.test_ranking if c.user == "u1"]
    rows = scorer._history(case.user, case.history, case.time)
    names = {index + 1: name for name, index in scorer.items.items()}
    # before t = 50: x (5, brought), a (10); b and z came after the training cut, so the
    # model has no vector for them and drops them
    assert [names[r].split("\x1f")[-1] for r in rows] == [f"{CARRIED_PREFIX}there:x", "a"]
    with pytest.raises(ConfigError, match="carried histories needs"):
        with_carried(build_task(read_platform(out / "here"), config.task), config)
