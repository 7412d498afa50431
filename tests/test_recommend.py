"""Recommendations from a finished run: what is excluded, how scores are explained, cold start,
where the platform's private part comes from, and the `fedfuse recommend` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from client.platform_client import PrivateTensors
from common.task import Example
from server.cli import main
from server.serving.recommender import Liked, Recommender, UnknownUser


@pytest.fixture(scope="module")
def recommender(finished_run: Path) -> Recommender:
    return Recommender(finished_run, "p0")


def _busiest_user(recommender: Recommender) -> str:
    return max(recommender.users, key=lambda u: len(recommender.user_history(u)[1]))


def test_recommendations_exclude_what_the_user_saw_and_respect_k(
    recommender: Recommender,
) -> None:
    user = _busiest_user(recommender)
    history, seen = recommender.user_history(user)
    assert history and seen
    for k in (1, 5):
        items = recommender.recommend(history, seen, k)
        assert len(items) == k
        assert not {r.item for r in items} & seen
        assert [r.score for r in items] == sorted((r.score for r in items), reverse=True)
    everything = recommender.recommend(history, seen, k=10_000)
    assert len(everything) == len(recommender.featurizer.items) - len(seen)


def test_scores_are_the_models_and_their_explanations_add_up(recommender: Recommender) -> None:
    """The explanation is the model's own decomposition: parts sum to the score, and the score
    is what the evaluation path computes for the same history and item."""
    user = _busiest_user(recommender)
    history, seen = recommender.user_history(user)
    items = recommender.recommend(history, seen, k=5)
    for item in items:
        parts = sum(s.value for s in item.because) + item.prior + item.text + item.bias
        assert parts == pytest.approx(item.score, abs=1e-5)
        assert len(item.because) == min(len(history), recommender.history_len)
        assert "Because" in item.explanation()
    shown = tuple(h.key for h in history[: recommender.history_len])
    examples = [Example(user, shown, item.item, 0) for item in items]
    evaluated = recommender.scorer.score_examples(recommender.featurizer, examples, 8)
    np.testing.assert_allclose(evaluated, [item.score for item in items], atol=1e-5)


def test_text_liked_elsewhere_is_encoded_like_a_catalogue_item(recommender: Recommender) -> None:
    """Cold start: a title from another platform goes through the same encoder and adapters."""
    items = recommender.featurizer.items[:3]
    texts = [recommender.featurizer.item_text[item] for item in items]
    vectors = recommender.scorer.text_vectors(recommender.featurizer, texts)
    rows = [recommender.featurizer.item_row[item] for item in items]
    assert recommender.featurizer.item_vectors is not None
    torch.testing.assert_close(
        vectors, recommender.featurizer.item_vectors[rows], atol=1e-4, rtol=0
    )
    foreign = [Liked(f"elsewhere-{k}", text, None) for k, text in enumerate(texts)]
    own = [Liked(item, text, row) for item, text, row in zip(items, texts, rows, strict=True)]
    candidates = recommender.featurizer.items[3:8]
    # private item factors exist only for this platform's own items, so compare without them
    slots = recommender.scorer.head.private_items
    assert slots is not None
    saved = slots.weight.detach().clone()
    with torch.no_grad():
        slots.weight.zero_()
    try:
        np.testing.assert_allclose(
            recommender.scores(foreign, candidates), recommender.scores(own, candidates), atol=1e-4
        )
    finally:
        with torch.no_grad():
            slots.weight.copy_(saved)


def test_titles_resolve_to_items_and_unknown_text_is_kept_as_text(
    recommender: Recommender,
) -> None:
    item, text = next(iter(recommender.data.item_text.items()))
    by_id, by_title, elsewhere = recommender.resolve([item, text.upper(), "A Film From Elsewhere"])
    assert by_id.row is not None and by_title.key == item and by_id.key == item
    assert elsewhere == Liked("A Film From Elsewhere", "A Film From Elsewhere", None)
    with pytest.raises(UnknownUser, match="no user 'nobody'"):
        recommender.user_history("nobody")


def test_the_private_part_comes_from_the_platforms_own_state(
    finished_run: Path, tmp_path: Path
) -> None:
    state = tmp_path / "p0"
    shutil.copytree(finished_run / "platform_state" / "p0", state)
    baseline = Recommender(finished_run, "p0", state)
    user = _busiest_user(baseline)
    history, seen = baseline.user_history(user)
    before = baseline.scores(history, sorted(set(baseline.featurizer.items) - seen))
    private = PrivateTensors(state, {})
    arrays = private.load()
    private.save({name: np.zeros_like(array) for name, array in arrays.items()})
    changed = Recommender(finished_run, "p0", state)
    after = changed.scores(history, sorted(set(changed.featurizer.items) - seen))
    assert not np.allclose(before, after)
    (state / PrivateTensors.FILE).unlink()
    with pytest.raises(Exception, match="the platform's own part"):
        Recommender(finished_run, "p0", state)


def test_recommend_command_prints_json_and_explanations(
    finished_run: Path, recommender: Recommender, capsys: pytest.CaptureFixture[str]
) -> None:
    user = _busiest_user(recommender)
    args = ["recommend", str(finished_run), "--platform", "p0", "--user", user, "--k", "3"]
    assert main([*args, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["user"] == user and len(document["recommendations"]) == 3
    first = document["recommendations"][0]
    assert {"item", "title", "score", "because", "prior", "text", "bias", "explanation"} <= set(
        first
    )
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"Top 3 on p0 for user {user}") and text.count("Because") == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--user", "nobody"], "platform 'p0' has no user 'nobody'"),
        (["--user", "x", "--history", "y"], "give either --user or --history"),
        (["--history", "y", "--k", "0"], "ask for at least one recommendation"),
        (["--platform", "shop", "--user", "x"], "unknown platform 'shop'"),
    ],
)
def test_recommend_command_bad_input_is_one_line(
    finished_run: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    args = ["recommend", str(finished_run), "--platform", "p0", *extra]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("fedfuse: error: ") and message in error[0]
