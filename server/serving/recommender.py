"""Top-K recommendations with explanations from a finished run, for one platform: the front
door of ``fedfuse recommend`` and ``fedfuse serve``.

It runs where the platform's data lives. From the run folder it takes only what the server
published (the configuration and the last round's global adapters); from the platform's own
state folder its private part and its DP popularity prior. A user's history comes from the
platform's data, or from the request: a person new to this platform brings the titles they
liked elsewhere (cross-platform cold start), which are encoded as text and never stored.

Scores are the item tower's logits; each one splits exactly into the shares of the history
items, the popularity prior, the item's text and a constant (``ItemTowerHead.contributions``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.platform_client import PrivateTensors
from client.popularity_prior import PRIOR_FILE, positive_counts, prior_scores, read_prior
from common.adapters import load_adapter, load_trainable_arrays, trainable_arrays
from common.config import load_config
from common.errors import ConfigError, FedFuseError
from common.model import ItemTowerScorer, TextFeaturizer
from common.platform_data import federation_platforms, read_platform
from common.sharing import private_names, shared_scorer
from common.task import build_task
from server.federation.run_record import CONFIG_FILE, RunRecord


class UnknownUser(FedFuseError):
    """The platform has no interactions of this user."""


@dataclass(frozen=True)
class Liked:
    """A history item: one of this platform's (``row``), or text from elsewhere (no row)."""

    key: str
    text: str
    row: int | None


@dataclass(frozen=True)
class Share:
    """What one history item added to a recommendation's score."""

    item: str
    title: str
    value: float


@dataclass(frozen=True)
class Recommendation:
    """An item with its score and the parts the score is made of (they add up to it)."""

    item: str
    title: str
    score: float
    because: tuple[Share, ...]  # every history item's share, largest first
    prior: float  # the platform's DP popularity prior
    text: float  # what the item's text alone says (its learned item score)
    bias: float  # the same for every item

    def explanation(self) -> str:
        """The score in plain words: the history items that pushed it up most, then the rest."""
        liked = [share for share in self.because if share.value > 0][:3]
        words = []
        if liked:
            names = ", ".join(f"“{s.title}” ({s.value:+.2f})" for s in liked)
            words.append(f"you liked {names}")
        popular = "popular" if self.prior >= 0 else "less watched"
        words.append(f"{popular} on this platform ({self.prior:+.2f})")
        if self.text:  # zero when the model learns no item-text score (model.item_score)
            words.append(f"its description ({self.text:+.2f})")
        return "Because " + "; ".join(words) + f"; base {self.bias:+.2f}."

    def as_dict(self) -> dict[str, object]:
        return {
            "item": self.item,
            "title": self.title,
            "score": self.score,
            "because": [vars(share) for share in self.because],
            "prior": self.prior,
            "text": self.text,
            "bias": self.bias,
            "explanation": self.explanation(),
        }


class Recommender:
    """One platform's recommender from a finished run (item vectors computed once)."""

    def __init__(self, run_dir: Path | str, platform: str, state_dir: Path | str | None = None):
        record = RunRecord(run_dir)
        record.read_config()  # one clear line for a folder that is not a run
        self.config = config = load_config(record.root / CONFIG_FILE)
        if config.model.scorer != "item_tower":
            raise ConfigError(
                f"{record.root}: recommendations need the item tower (model.scorer = "
                f"'item_tower'); this run used {config.model.scorer!r}"
            )
        folders = dict(federation_platforms(config.data))
        if platform not in folders:
            raise FedFuseError(f"unknown platform {platform!r} (this run has {sorted(folders)})")
        last = record.last_round()
        if last == 0:
            raise FedFuseError(f"{record.root}: no finished round to recommend with")
        self.platform = platform
        self.data = read_platform(folders[platform], platform)
        state = Path(state_dir) if state_dir else Path(config.dp.state_dir) / platform
        strategy = config.federation.strategy
        scorer, tokenizer = shared_scorer(config.model, config.lora, strategy)
        assert isinstance(scorer, ItemTowerScorer)
        self.scorer = scorer
        load_adapter(scorer, record.adapter_dir(last))
        private = private_names(list(trainable_arrays(scorer)), strategy)
        if private:
            if not (state / PrivateTensors.FILE).is_file():
                raise FedFuseError(f"{state}: no {PrivateTensors.FILE} (the platform's own part)")
            stored = PrivateTensors(state, trainable_arrays(scorer, private)).load()
            load_trainable_arrays(scorer, stored, private)
        self.featurizer = TextFeaturizer(tokenizer, self.data.item_text, config.model.max_length)
        if config.prior.enabled:  # else the model was trained, and scores, without one
            self.featurizer.set_prior(prior_scores(self._prior_counts(state)))
        scorer.eval()
        scorer.prepare(self.featurizer)
        self.history_len = config.task.history_len
        self._histories = self._user_histories()

    def _prior_counts(self, state: Path) -> dict[str, float]:
        """The platform's DP release from its state folder (the exact counts when DP is off)."""
        if (state / PRIOR_FILE).is_file():
            return read_prior(state / PRIOR_FILE)
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

    @property
    def users(self) -> list[str]:
        return sorted(self._histories)

    def user_history(self, user: str) -> tuple[list[Liked], set[str]]:
        """The user's liked items on this platform (newest first) and every item they saw."""
        if user not in self._histories:
            raise UnknownUser(f"platform {self.platform!r} has no user {user!r}")
        liked, seen = self._histories[user]
        return [self._catalogue_item(item) for item in liked], set(seen)

    def _catalogue_item(self, item: str) -> Liked:
        return Liked(item, self.data.item_text[item], self.featurizer.item_row[item])

    def resolve(self, liked: list[str]) -> list[Liked]:
        """Item ids or titles of this platform, else text liked elsewhere (cold start)."""
        by_text = {text.casefold(): item for item, text in self.data.item_text.items()}
        resolved = []
        for entry in liked:
            key = entry.strip()
            if not key:
                raise FedFuseError("an empty liked title or id")
            if key in self.data.item_text:
                resolved.append(self._catalogue_item(key))
                continue
            prefix = [i for t, i in by_text.items() if t == key.casefold()] or [
                i for t, i in by_text.items() if t.startswith(key.casefold() + ". ")
            ]
            if len(prefix) > 1:
                raise FedFuseError(f"{key!r} matches {len(prefix)} titles; give the item id")
            resolved.append(self._catalogue_item(prefix[0]) if prefix else Liked(key, key, None))
        return resolved

    def request(
        self, user: str | None = None, liked: list[str] | None = None, k: int = 10
    ) -> tuple[list[Liked], list[Recommendation]]:
        """Recommendations for a user of this platform, or for liked ids or titles (a person
        new here; titles from elsewhere are cold start): the history used, and the items."""
        if (user is None) == (liked is None):
            raise FedFuseError("give either a user or liked items")
        if user is not None:
            history, seen = self.user_history(user)
        else:
            history, seen = self.resolve(liked or []), set()
        return history[: self.history_len], self.recommend(history, seen, k)

    def document(
        self, user: str | None = None, liked: list[str] | None = None, k: int = 10
    ) -> dict[str, object]:
        """:meth:`request` as JSON: what ``fedfuse recommend --json`` and the service return."""
        history, recommendations = self.request(user, liked, k)
        return {
            "platform": self.platform,
            "user": user,
            "history": [vars(h) for h in history],
            "recommendations": [r.as_dict() for r in recommendations],
        }

    def recommend(
        self, history: list[Liked], exclude: set[str] | None = None, k: int = 10
    ) -> list[Recommendation]:
        """The ``k`` best catalogue items outside ``exclude`` and the history, explained.

        The whole catalogue is scored in place (no copy of its vectors) and the excluded items
        masked, so a request costs one pass over the item matrix.
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
        scores[rows] = -torch.inf
        top = torch.topk(scores, min(k, available)).indices.tolist()
        return [self._explained(t, float(scores[t]), history, parts, t) for t in top]

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
        index: int,
    ) -> Recommendation:
        item = self.featurizer.items[row]
        values = parts["history"][index].tolist()
        shares = [Share(h.key, h.text, v) for h, v in zip(history, values, strict=True)]
        return Recommendation(
            item=item,
            title=self.data.item_text[item],
            score=score,
            because=tuple(sorted(shares, key=lambda s: -s.value)),
            prior=float(parts["prior"][index]),
            text=float(parts["text"][index]),
            bias=float(parts["bias"][index]),
        )


def _total(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The score: every part added up (the history's shares summed per candidate)."""
    return parts["history"].sum(dim=-1) + parts["prior"] + parts["text"] + parts["bias"]
