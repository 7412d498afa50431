"""Synthetic platforms in the native format, for tests and for scale runs with many platforms.

Items belong to topics whose words appear in their titles, and each user prefers a few topics,
so the text really carries the signal a recommender has to learn (a text model can beat
popularity here, as on real data). Everything is drawn from one seeded generator.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from common.platform_writer import PlatformTables

TOPIC_WORDS = (
    ("space", "rocket", "galaxy", "orbit", "alien"),
    ("love", "wedding", "heart", "kiss", "romance"),
    ("crime", "detective", "heist", "murder", "police"),
    ("laugh", "party", "prank", "funny", "joke"),
    ("dragon", "magic", "wizard", "castle", "quest"),
    ("war", "soldier", "battle", "army", "tank"),
    ("ghost", "haunted", "scream", "night", "fear"),
    ("music", "band", "song", "dance", "stage"),
)


class SyntheticConfig(BaseModel):
    """Shape of a synthetic federation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    platforms: int = Field(3, ge=1, le=10_000)
    users: int = Field(40, ge=1, description="users per platform")
    items: int = Field(60, ge=2, description="items per platform")
    interactions_per_user: int = Field(12, ge=1)
    overlap: float = Field(
        0.5, ge=0, le=1, description="share of each platform's users from a common pool"
    )
    implicit: bool = Field(False, description="write 0/1 labels instead of 1-5 ratings")
    seed: int = Field(0, ge=0)


def generate(config: SyntheticConfig) -> list[PlatformTables]:
    """Platforms ``p0 .. p{N-1}``; shared users keep the same id and tastes everywhere."""
    rng = np.random.default_rng(config.seed)
    topics = len(TOPIC_WORDS)
    shared_count = round(config.users * config.overlap)
    pool = [f"u{k}" for k in range(shared_count)]
    taste: dict[str, np.ndarray] = {}

    def taste_of(user: str) -> np.ndarray:
        if user not in taste:
            taste[user] = rng.dirichlet(np.full(topics, 0.3))
        return taste[user]

    platforms = []
    for p in range(config.platforms):
        name = f"p{p}"
        item_topic = rng.integers(0, topics, size=config.items)
        items = []
        for k, topic in enumerate(item_topic):
            words = rng.choice(TOPIC_WORDS[topic], size=2, replace=False)
            items.append(
                {
                    "item_id": f"{name}-i{k}",
                    "title": f"{words[0]} {words[1]} {k}",
                    "genres": f"topic{topic}",
                }
            )
        own = [f"{name}-u{k}" for k in range(config.users - shared_count)]
        interactions = []
        for user in pool + own:
            affinity = taste_of(user)[item_topic]
            count = min(config.interactions_per_user, config.items)
            chosen = rng.choice(config.items, size=count, replace=False, p=_softmax(3 * affinity))
            start = int(rng.integers(1_600_000_000, 1_700_000_000))
            for step, item in enumerate(chosen):
                score = 4 * affinity[item] * topics / 2 + rng.normal(0, 0.6)
                rating = int(np.clip(np.round(1 + score), 1, 5))
                target = {"label": int(rating >= 4)} if config.implicit else {"rating": rating}
                interactions.append(
                    {
                        "user_id": user,
                        "item_id": f"{name}-i{item}",
                        **target,
                        "timestamp": start + 3600 * step,
                    }
                )
        platforms.append(PlatformTables(name=name, interactions=interactions, items=items))
    return platforms


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
