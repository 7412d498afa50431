"""Top-K recommendations with explanations from a finished run, for one platform: the front
door of ``fedfuse recommend`` and ``fedfuse serve``.

It runs where the platform's data lives. From the run folder it takes only what the server
published (the configuration and the last round's global adapters); from the platform's own
state folder its private part and its DP popularity prior. A user's history comes from the
platform's data, or from the request: a person new to this platform brings the titles they
liked elsewhere (cross-platform cold start), which are encoded as text and never stored.

Scores are the item tower's logits; each one splits exactly into the shares of the history
items, the popularity prior, the item's text and a constant (``ItemTowerHead.contributions``).
An explanation gives each part relative to the catalogue's average item: what is common to
every item for this person (the "base") says nothing about why *this* item was picked.

Everything a run or a request brings in is checked at the door: an unreadable or non-finite
run file is a one-line :class:`ConfigError`, invalid text a :class:`FedFuseError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError

from client.platform_client import PrivateTensors
from client.popularity_prior import PRIOR_FILE, positive_counts, prior_scores, read_prior
from common.adapters import HEAD_FILE, load_adapter, load_trainable_arrays, trainable_arrays
from common.errors import ConfigError, FedFuseError
from common.featurizer import TextFeaturizer
from common.item_tower import ItemTowerScorer
from common.platform_data import (
    ITEMS,
    MAX_TEXT_CHARS,
    PlatformData,
    _identifier,
    _read_records,
    _text,
    federation_platforms,
    find_file,
    read_platform,
)
from common.sharing import private_names, shared_scorer
from common.task import build_task
from server.federation.run_record import RunRecord

DECIMALS = 3  # of returned scores and their parts: what a person can read, and no more


class UnknownUser(FedFuseError):
    """The platform has no interactions of this user."""


def valid_text(text: str, what: str) -> str:
    """``text`` unless it cannot be written as UTF-8 (a lone surrogate, from JSON's ``\ud800``
    or from undecodable bytes on a command line): the tokenizer would fail on it deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise FedFuseError(
            f"{what} is not valid Unicode text (a lone surrogate or undecodable byte at "
            f"character {err.start + 1})"
        ) from None
    return text


@dataclass(frozen=True)
class Liked:
    """A history item: one of this platform's (``row``), or text from elsewhere (no row)."""

    key: str
    text: str
    row: int | None


@dataclass(frozen=True)
class Share:
    """What one history item added to a recommendation's score, against the catalogue's
    average item (so a history item that lifts every item alike shares nothing)."""

    history: int  # its place in the request's history (newest first)
    item: str
    title: str
    value: float


@dataclass(frozen=True)
class Recommendation:
    """An item with its score and the parts the score is made of (they add up to it). Each
    part is relative to the catalogue's average item; ``base`` is that average's score."""

    item: str
    title: str
    score: float
    because: tuple[Share, ...]  # every history item's share, largest first
    prior: float  # the platform's DP popularity prior
    text: float  # what the item's text alone says (its learned item score)
    base: float  # what an average catalogue item scores for this history

    def explanation(self) -> str:
        """The parts that lifted this item above the average, in plain words: the (at most
        three) history items with the largest positive shares, popularity, the description.
        A part counts when it is positive as shown (rounded to :data:`DECIMALS`)."""
        words = []
        liked = [share for share in self.because if _lifts(share.value)][:3]
        if liked:
            words.append("you liked " + ", ".join(f"“{_short(share.title)}”" for share in liked))
        if _lifts(self.prior):
            words.append("it is popular on this platform")
        if _lifts(self.text):
            words.append("its description suggests wide appeal")
        if not words:
            return "Nothing lifts it above the catalogue's average; little else is left."
        return "Because " + "; ".join(words) + "."

    def as_dict(self) -> dict[str, object]:
        """The JSON form, numbers rounded to :data:`DECIMALS` (docs/serving.md says why).
        A share names its history item by place: the document lists the history's titles
        once, as repeating them (up to 1,000 characters each, for every history item of
        every recommendation) made one cold-start answer 2 MB and slowed everyone's."""
        return {
            "item": self.item,
            "title": self.title,
            "score": round(self.score, DECIMALS),
            "because": [
                {"history": s.history, "value": round(s.value, DECIMALS)} for s in self.because
            ],
            "prior": round(self.prior, DECIMALS),
            "text": round(self.text, DECIMALS),
            "base": round(self.base, DECIMALS),
            "explanation": self.explanation(),
        }


def _short(title: str, limit: int = 80) -> str:
    """A title as a sentence names it: cut at ``limit`` characters."""
    return title if len(title) <= limit else title[: limit - 1].rstrip() + "…"


def _lifts(value: float) -> bool:
    return round(value, DECIMALS) > 0


def _loading(path: Path, what: str, load: Callable[[], None]) -> None:
    """Run ``load``; a file that cannot be read or does not fit the model ends as one line
    naming it, not as a safetensors or torch traceback."""
    try:
        load()
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"{path}: {what} cannot be loaded ({reason})") from None


def _titles(data: PlatformData) -> dict[str, str]:
    """Item id -> its plain title. ``item_text`` joins the title with the optional text
    columns (``genres: Comedy``), which are the model's input but not a name to show, so the
    title column is read again from the (already validated) items file."""
    path = find_file(data.root, ITEMS)
    _, records = _read_records(path)
    titles = {}
    for row, record in records:
        item = _identifier(path, row, "item_id", record.get("item_id"))
        titles[item] = _text(path, row, "title", record.get("title"), MAX_TEXT_CHARS, [])
    return {item: titles.get(item, text) for item, text in data.item_text.items()}


class Recommender:
    """One platform's recommender from a finished run (item vectors computed once)."""

    def __init__(self, run_dir: Path | str, platform: str, state_dir: Path | str | None = None):
        record = RunRecord(run_dir)
        record.read_config()  # one clear line for a folder that is not a run
        self.config = config = record.run_config()
        folders = dict(federation_platforms(config.data))
        if platform not in folders:
            raise FedFuseError(f"unknown platform {platform!r} (this run has {sorted(folders)})")
        last = record.last_round()
        if last == 0:
            raise FedFuseError(f"{record.root}: no finished round to recommend with")
        self.platform = platform
        self.data = read_platform(folders[platform], platform)
        self.titles = _titles(self.data)
        self.state = state = Path(state_dir) if state_dir else Path(config.dp.state_dir) / platform
        strategy = config.federation.strategy
        scorer, tokenizer = shared_scorer(config.model, config.lora, strategy)
        assert isinstance(scorer, ItemTowerScorer)
        self.scorer = scorer
        self._load_model(
            record.adapter_dir(last), state, private_names(list(trainable_arrays(scorer)), strategy)
        )
        self.featurizer = TextFeaturizer(tokenizer, self.data.item_text, config.model.max_length)
        if config.prior.enabled:  # else the model was trained, and scores, without one
            self.featurizer.set_prior(prior_scores(self._prior_counts(state)))
        scorer.eval()
        scorer.prepare(self.featurizer)
        self.history_len = config.task.history_len
        self._histories = self._user_histories()
        self.users = sorted(self._histories)
        self._by_text, self._by_title = self._title_index()

    def _load_model(self, adapters: Path, state: Path, private: list[str]) -> None:
        """The round's published adapters and head, then the platform's private part; every
        loaded tensor must be finite (a NaN would rank silently, as a score of null)."""
        for name in (SAFETENSORS_WEIGHTS_NAME, HEAD_FILE):
            if not (adapters / name).is_file():
                raise ConfigError(f"{adapters}: no {name} (the round's published adapters)")
        what = "the round's published adapters"
        _loading(adapters, what, lambda: load_adapter(self.scorer, adapters))
        path = state / PrivateTensors.FILE
        if private:
            if not path.is_file():
                raise FedFuseError(f"{state}: no {PrivateTensors.FILE} (the platform's own part)")

            def load_private() -> None:
                stored = PrivateTensors(state, trainable_arrays(self.scorer, private)).load()
                load_trainable_arrays(self.scorer, stored, private)

            _loading(path, "the platform's private part", load_private)
        for name, tensor in self.scorer.named_parameters():
            if not torch.isfinite(tensor).all():
                where = path if name in private else adapters
                raise ConfigError(f"{where}: {name} holds NaN or infinite values; refused")

    def _prior_counts(self, state: Path) -> dict[str, float]:
        """The platform's DP release from its state folder (the exact counts when DP is off);
        a NaN or infinite count is refused (it would rank its item first, with score null)."""
        path = state / PRIOR_FILE
        if path.is_file():
            counts = read_prior(path)
            bad = next((item for item, v in counts.items() if not math.isfinite(v)), None)
            if bad is not None:
                raise ConfigError(f"{path}: the count of item {bad!r} is {counts[bad]}; refused")
            return counts
        if self.config.dp.enabled:
            raise FedFuseError(f"{state}: no {PRIOR_FILE} (the platform's DP popularity prior)")
        exact = positive_counts(build_task(self.data, self.config.task))
        return {item: exact.get(item, 0.0) for item in self.featurizer.items}

    def _user_histories(self) -> dict[str, tuple[list[str], set[str]]]:
        """Per user: liked items, newest first, and every item they interacted with."""
        positive = self.data.positives(self.config.task.positive_threshold)
        order = np.lexsort((np.arange(self.data.num_interactions), self.data.timestamps))
        histories: dict[str, tuple[list[str], set[str]]] = {}
        for row in order[::-1]:
            liked, seen = histories.setdefault(str(self.data.users[row]), ([], set()))
            item = str(self.data.items[row])
            seen.add(item)
            if positive[row]:
                liked.append(item)
        return histories

    def _title_index(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """Casefolded full texts and plain titles -> items, built once: a liked entry is then
        a dictionary look-up, not a scan of the catalogue."""
        by_text: dict[str, list[str]] = {}
        by_title: dict[str, list[str]] = {}
        for item, text in self.data.item_text.items():
            by_text.setdefault(text.casefold(), []).append(item)
            by_title.setdefault(self.titles[item].casefold(), []).append(item)
        return by_text, by_title

    def user_history(self, user: str) -> tuple[list[Liked], set[str]]:
        """The user's liked items on this platform (newest first) and every item they saw."""
        if user not in self._histories:
            raise UnknownUser(f"platform {self.platform!r} has no user {user!r}")
        liked, seen = self._histories[user]
        return [self._catalogue_item(item) for item in liked], set(seen)

    def _catalogue_item(self, item: str) -> Liked:
        return Liked(item, self.data.item_text[item], self.featurizer.item_row[item])

    def title(self, liked: Liked) -> str:
        """The name to show: a catalogue item's plain title, or the text given from elsewhere."""
        return liked.text if liked.row is None else self.titles[liked.key]

    def resolve(self, liked: list[str]) -> list[Liked]:
        """Item ids or titles of this platform, else text liked elsewhere (cold start)."""
        resolved = []
        for entry in liked:
            key = valid_text(entry, "a liked title or id").strip()
            if not key:
                raise FedFuseError("an empty liked title or id")
            if key in self.data.item_text:
                resolved.append(self._catalogue_item(key))
                continue
            folded = key.casefold()
            matches = self._by_text.get(folded) or self._by_title.get(folded, [])
            if len(matches) > 1:
                raise FedFuseError(f"{key!r} matches {len(matches)} titles; give the item id")
            resolved.append(self._catalogue_item(matches[0]) if matches else Liked(key, key, None))
        return resolved

    def history_for(
        self, user: str | None = None, liked: list[str] | None = None
    ) -> tuple[list[Liked], set[str]]:
        """The history the model reads (newest ``history_len``) and the items to leave out, for
        a user of this platform or for liked ids or titles (a person new here; titles from
        elsewhere are cold start). Only the entries the model reads are matched."""
        if (user is None) == (liked is None):
            raise FedFuseError("give either a user or liked items")
        if user is not None:
            history, seen = self.user_history(user)
        else:
            history, seen = self.resolve((liked or [])[: self.history_len]), set()
        return history[: self.history_len], seen

    def request(
        self, user: str | None = None, liked: list[str] | None = None, k: int = 10
    ) -> tuple[list[Liked], list[Recommendation]]:
        """:meth:`history_for`, then its recommendations: the history used, and the items."""
        history, seen = self.history_for(user, liked)
        return history, self.recommend(history, seen, k)

    def document(
        self, user: str | None = None, liked: list[str] | None = None, k: int = 10
    ) -> dict[str, object]:
        """:meth:`request` as JSON: what ``fedfuse recommend --json`` and the service return."""
        return self.as_document(user, *self.request(user, liked, k))

    def as_document(
        self, user: str | None, history: list[Liked], recommendations: list[Recommendation]
    ) -> dict[str, object]:
        return {
            "platform": self.platform,
            "user": user,
            "history": [self.shown(h) for h in history],
            "recommendations": [r.as_dict() for r in recommendations],
        }

    def shown(self, liked: Liked) -> dict[str, object]:
        """A history item as a client sees it: its id, its title, and where it comes from."""
        return {"item": liked.key, "title": self.title(liked), "elsewhere": liked.row is None}

    @torch.inference_mode()
    def recommend(
        self, history: list[Liked], exclude: set[str] | None = None, k: int = 10
    ) -> list[Recommendation]:
        """The ``k`` best catalogue items outside ``exclude`` and the history, explained.

        The whole catalogue is scored in place (no copy of its vectors) and the excluded items
        masked, so a request costs one pass over the item matrix; the catalogue's average of
        each part, taken in the same pass, is what the explanations are relative to.
        """
        if k < 1:
            raise FedFuseError(f"k = {k}: ask for at least one recommendation")
        history = history[: self.history_len]
        excluded = set(exclude or ()) | {h.key for h in history if h.row is not None}
        rows = [self.featurizer.item_row[i] for i in excluded if i in self.featurizer.item_row]
        available = len(self.featurizer.items) - len(rows)
        if available == 0:
            return []
        parts = self._contributions(history, None)
        scores = _total(parts)
        average = {name: part.mean(dim=0) for name, part in parts.items()}
        scores[rows] = -torch.inf
        top = torch.topk(scores, min(k, available)).indices.tolist()
        return [self._explained(t, float(scores[t]), history, parts, average) for t in top]

    @torch.inference_mode()
    def scores(self, history: list[Liked], items: list[str]) -> np.ndarray:
        """Scores of these catalogue items for this history (e.g. a ranking case's candidates)."""
        rows = torch.tensor([self.featurizer.item_row[item] for item in items], dtype=torch.long)
        return _total(self._contributions(history[: self.history_len], rows)).cpu().numpy()

    def _contributions(
        self, history: list[Liked], rows: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The score's parts for the catalogue items at ``rows`` (None: all, in row order)."""
        vectors = self.featurizer.item_vectors
        assert vectors is not None
        device = vectors.device
        foreign = [h.text for h in history if h.row is None]
        outside = iter(self.scorer.text_vectors(self.featurizer, foreign))
        stacked = [vectors[h.row] if h.row is not None else next(outside) for h in history]
        history_vectors = torch.stack(stacked) if stacked else vectors[:0]
        history_rows = [-1 if h.row is None else h.row for h in history]
        if rows is None:
            rows = torch.arange(len(vectors), device=device)
            items = vectors
        else:
            rows = rows.to(device)
            items = vectors[rows]
        return self.scorer.head.contributions(
            history_vectors.to(device),
            torch.ones(len(history), dtype=torch.long, device=device),
            torch.tensor(history_rows, dtype=torch.long, device=device),
            items,
            rows,
            self.featurizer.prior.to(device)[rows],
        )

    def _explained(
        self,
        row: int,
        score: float,
        history: list[Liked],
        parts: dict[str, torch.Tensor],
        average: dict[str, torch.Tensor],
    ) -> Recommendation:
        """Item ``row`` with each part minus the catalogue's average of it; the averages add
        up to ``base``, so the parts still sum to the score."""
        item = self.featurizer.items[row]
        values = (parts["history"][row] - average["history"]).tolist()
        shares = [
            Share(i, h.key, self.title(h), v)
            for i, (h, v) in enumerate(zip(history, values, strict=True))
        ]
        return Recommendation(
            item=item,
            title=self.titles[item],
            score=score,
            because=tuple(sorted(shares, key=lambda s: -s.value)),
            prior=float(parts["prior"][row] - average["prior"]),
            text=float(parts["text"][row] - average["text"]),
            base=float(_total({name: value[None] for name, value in average.items()})[0]),
        )


def _total(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The score: every part added up (the history's shares summed per candidate)."""
    return parts["history"].sum(dim=-1) + parts["prior"] + parts["text"] + parts["bias"]
