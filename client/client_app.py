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
no values) in ``<state dir>/wire_log.jsonl`` for ``fedfuse audit``. Under
``federation.secure_aggregation`` train messages run through Flower's SecAgg+ mod
(``client/secure_aggregation.py``).
"""

from __future__ import annotations

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
from flwr.clientapp.typing import ClientAppCallable

from client.ledger import BudgetExhausted, RoundAlreadyCharged
from client.platform_client import PlatformClient, identify
from client.secure_aggregation import (
    FITINS_CONFIG,
    carries_fitins,
    secure_inputs,
    secure_reply,
    secure_when_asked,
)
from common.config import run_configuration
from common.errors import ConfigError, FedFuseError
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


def _round_of(msg: Message) -> int:
    """The server round a message belongs to: its config's ``server-round``, or (SecAgg+'s
    key stages, which carry none) the round the session's group id names; 0 if neither."""
    if msg.has_content():
        for key in ("config", FITINS_CONFIG):
            settings = msg.content.config_records.get(key)
            if settings is not None and "server-round" in settings:
                return int(settings["server-round"])  # type: ignore[arg-type]
    group = msg.metadata.group_id
    return int(group) if group.isdigit() else 0


def wire_logged(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Record the message and the reply that leaves (after SecAgg+'s masking, when on) in the
    platform's wire log.

    A node whose platform cannot even be identified has no state folder to write to: its error
    reply goes unrecorded here (the server's log still has it).
    """
    try:
        client = platform_client(context)
    except FedFuseError:
        return call_next(msg, context)
    server_round = _round_of(msg)
    path, name = client.identity.state_dir / WIRE_LOG_FILE, client.identity.name
    names = sorted(client.shared)
    try:
        append_records(path, [message_record("client", RECEIVED, msg, server_round, name, names)])
        reply = call_next(msg, context)
        append_records(path, [message_record("client", SENT, reply, server_round, name, names)])
    except OSError as err:  # its disk (full, read-only): one line for the server, not Ray's
        return _error(msg, err)  # traceback; unrecorded, as nothing more can be written
    return reply


@app.train(mods=[wire_logged, secure_when_asked])
def train(msg: Message, context: Context) -> Message:
    return _train(msg, context)


@app.evaluate(mods=[wire_logged])
def evaluate(msg: Message, context: Context) -> Message:
    return _evaluate(msg, context)


def _train(msg: Message, context: Context) -> Message:
    """Train locally from the server's adapters; reply with new adapters and ε spent (under
    secure aggregation: the vector SecAgg+ masks, ``client/secure_aggregation.py``)."""
    try:
        client = platform_client(context)
        secure = carries_fitins(msg)
        if client.config.federation.secure_aggregation and not secure:
            raise ConfigError(
                f"platform {client.identity.name!r} takes part in secure aggregation only "
                "(federation.secure_aggregation); the server sent a plain train message"
            )
        if secure:
            received, settings = secure_inputs(msg, sorted(client.shared))
        else:
            received, settings = _arrays(msg), _settings(msg)
        learning_rate = float(settings.get("learning-rate", client.config.train.learning_rate))
        arrays, metrics = client.train_round(
            int(settings["server-round"]),
            received,
            learning_rate,
            str(settings.get("run-id", "")),
        )
    except (FedFuseError, OSError) as err:  # OSError: its disk (full, read-only), one line
        return _error(msg, err)
    if secure:
        return secure_reply(msg, context, received, arrays, metrics, client.identity.name)
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
    except (FedFuseError, OSError) as err:  # OSError: its disk (full, read-only), one line
        return _error(msg, err)
    content = RecordDict(
        {
            "metrics": MetricRecord(metrics),
            "platform": ConfigRecord({"name": client.identity.name}),
        }
    )
    return Message(content=content, reply_to=msg)
