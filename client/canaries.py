"""Canaries for the empirical privacy check (``[audit]``; the bound is
``server/audit/canary_audit.py``).

A canary is one labelled example, the privacy unit of DP training: a made-up user whose history
is one item and whose candidate is another, each titled with one random word, and whose label
is a fair coin. Random words make every canary unlike any real item and unlike the other
canaries; short titles keep them distinct after pooling; random labels leave the model nothing
to generalise from canary to canary, so only memorising a canary moves its score (a shared
shift cancels between the two labels). Each canary joins the platform's train split
independently with probability ½.

Canaries, labels and inclusion bits are a pure function of (``audit.canary_seed``, count): the
platform that trains and the auditor that scores regenerate the same ones, and the seed is
written to the audit file.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from common.config import RunConfig
from common.errors import DataError
from common.model import Scorer, TextFeaturizer
from common.task import Example, PlatformTask

PREFIX = "canary:"
LETTERS = np.asarray(list(string.ascii_lowercase))


@dataclass(frozen=True)
class Canaries:
    """The canary examples, the text of their items and which ones were included."""

    seed: int
    examples: tuple[Example, ...]
    item_text: dict[str, str]
    included: np.ndarray  # bool, one per example

    def members(self) -> list[Example]:
        return [e for e, keep in zip(self.examples, self.included, strict=True) if keep]


def make_canaries(count: int, seed: int) -> Canaries:
    """``count`` canaries and their Bernoulli(½) inclusion bits, from one seeded generator."""
    rng = np.random.default_rng([seed, count])
    included = rng.random(count) < 0.5
    labels = rng.integers(0, 2, size=count)
    examples, item_text = [], {}
    for k in range(count):
        history, candidate = f"{PREFIX}{k}:history", f"{PREFIX}{k}:candidate"
        for item in (history, candidate):
            item_text[item] = "".join(rng.choice(LETTERS, size=rng.integers(4, 9)))
        examples.append(Example(f"{PREFIX}{k}", (history,), candidate, int(labels[k])))
    return Canaries(seed, tuple(examples), item_text, included)


def canaries_for(config: RunConfig, platform: str) -> Canaries | None:
    """This run's canaries if ``platform`` is the audited one, else None."""
    audit = config.audit
    if not audit.canaries or platform != audit.canary_platform:
        return None
    return make_canaries(audit.canaries, audit.canary_seed)


def insert_canaries(
    task: PlatformTask, item_text: dict[str, str], canaries: Canaries | None
) -> dict[str, str]:
    """Append the included canaries to ``task.train``; returns the item texts the model reads.

    Called after the task is built, so canary items never become sampled negatives or
    evaluation candidates. Excluded canaries stay out of the data entirely.
    """
    if canaries is None:
        return item_text
    clash = sorted(set(canaries.item_text) & set(item_text))
    if clash:
        raise DataError(task.platform, f"item id {clash[0]!r} is reserved for audit canaries")
    task.train.extend(canaries.members())
    return item_text | canaries.item_text


def score_canaries(
    scorer: Scorer, featurizer: TextFeaturizer, canaries: Canaries, batch_size: int
) -> np.ndarray:
    """Each canary's logit signed by its label (+ for 1, - for 0): high = low loss on its own
    label = likely trained on."""
    was_training = scorer.training
    scorer.eval()
    try:
        logits = scorer.score_examples(featurizer, canaries.examples, batch_size)
    finally:
        scorer.train(was_training)
    signs = np.asarray([2 * e.label - 1 for e in canaries.examples], dtype=np.float32)
    return logits * signs
