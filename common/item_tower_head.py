"""The item tower's head: how a user vector is made from history item vectors and how it,
the platform's prior and the optional private parts mix into one logit."""

from __future__ import annotations

import torch
from torch import nn

# (B, C, D) vectors of the items each person brought from other platforms, and their mask
Carried = tuple[torch.Tensor, torch.Tensor]


class ItemTowerHead(nn.Module):
    """The item tower's trainable parts outside the encoder (saved and shared as its head).

    - ``recency``: one slope over history positions (0 = newest), so a user is a softmax-
      weighted mean of their history item vectors; it starts uniform.
    - ``user_down``/``user_up``: a low-rank residual map of that mean (starts as identity);
      ``rank`` 0 leaves the mean as it is (docs/results.md: under DP the rank-8 map's seven
      weak directions are noise, and scoring without it ranked better).
    - ``item_score`` (optional): a linear score of the item vector alone (what the text says
      about how likely any user is to like the item: age, kind, fame), starting at 0.
    - ``private_items`` (optional): collaborative item factors of the platform's own items,
      never shared (a private part, see common/sharing.py); the user's factor is the same
      recency-weighted mean over their history, and its dot product with the candidate's
      factor joins the logit. Rows are the platform's item rows modulo the table size.
    - ``mix``: logit = w * cos(user, item) + beta * prior [+ item_score] [+ factors] + b; a
      platform's own weighting of content against its own prior (private, common/sharing.py).
      With ``carried``, the cosine of what the person brought from other platforms (pooled
      like the history) joins the history's at the same weight w: w * (cos(user, item) +
      cos(brought, item)). Tied, not a weight of its own: a third noisy mixing weight under
      DP lost most of the feature's gain on validation (docs/research-log.md).

    Candidates come as (B, D) vectors (one per example) or (B, W, D) (W per example: the
    ranking objective's positive and negatives); the logits then have shape (B,) or (B, W).
    """

    def __init__(
        self,
        hidden: int,
        rank: int,
        temperature: float,
        prior_weight: float,
        factors: int = 0,
        slots: int = 0,
        item_score: bool = True,
        carried: bool = False,
    ):
        super().__init__()
        self.carried = carried
        self.private_items = nn.Embedding(slots, factors) if factors else None
        if self.private_items is not None:
            nn.init.normal_(self.private_items.weight, std=0.1)
        self.recency = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.recency.weight)
        self.user_down = nn.Linear(hidden, rank, bias=False) if rank else None
        self.user_up = nn.Linear(rank, hidden, bias=False) if rank else None
        if self.user_up is not None:
            nn.init.zeros_(self.user_up.weight)
        self.item_score = nn.Linear(hidden, 1, bias=False) if item_score else None
        if self.item_score is not None:
            nn.init.zeros_(self.item_score.weight)
        self.mix = nn.Linear(2, 1)
        with torch.no_grad():
            self.mix.weight.copy_(torch.tensor([[1.0 / temperature, prior_weight]]))
            self.mix.bias.fill_(-0.5 / temperature)

    def user_map(self, vectors: torch.Tensor) -> torch.Tensor:
        """``vectors`` through the residual user map (unchanged without one)."""
        if self.user_down is None or self.user_up is None:
            return vectors
        return vectors + self.user_up(self.user_down(vectors))

    def weights(self, history_mask: torch.Tensor) -> torch.Tensor:
        """(B, H) recency weights over the history positions present (zeros without any)."""
        positions = torch.arange(history_mask.shape[1], device=history_mask.device)
        positions = positions.to(self.recency.weight.dtype).expand(history_mask.shape[0], -1)
        logits = self.recency(positions.unsqueeze(-1)).squeeze(-1)
        logits = logits.masked_fill(~history_mask.bool(), float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)

    def logits(
        self,
        history: torch.Tensor,
        history_mask: torch.Tensor,
        history_rows: torch.Tensor,
        item: torch.Tensor,
        item_rows: torch.Tensor,
        prior: torch.Tensor,
        carried: Carried | None = None,
    ) -> torch.Tensor:
        """Logits from (B, H, D) history item vectors (newest first), their mask and item rows,
        and the candidates' (B, D) or (B, W, D) vectors with their rows and prior values;
        ``carried``: the (B, C, D) vectors and mask of what each person brought from elsewhere
        (none: as if nothing was brought)."""
        user, taste = self.user(history, history_mask, history_rows)

        def cos(vector: torch.Tensor) -> torch.Tensor:
            vector = vector.unsqueeze(1) if item.dim() == 3 else vector
            return nn.functional.cosine_similarity(vector, item, dim=-1, eps=1e-6)

        cosine = cos(user)
        if self.carried:
            cosine = cosine + cos(self.elsewhere(carried, user))
        features = torch.stack([cosine, prior.to(cosine.dtype)], dim=-1)
        logits = self.mix(features).squeeze(-1)
        if self.item_score is not None:
            logits = logits + self.item_score(item).squeeze(-1)
        if self.private_items is not None and taste is not None:
            if item.dim() == 3:
                taste = taste.unsqueeze(1)
            factors = self.private_items(item_rows % self.private_items.num_embeddings)
            logits = logits + (taste * factors).sum(dim=-1)
        return logits

    def _pooled(self, vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(B, D): the mapped weighted mean of (B, H, D) item vectors."""
        return self.user_map((weights.unsqueeze(-1) * vectors).sum(dim=1))

    def elsewhere(self, carried: Carried | None, user: torch.Tensor) -> torch.Tensor:
        """(B, D) vectors of what each person brought from other platforms, pooled as their
        history here (``user``) is; zeros for nothing brought."""
        if carried is None:
            return torch.zeros_like(user)
        vectors, mask = carried
        assert len(vectors) == len(user)
        return self._pooled(vectors, self.weights(mask))

    def user(
        self, history: torch.Tensor, history_mask: torch.Tensor, history_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, D) user vectors (the mapped recency-weighted mean of the history vectors) and,
        with private item factors, (B, F) user factors (the same mean over their rows)."""
        weights = self.weights(history_mask)
        user = self._pooled(history, weights)
        if self.private_items is None:
            return user, None
        slots = self.private_items.num_embeddings
        taste = (weights.unsqueeze(-1) * self.private_items(history_rows % slots)).sum(dim=1)
        return user, taste

    @torch.no_grad()
    def catalogue_logits(
        self,
        history: torch.Tensor,
        history_mask: torch.Tensor,
        history_rows: torch.Tensor,
        items: torch.Tensor,
        item_rows: torch.Tensor,
        prior: torch.Tensor,
        carried: Carried | None = None,
    ) -> torch.Tensor:
        """:meth:`logits` of B users for the same N candidates ((N, D) vectors, (N,) rows and
        prior), as a (B, N) matrix: one product of normalised vectors instead of B × N
        cosines, so a whole catalogue is scored for every evaluation case."""
        user, taste = self.user(history, history_mask, history_rows)
        unit = lambda v: v / v.norm(dim=-1, keepdim=True).clamp(min=1e-6)  # noqa: E731
        cosine = unit(user) @ unit(items).T
        if self.carried:
            cosine = cosine + unit(self.elsewhere(carried, user)) @ unit(items).T
        prior = prior.to(cosine.dtype).expand_as(cosine)
        features = torch.stack([cosine, prior], dim=-1)
        logits = self.mix(features).squeeze(-1)
        if self.item_score is not None:
            logits = logits + self.item_score(items).squeeze(-1)
        if self.private_items is not None and taste is not None:
            factors = self.private_items(item_rows % self.private_items.num_embeddings)
            logits = logits + taste @ factors.T
        return logits

    @torch.no_grad()
    def contributions(
        self,
        history: torch.Tensor,
        history_mask: torch.Tensor,
        history_rows: torch.Tensor,
        item: torch.Tensor,
        item_rows: torch.Tensor,
        prior: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """:meth:`logits` of one user (``history`` (H, D), newest first; a row of -1 is an item
        from another platform) for N candidates, split into parts that add up to it.

        The user vector is linear in the history vectors (a weighted mean, then a linear map),
        and the cosine is linear in the user vector, so each history item's share of the
        cosine term is exact: ``w * a_j * (g_j . v) / (|u| |v|)`` with ``g_j`` the mapped item
        vector. Private factors split the same way. Returns ``history`` (N, H), ``prior``,
        ``text`` (the item-score term) and ``bias`` (N,).
        """
        weights = self.weights(history_mask[None])[0]  # (H,)
        mapped = self.user_map(history)  # (H, D)
        user = (weights[:, None] * mapped).sum(dim=0)
        scale = (user.norm() * item.norm(dim=-1)).clamp(min=1e-6)  # (N,)
        cosine_weight, prior_weight = self.mix.weight[0, :2]
        shares = cosine_weight * weights[None, :] * (item @ mapped.T) / scale[:, None]
        if self.private_items is not None:
            slots = self.private_items.num_embeddings
            factors = self.private_items(history_rows.clamp(min=0) % slots)
            factors = factors * (history_rows >= 0)[:, None]  # no factor for a foreign item
            item_factors = self.private_items(item_rows % slots)
            shares = shares + weights[None, :] * (item_factors @ factors.T)
        return {
            "history": shares,
            "prior": prior_weight * prior.to(item.dtype),
            "text": (
                self.item_score(item).squeeze(-1)
                if self.item_score is not None
                else torch.zeros(len(item), device=item.device)
            ),
            "bias": self.mix.bias.detach().expand(len(item)),
        }
