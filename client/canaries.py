"""Canaries for the empirical privacy check (``[audit]``; the bound is
``server/audit/canary_audit.py``).

A canary is one training unit of a made-up user of its own, so it is one privacy unit under
either ``dp.unit`` (a user-level step sums nothing into it): a history of one item, a
candidate item with a fair-coin label and a decoy item, each titled with one random word.
The pointwise objective trains on (candidate, label); the ranking objective on
the liked one of the pair against the other. Random words make every canary unlike any real
item and unlike the other canaries; short titles keep them distinct after pooling; random
labels leave nothing to generalise from canary to canary. Its score is the candidate's logit
minus the decoy's, signed by the label: only memorising the canary moves it, and a shift
shared by all unseen words cancels. Each canary joins the platform's train split
independently with probability ½.

Canaries, labels and inclusion bits are a pure function of (``audit.canary_seed``, count): the
platform that trains and the auditor that scores regenerate the same ones, and the seed is
written to the audit file.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, replace

import numpy as np

from common.config import RunConfig
from common.errors import DataError
from common.featurizer import TextFeaturizer
from common.scorers import Scorer
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

    def members(self, objective: str) -> list[Example]:
        """The included canaries as training units of ``objective``: under ``softmax`` a
        label-0 canary's decoy is the liked item and its candidate the negative."""
        kept = [e for e, keep in zip(self.examples, self.included, strict=True) if keep]
        if objective == "bce":
            return [replace(e, negatives=()) for e in kept]
        return [
            e
            if e.label
            else replace(e, candidate=e.negatives[0], label=1, negatives=(e.candidate,))
            for e in kept
        ]


def make_canaries(count: int, seed: int) -> Canaries:
    """``count`` canaries and their Bernoulli(½) inclusion bits, from one seeded generator."""
    rng = np.random.default_rng([seed, count])
    included = rng.random(count) < 0.5
    labels = rng.integers(0, 2, size=count)
    examples, item_text = [], {}
    for k in range(count):
        history, candidate, decoy = (f"{PREFIX}{k}:{part}" for part in ("history", "item", "decoy"))
        for item in (history, candidate, decoy):
            item_text[item] = "".join(rng.choice(LETTERS, size=rng.integers(4, 9)))
        examples.append(Example(f"{PREFIX}{k}", (history,), candidate, int(labels[k]), (decoy,)))
    return Canaries(seed, tuple(examples), item_text, included)


def canaries_for(config: RunConfig, platform: str) -> Canaries | None:
    """This run's canaries if ``platform`` is the audited one, else None."""
    audit = config.audit
    if not audit.canaries or platform != audit.canary_platform:
        return None
    return make_canaries(audit.canaries, audit.canary_seed)


def insert_canaries(
    task: PlatformTask, item_text: dict[str, str], canaries: Canaries | None, objective: str
) -> dict[str, str]:
    """Append the included canaries to ``task.train``; returns the item texts the model reads.

    Called after the task is built, so canary items never become sampled negatives or
    evaluation candidates. Excluded canaries stay out of the data entirely.
    """
    if canaries is None:
        return item_text
    for kind, reserved, taken in (
        ("item", set(canaries.item_text), set(item_text)),
        ("user", {e.user for e in canaries.examples}, {e.user for e in task.train}),
    ):
        clash = sorted(reserved & taken)
        if clash:
            raise DataError(task.platform, f"{kind} id {clash[0]!r} is reserved for audit canaries")
    task.train.extend(canaries.members(objective))
    return item_text | canaries.item_text


def score_canaries(
    scorer: Scorer, featurizer: TextFeaturizer, canaries: Canaries, batch_size: int
) -> np.ndarray:
    """Each canary's candidate logit minus its decoy's, signed by its label (+ for 1, - for 0):
    high = the canary's own label is the likely one = likely trained on."""
    was_training = scorer.training
    scorer.eval()
    try:
        decoys = [replace(e, candidate=e.negatives[0]) for e in canaries.examples]
        logits = scorer.score_examples(featurizer, [*canaries.examples, *decoys], batch_size)
    finally:
        scorer.train(was_training)
    signs = np.asarray([2 * e.label - 1 for e in canaries.examples], dtype=np.float32)
    return (logits[: len(decoys)] - logits[len(decoys) :]) * signs
