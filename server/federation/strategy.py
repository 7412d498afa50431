"""FedFuse's aggregation: Flower's FedAvg over the adapter tensors the platforms share.

The aggregation rule is the same for every strategy — a weighted average, per tensor name, with
weights ∝ each platform's number of training examples (Flower's ``aggregate_arrayrecords``):

    global[name] = Σ_k n_k · tensor_k[name] / Σ_k n_k

With ``federation.server_learning_rate`` η ≠ 1 the average is taken as a server step instead
(FedOpt's server SGD, Reddi et al. 2021): ``global ← global + η · (average − global)``.

What differs between ``fedavg``, ``ffa`` and ``fedsa`` is which tensors are trained and sent at
all; that rule lives in ``common/sharing.py`` and is applied on the platforms. On top of FedAvg
this strategy adds what a FedFuse run needs: the learning rate for each round, a round offset so
a resumed run keeps counting, and a record of every reply (including a platform's failure or
exhausted budget) in the run's metrics.jsonl, and a line per message sent or received in the
run's wire_log.jsonl (see ``common/wire_log.py``).

Under ``federation.schedule = "lockstep"`` (:class:`LockstepStrategy`) a round is one DP step:
the platforms send noised gradients instead of trained tensors, and the server averages them
(unweighted) and applies them with one AdamW (``server/federation/server_optimizer.py``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.errors import FedFuseError
from common.sharing import shared_scorer
from common.wire_log import (
    RECEIVED,
    SENT,
    WIRE_LOG_FILE,
    append_records,
    message_record,
    model_record,
)
from server.federation.run_record import CONFIG_FILE, RunRecord
from server.federation.server_optimizer import ServerOptimizer

log = logging.getLogger(__name__)


def reply_platform(reply: Message) -> str | None:
    """The platform a successful reply names (its ``platform`` record), else None."""
    if reply.has_error():
        return None
    platform = reply.content.config_records.get("platform")
    return str(platform["name"]) if platform else None


def reply_event(kind: str, server_round: int, reply: Message, node: int) -> dict[str, object]:
    """One metrics.jsonl line for a platform's reply: its metrics, or its error."""
    event: dict[str, object] = {"event": kind, "round": server_round, "node": node}
    if reply.has_error():
        return event | {"status": "error", "code": reply.error.code, "reason": reply.error.reason}
    metrics = next(iter(reply.content.metric_records.values()), MetricRecord())
    return event | {
        "status": "ok",
        "platform": reply_platform(reply),
        **{key: value for key, value in metrics.items()},
    }


class RoundFailed(FedFuseError):
    """No platform trained in a round: the run stops there (resumable) instead of carrying
    the old adapters forward as if the round had happened."""


class FedFuseStrategy(FedAvg):
    """FedAvg with a learning-rate schedule, resumable round numbers and per-reply records."""

    def __init__(
        self,
        record: RunRecord,
        learning_rate: Callable[[int], float],
        round_offset: int = 0,
        planned_rounds: int | None = None,
        server_learning_rate: float = 1.0,
        node_wait: float = 600.0,
        **fedavg: object,
    ) -> None:
        super().__init__(**fedavg)  # type: ignore[arg-type]
        self.record = record
        self.node_wait = node_wait
        self.server_learning_rate = server_learning_rate
        self.sent: ArrayRecord | None = None  # the global tensors of the round in flight
        self.planned_rounds = planned_rounds
        self.learning_rate = learning_rate
        self.round_offset = round_offset
        self.platforms: dict[int, str] = {}  # node id → platform, learned from its replies
        self.model_logged = False
        self.outbox: list[Message] = []  # this round's messages; the grid gives them their ids

    def _round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def await_nodes(self, grid: Grid, server_round: int) -> None:
        """Flower's sampling waits for ``min_available_nodes`` without end, so a platform gone
        for good would hang the run: wait ``node_wait`` seconds at most, then stop the run at
        this round (resumable once the platforms are back)."""
        needed = max(self.min_available_nodes, self.min_train_nodes)
        absolute = self._round(server_round)
        deadline = time.monotonic() + self.node_wait
        announced = False
        while (online := len(list(grid.get_node_ids()))) < needed:
            if time.monotonic() >= deadline:
                reason = (
                    f"round {absolute}: {online} of the {needed} platforms it needs "
                    f"(federation.min_nodes) online after {self.node_wait:g} s "
                    "(federation.node_wait); the run stops here and resumes once they are back"
                )
                self.record.append([{"event": "round-failed", "round": absolute, "reason": reason}])
                raise RoundFailed(reason)
            if not announced:
                log.info(
                    "round %d waits for platforms: %d of %d online (at most %g s)",
                    absolute,
                    online,
                    needed,
                    self.node_wait,
                )
                announced = True
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        absolute = self._round(server_round)
        config = ConfigRecord({**config, "learning-rate": float(self.learning_rate(absolute))})
        self.await_nodes(grid, server_round)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        config["server-round"] = absolute  # shared by the messages, after FedAvg's own value
        self.sent = arrays
        self._log_model()
        self._log_wire(SENT, absolute, messages)
        self.outbox = messages
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord(dict(config))
        if self.fraction_evaluate > 0:
            self.await_nodes(grid, server_round)
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        config["server-round"] = self._round(server_round)
        self._log_wire(SENT, self._round(server_round), messages)
        self.outbox = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._log_replies("train", server_round, replies)
        if not any(reply.has_content() for reply in replies):
            absolute = self._round(server_round)
            reasons = sorted({reply.error.reason for reply in replies if reply.has_error()})
            reason = f"round {absolute}: no platform trained ({len(replies)} replies, all errors)"
            if reasons:
                more = f" (+{len(reasons) - 1} more in metrics.jsonl)" if len(reasons) > 1 else ""
                reason += f": {reasons[0]}{more}"
            self.record.append([{"event": "round-failed", "round": absolute, "reason": reason}])
            raise RoundFailed(reason)
        return self._combine(server_round, replies)

    def _combine(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The example-weighted mean of the trained tensors (FedAvg), as a server step."""
        average, metrics = super().aggregate_train(server_round, replies)
        return self._server_step(average), metrics

    def _server_step(self, average: ArrayRecord | None) -> ArrayRecord | None:
        """``global + η · (average − global)``: η > 1 lengthens the averaged update, on the idea
        that averaging shortens what the platforms agree on less than their independent DP
        noise (divided by about √platforms). On ML-100K η = 2 scored below η = 1
        (docs/results.md), so the default is 1."""
        eta, sent = self.server_learning_rate, self.sent
        if average is None or sent is None or eta == 1.0:
            return average
        stepped = {}
        for name, array in average.items():
            start = sent[name].numpy()
            stepped[name] = Array(start + eta * (array.numpy() - start))
        return ArrayRecord(stepped)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self._log_replies("evaluate", server_round, replies)
        if not any(self._evaluated_cases(reply) for reply in replies):
            return None  # the platforms asked hold no case: Flower's mean would divide by 0
        return super().aggregate_evaluate(server_round, replies)

    def _evaluated_cases(self, reply: Message) -> float:
        """The weight Flower's mean gives ``reply``: its ranking cases (0 for an error)."""
        if reply.has_error():
            return 0.0
        metrics = next(iter(reply.content.metric_records.values()), None)
        return float(metrics.get(self.weighted_by_key, 0.0)) if metrics is not None else 0.0

    def _log_replies(self, kind: str, server_round: int, replies: list[Message]) -> None:
        # An error the SuperLink generates for a lost node comes from the SuperLink itself: the
        # node is the one the original message went to.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.outbox}
        sent_to.pop("", None)  # messages no grid has pushed (ids are set on push)
        events = [
            reply_event(
                kind,
                self._round(server_round),
                reply,
                sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id),
            )
            for reply in replies
        ]
        for event in events:
            if event.get("platform"):
                self.platforms[int(event["node"])] = str(event["platform"])
        self._log_wire(RECEIVED, self._round(server_round), replies)
        self._progress(kind, self._round(server_round), events)
        self.record.append(events)

    def _progress(self, kind: str, server_round: int, events: list[dict[str, object]]) -> None:
        """One console line per round and kind (which platforms answered, ε or NDCG@10), and
        one per failed platform; the full Flower log goes to the run folder instead."""
        of = f"/{self.planned_rounds}" if self.planned_rounds else ""
        ok = [e for e in events if e["status"] == "ok"]
        line = f"round {server_round}{of} {kind}: {len(ok)}/{len(events)} platforms"
        if kind == "train" and ok:
            line += f", ε ≤ {max(float(e.get('epsilon', math.inf)) for e in ok):.3f}"
        if kind == "evaluate" and ok:
            line += f", mean NDCG@10 {np.mean([float(e.get('ndcg@10', math.nan)) for e in ok]):.4f}"
        names = ", ".join(sorted(str(e["platform"]) for e in ok))
        log.info("%s%s", line, f": {names}" if names else "")
        for event in events:
            if event["status"] == "error":
                who = self.platforms.get(int(event["node"]), f"node {event['node']}")
                log.info("round %d %s: %s: %s", server_round, kind, who, event["reason"])

    def _log_wire(self, direction: str, server_round: int, messages: list[Message]) -> None:
        """Messages to a node that has not replied yet carry its node id only (platform None)."""
        records = [message_record("server", direction, m, server_round, None) for m in messages]
        for record in records:
            record["platform"] = self.platforms.get(record["node"])
        append_records(self.record.root / WIRE_LOG_FILE, records)

    def _log_model(self) -> None:
        """Once per process: the full model size beside the shared tensors (for the audit)."""
        if self.model_logged or not (self.record.root / CONFIG_FILE).exists():
            return
        config = self.record.run_config()
        scorer, _ = shared_scorer(config.model, config.lora, config.federation.strategy)
        append_records(
            self.record.root / WIRE_LOG_FILE, [model_record(scorer, config.federation.strategy)]
        )
        self.model_logged = True


class LockstepStrategy(FedFuseStrategy):
    """One DP step per round: the noised gradients of the platforms due to step, averaged and
    applied by the server's AdamW. A platform not due this round replies without tensors."""

    def __init__(self, optimizer: ServerOptimizer, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.optimizer = optimizer

    def _combine(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The unweighted mean of the noised gradients that came, one server AdamW step."""
        gradients = [
            {name: array.numpy() for name, array in reply.content["arrays"].items()}
            for reply in replies
            if reply.has_content() and len(reply.content["arrays"])
        ]
        rate = float(self.learning_rate(self._round(server_round)))
        arrays = self.optimizer.step(gradients, rate) if gradients else self.optimizer.arrays
        stepped = MetricRecord({"platforms-stepped": len(gradients)})
        return ArrayRecord({name: Array(value) for name, value in arrays.items()}), stepped
