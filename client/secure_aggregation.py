"""A platform's side of secure aggregation (``federation.secure_aggregation``): its noised
gradient reaches the server only inside Flower's SecAgg+ sum.

Flower's ``secaggplus_mod`` answers the protocol's key stages itself and, in the masked-vector
stage, calls the ClientApp with a legacy ``FitIns`` message; it then quantises, masks and sends
what the app returns in its ``FitRes``, clearing the plain tensors from the reply. What the app
returns here (:func:`secure_reply`; the server's reading is ``server/federation/
secure_aggregation.py``): the noised gradient of every shared tensor in sorted name order —
zeros for a tensor not stepped, all zeros in a round the platform is not due — then one
indicator per tensor, 1 where it stepped it, with weight 1. The plaintext metrics (ε, σ, …)
travel beside the masked vector, as in a plain round.

A platform whose configuration asks for secure aggregation refuses a plain train message
(``client/client_app.py``): the server cannot switch it off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from common.errors import DataError
from common.wire_log import SECAGG_RECORD

FITINS_CONFIG = "fitins.config"


def is_secure(msg: Message) -> bool:
    """Whether ``msg`` is a stage of a SecAgg+ session."""
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and msg.has_content()
        and SECAGG_RECORD in msg.content.config_records
    )


def carries_fitins(msg: Message) -> bool:
    """Whether ``msg`` is SecAgg+'s masked-vector stage as the app sees it (legacy FitIns)."""
    return FITINS_CONFIG in msg.content.config_records


class _Refused(Exception):
    """The app answered with an error: passed back as it is, not as a crash of the mod."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def secure_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages; a plain message goes straight on.

    ``secaggplus_mod`` would fail on the app's error reply (it reads the reply's content), so
    an error (budget exhausted, a round already charged) comes back with its own code and
    reason; the platform then counts as dropped for the session.
    """
    if not is_secure(msg):
        return call_next(msg, context)

    def app(message: Message, ctx: Context) -> Message:
        reply = call_next(message, ctx)
        if reply.has_error():
            raise _Refused(reply)
        return reply

    try:
        return secaggplus_mod(msg, context, app)
    except _Refused as refused:
        return refused.reply


def secure_inputs(msg: Message, names: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The server's shared tensors (by name: they travel in sorted name order) and the round's
    settings, from SecAgg+'s FitIns."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(names):
        raise DataError(
            "train message", f"{len(arrays)} tensors, this platform shares {len(names)}"
        )
    return dict(zip(names, arrays, strict=True)), dict(fitins.config)


def secure_reply(
    msg: Message,
    context: Context,
    received: dict[str, np.ndarray],
    released: dict[str, np.ndarray],
    metrics: dict[str, Any],
    platform: str,
) -> Message:
    """The FitRes SecAgg+ masks: values, then indicators (module docstring), weight 1.
    ``secagg-clipped`` counts the coordinates beyond the session's range R, which Flower
    clips (post-processing of the noised gradient)."""
    names = list(received)
    values = [
        np.asarray(released[n], dtype=np.float64)
        if n in released
        else np.zeros_like(received[n], dtype=np.float64)
        for n in names
    ]
    indicators = [np.array([1.0 if n in released else 0.0]) for n in names]
    state = context.state.config_records.get(RECORD_KEY_STATE) or ConfigRecord()
    bound = float(state.get("clipping_range", np.inf))  # type: ignore[arg-type]
    clipped = int(sum(np.count_nonzero(np.abs(v) > bound) for v in values))
    scalars = {**metrics, "secagg-clipped": clipped}
    fitres = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters(values + indicators),
        num_examples=1,
        metrics={**scalars, "platform": platform},
    )
    content = compat.fitres_to_recorddict(fitres, keep_input=True)
    content["metrics"] = MetricRecord(scalars)
    content["platform"] = ConfigRecord({"name": platform})
    return Message(content=content, reply_to=msg)
