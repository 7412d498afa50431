"""FedFuse's Flower ClientApp: one platform's private training and evaluation.

The same app serves simulation (``partition-id`` in the node config picks the platform) and
deployment (one SuperNode per platform, whose node config names ``platform``, ``data-dir`` and
``state-dir``). DP settings come from the platform's own run configuration (``config-file``
and ``section.key`` overrides in the run config, then ``section.key`` entries of the node
config, which win): the server never decides a platform's noise or budget.

Train replies carry only the trainable adapter/head tensors and scalar metrics. A platform
that cannot take part answers with an error reply the server logs, never a crash:
``BUDGET_EXHAUSTED`` when the round would exceed its ε budget, ``ROUND_ALREADY_CHARGED`` for a
round number its ledger already holds (a replay after a restart), ``INVALID_INPUT`` for bad data
or configuration. Every message received and sent is recorded (tensor hashes and shapes, keys,
no values) in ``<state dir>/wire_log.jsonl`` for ``fedfuse audit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.ledger import BudgetExhausted, RoundAlreadyCharged
from client.platform_client import PlatformClient, identify
from common.config import run_configuration
from common.errors import FedFuseError
from common.wire_log import RECEIVED, SENT, WIRE_LOG_FILE, append_records, message_record

BUDGET_EXHAUSTED = 4001
INVALID_INPUT = 4002
ROUND_ALREADY_CHARGED = 4003

app = ClientApp()
_clients: dict[tuple[str, str], PlatformClient] = {}


def platform_client(context: Context) -> PlatformClient:
    """The node's PlatformClient, built on first use and kept for later rounds."""
    config = run_configuration(dict(context.run_config), dict(context.node_config))
    identity = identify(dict(context.node_config), config)
    key = (repr(identity), config.model_dump_json())
    if key not in _clients:
        _clients[key] = PlatformClient(identity, config)
    return _clients[key]


def _arrays(msg: Message) -> dict[str, Any]:
    return {name: array.numpy() for name, array in msg.content.array_records["arrays"].items()}


def _settings(msg: Message) -> dict[str, Any]:
    """The message's configuration as plain values (Flower types each as a union of kinds)."""
    return dict(msg.content.config_records["config"])


def _error(msg: Message, err: Exception) -> Message:
    if isinstance(err, RoundAlreadyCharged):
        code = ROUND_ALREADY_CHARGED
    elif isinstance(err, BudgetExhausted):
        code = BUDGET_EXHAUSTED
    else:
        code = INVALID_INPUT
    return Message(Error(code=code, reason=str(err)), reply_to=msg)


def _logged(
    handler: Callable[[Message, Context], Message], msg: Message, context: Context
) -> Message:
    """Run ``handler``, recording the message and the reply in the platform's wire log.

    A node whose platform cannot even be identified has no state folder to write to: its error
    reply goes unrecorded here (the server's log still has it).
    """
    try:
        client = platform_client(context)
    except FedFuseError:
        return handler(msg, context)
    settings: dict[str, Any] = dict(msg.content.config_records.get("config") or {})
    server_round = int(settings.get("server-round", 0))  # 0: the server sent none
    path, name = client.identity.state_dir / WIRE_LOG_FILE, client.identity.name
    append_records(path, [message_record("client", RECEIVED, msg, server_round, name)])
    reply = handler(msg, context)
    append_records(path, [message_record("client", SENT, reply, server_round, name)])
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _logged(_train, msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _logged(_evaluate, msg, context)


def _train(msg: Message, context: Context) -> Message:
    """Train locally from the server's adapters; reply with new adapters and ε spent."""
    try:
        client = platform_client(context)
        settings = _settings(msg)
        learning_rate = float(settings.get("learning-rate", client.config.train.learning_rate))
        arrays, metrics = client.train_round(
            int(settings["server-round"]),
            _arrays(msg),
            learning_rate,
            str(settings.get("run-id", "")),
        )
    except FedFuseError as err:
        return _error(msg, err)
    content = RecordDict(
        {
            "arrays": ArrayRecord({name: Array(value) for name, value in arrays.items()}),
            "metrics": MetricRecord(dict[str, Any](metrics)),
            "platform": ConfigRecord({"name": client.identity.name}),
        }
    )
    return Message(content=content, reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    """Protocol metrics of the server's adapters on this platform's valid (or test) split."""
    try:
        client = platform_client(context)
        settings = _settings(msg)
        split = str(settings.get("split", "valid"))
        max_cases = int(settings.get("max-cases", client.config.train.eval_max_cases))
        metrics = client.evaluate(_arrays(msg), split, max_cases)
    except FedFuseError as err:
        return _error(msg, err)
    content = RecordDict(
        {
            "metrics": MetricRecord(metrics),
            "platform": ConfigRecord({"name": client.identity.name}),
        }
    )
    return Message(content=content, reply_to=msg)
