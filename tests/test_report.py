"""The run summary: last evaluated round per platform, next to its DP prior alone."""

from __future__ import annotations

from server.federation.report import summary_table


def _evaluate(platform: str, server_round: int, ndcg: float, prior: float) -> dict[str, object]:
    metrics = {"hr@10": 0.5, "ndcg@10": ndcg, "mrr": 0.2, "auc": 0.6, "prior-ndcg@10": prior}
    event = {"event": "evaluate", "status": "ok", "platform": platform, "round": server_round}
    return event | metrics


def test_summary_shows_the_model_next_to_the_dp_prior_of_the_same_round() -> None:
    events = [
        _evaluate("a", 1, 0.20, 0.25),
        _evaluate("a", 2, 0.30, 0.26),
        _evaluate("b", 2, 0.10, 0.12),
        {"event": "train", "status": "ok", "platform": "a", "round": 2, "epsilon": 7.99},
    ]
    table = summary_table(events)
    assert "| DP prior NDCG@10 | ε spent |" in table
    assert "| a | 2 | 0.5000 | 0.3000 | 0.2000 | 0.6000 | 0.2600 | 7.990 |" in table
    assert "| b | 2 | 0.5000 | 0.1000 | 0.2000 | 0.6000 | 0.1200 | – |" in table
    assert "| **mean** |  | 0.5000 | 0.2000 | 0.2000 | 0.6000 | 0.1900 |  |" in table
