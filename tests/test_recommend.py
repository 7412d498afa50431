"""Recommendations from a finished run: what is excluded, how scores are explained, cold start,
where the platform's private part comes from, and the `fedfuse recommend` command."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

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
        parts = sum(s.value for s in item.because) + item.prior + item.text + item.base
        assert parts == pytest.approx(item.score, abs=1e-5)
        assert len(item.because) == min(len(history), recommender.history_len)
        assert item.explanation()
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
    assert {"item", "title", "score", "because", "prior", "text", "base", "explanation"} <= set(
        first
    )
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"Top 3 on p0 for user {user}")
    explanations = [line for line in text.splitlines() if line.startswith("    ")]
    assert explanations == [f"    {r['explanation']}" for r in document["recommendations"]]
    assert "genres:" not in text


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


# --- explanations a person would find useful --------------------------------------------------


def test_each_recommendation_is_explained_by_its_own_history_items(
    recommender: Recommender,
) -> None:
    """A share is the history item's part of *this* item's score minus its part of the
    average catalogue item's: what lifts every item alike explains none of them. So the
    items named differ between recommendations (the raw shares named the same newest ones)."""
    user = _busiest_user(recommender)
    history, seen = recommender.user_history(user)
    history = history[: recommender.history_len]
    items = recommender.recommend(history, seen, k=5)
    with torch.inference_mode():
        parts = recommender._contributions(history, None)
    average = parts["history"].mean(dim=0)
    for item in items:
        row = recommender.featurizer.item_row[item.item]
        shares = (parts["history"][row] - average).tolist()
        expected = dict(zip((h.key for h in history), shares, strict=True))
        assert {s.item: s.value for s in item.because} == pytest.approx(expected, abs=1e-5)
        prior = parts["prior"][row] - parts["prior"].mean()
        assert item.prior == pytest.approx(float(prior), abs=1e-5)
    assert len({item.because[0].item for item in items}) > 1


def test_only_positive_parts_are_given_as_reasons_with_plain_titles(
    recommender: Recommender,
) -> None:
    user = _busiest_user(recommender)
    history, seen = recommender.user_history(user)
    items = recommender.recommend(history, seen, k=len(recommender.featurizer.items))
    names = {title for title in recommender.titles.values()}
    for item in items:
        explanation = item.explanation()
        named = re.findall(r"“(.+?)”", explanation)
        lifting = [s.title for s in item.because if round(s.value, 3) > 0][:3]
        assert named == lifting and set(named) <= names
        for share in item.because:
            if round(share.value, 3) <= 0:
                assert f"“{share.title}”" not in explanation
        assert ("popular" in explanation) == (round(item.prior, 3) > 0)
        assert ("description" in explanation) == (round(item.text, 3) > 0)
        assert item.title == recommender.titles[item.item] and "genres:" not in item.title
        assert "genres:" not in explanation and "−" not in explanation and "-" not in explanation
    assert any("popular" not in item.explanation() for item in items)  # a negative prior: unsaid


# --- faults at the door ---------------------------------------------------------------------


def _nan_prior(path: Path) -> None:
    document = json.loads(path.read_text())
    document["counts"][next(iter(document["counts"]))] = float("nan")
    path.write_text(json.dumps(document))


def _nan_private(path: Path) -> None:
    arrays = load_file(str(path))
    name = next(iter(arrays))
    arrays[name] = np.full_like(arrays[name], np.nan)
    save_file(arrays, str(path))


FAULTS = {  # run file (in the run, or in the platform's state) -> what is done to it
    "corrupt adapter": ("ROUND/adapter_model.safetensors", lambda p: p.write_bytes(b"junk")),
    "missing adapter": ("ROUND/adapter_model.safetensors", Path.unlink),
    "corrupt head": ("ROUND/fedfuse_head.safetensors", lambda p: p.write_bytes(b"\x08" + b"0" * 9)),
    "missing head": ("ROUND/fedfuse_head.safetensors", Path.unlink),
    "corrupt private part": ("STATE/private_adapter.safetensors", lambda p: p.write_bytes(b"x")),
    "NaN in the private part": ("STATE/private_adapter.safetensors", _nan_private),
    "NaN in the prior": ("STATE/popularity_prior.json", _nan_prior),
}
MESSAGES = {
    "corrupt adapter": "the round's published adapters cannot be loaded",
    "missing adapter": "no adapter_model.safetensors",
    "corrupt head": "the round's published adapters cannot be loaded",
    "missing head": "no fedfuse_head.safetensors",
    "corrupt private part": "the platform's private part cannot be loaded",
    "NaN in the private part": "holds NaN or infinite values; refused",
    "NaN in the prior": "is nan; refused",
}


@pytest.fixture(scope="module")
def broken_runs(finished_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A copy of the finished run per fault, each with one file broken."""
    runs = {}
    for name, (where, damage) in FAULTS.items():
        copy = tmp_path_factory.mktemp("broken") / "run"
        shutil.copytree(finished_run, copy)
        last = max((copy / "adapters").iterdir())
        relative = where.replace("ROUND", str(last)).replace(
            "STATE", str(copy / "platform_state" / "p0")
        )
        damage(Path(relative))
        runs[name] = copy
    return runs


@pytest.mark.parametrize("fault", FAULTS)
def test_a_broken_run_file_is_one_line_in_recommend_and_serve(
    broken_runs: dict[str, Path],
    recommender: Recommender,
    fault: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def served(*_: object) -> None:
        raise AssertionError("fedfuse serve served a broken run")

    monkeypatch.setattr("server.serving.listener.serve", served)
    run = broken_runs[fault]
    state = ["--platform", "p0", "--platform-state", str(run / "platform_state" / "p0")]
    user = _busiest_user(recommender)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    for command in (
        ["recommend", str(run), *state, "--user", user],
        ["serve", str(run), *state, "--port", port, "--token-file", str(tmp_path / "token")],
    ):
        assert main(command) == 2, command
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("fedfuse: error: "), error
        assert MESSAGES[fault] in error[0]


def test_invalid_text_in_a_cold_start_history_is_one_line(
    finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Undecodable bytes on a command line arrive as lone surrogates (os.fsdecode)."""
    args = ["recommend", str(finished_run), "--platform", "p0", "--history"]
    for title in (os.fsdecode(b"caf\xe9 film"), "\ud800"):
        assert main([*args, title]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "is not valid Unicode text" in error[0]


def test_a_slow_load_says_it_is_still_loading_and_a_quick_one_says_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`recommend` on an ML-1M run printed nothing for its 30 s start-up (imports, the
    catalogue's cache and item vectors); `serve` the same. With --json, stdout is the
    document alone, so the notice is left out there."""
    import time

    from server.serving import commands

    with commands.still_loading("loading p0", every=0.05):
        time.sleep(0.18)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and all(x.startswith("[fedfuse] loading p0: ") for x in lines)
    assert lines[0].endswith(" s so far")
    with commands.still_loading("loading p0", every=5):
        pass  # quick: silent, and the thread is gone when the block ends
    assert capsys.readouterr().out == ""

    shown = []
    monkeypatch.setattr(
        commands, "still_loading", lambda what: shown.append(what) or contextlib.nullcontext()
    )
    monkeypatch.setattr(
        "server.serving.recommender.Recommender.__init__",
        lambda *_: (_ for _ in ()).throw(UnknownUser("stop here")),
    )
    for json_flag in ([], ["--json"]):
        main(["recommend", "RUN", "--platform", "p0", "--user", "u", *json_flag])
    assert shown == ["loading p0 from RUN (model, data, item vectors)"]  # text mode only
