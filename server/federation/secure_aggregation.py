"""Secure aggregation of the lockstep schedule: the server learns only the sum of the platforms'
noised gradients, through Flower's SecAgg+ (no cryptography of FedFuse's own).

Flower 1.41 offers SecAgg+ for the legacy API only: ``SecAggPlusWorkflow`` drives a legacy
``Strategy`` through a ``LegacyContext`` (four stages of messages per round: key setup, key
shares, masked vectors, unmasking). :class:`SecureLockstepStrategy` keeps FedFuse's Message-API
strategy for everything else (sampling, learning rate, checkpoints, evaluation, records) and
runs one SecAgg+ session per round in its train step, with a legacy strategy of one round
(:class:`_OneRound`) that hands the workflow this round's instructions and takes back the sum.

What each platform puts in the sum (``client/secure_aggregation.py``): its noised gradient of
every shared tensor, in sorted name order — zeros for a tensor it did not step, or for all of
them in a round it is not due — then one indicator per tensor (1 when it stepped that tensor),
with weight 1. Flower returns the sum divided by the n platforms in it; the indicators say how
many platforms c_t sent tensor t, so the lockstep rule's mean over the senders is
``n · average_t / c_t``, and a tensor nobody sent is left as it is.

Quantisation (Flower's ``quantize``: clip to [−R, R], stochastic rounding to Q levels, sum
modulo M), with the noise already in the value (the platform's Opacus step adds it before):

- R (:func:`value_bound`) = (C / s) · (2 + 8 σ̄): a released coordinate is (S_i + Z_i) / (B s)
  with |S_i| ≤ |batch| · C and Z_i ~ N(0, σ²C²); R holds it unless the Poisson batch passed
  twice its expectation or the noise eight standard deviations (B ≥ 1), and a coordinate
  beyond R is clipped — post-processing of the DP output, counted by the platform
  (``secagg-clipped``). s is the smallest gradient scale of a shared tensor, σ̄ the largest σ
  a platform of this run can calibrate (:func:`noise_ceiling`).
- Q and M (:func:`quantisation`): M = 2³², Q the largest even number with n · Q < M. Every
  quantised coordinate and Flower's weight factor lie in [0, Q], so the sum of n never reaches
  M: overflow is impossible by construction, whatever the values.
- The bound: stochastic rounding moves a value by less than one level, 2R/Q, and a zero (Q/2,
  an integer) not at all, so each coordinate of the secure mean differs from the plain mean
  over its senders by less than Δ = 2R/Q (tests/test_secure_aggregation.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from scipy.special import log_ndtr

from client.popularity_prior import prior_mechanism
from common.config import RunConfig
from common.errors import ConfigError
from common.wire_log import RECEIVED, SENT, WIRE_LOG_FILE, append_records, message_record
from server.federation.strategy import LockstepStrategy, RoundFailed
from server.federation.waiting_grid import DelegatingGrid

log = logging.getLogger(__name__)

MODULUS = 2**32  # Flower's largest modulus_range
MIN_LEVELS = 2**16  # fewer quantisation levels would cost precision: refuse the federation
TAIL = 8.0  # noise standard deviations R covers
BATCH_SLACK = 2.0  # Poisson batch / its expectation R covers
TIMEOUT = 3600.0  # seconds a stage waits for replies, as Flower's start() for a plain round


@dataclass(frozen=True)
class Quantisation:
    """Flower's three SecAgg+ ranges for one round of n platforms."""

    clip_range: float  # R: values are clipped to [−R, R]
    levels: int  # Q: quantised to the integers 0..Q
    modulus: int  # M: the sum is taken modulo M
    platforms: int  # n

    @property
    def step(self) -> float:
        """Δ = 2R/Q: the most the secure mean of a coordinate differs from the plain one."""
        return 2 * self.clip_range / self.levels


def quantisation(clip_range: float, platforms: int, modulus: int = MODULUS) -> Quantisation:
    """Q, the largest even number with ``platforms`` · Q < M: no sum of n values in [0, Q]
    wraps around, and zero (R·Q/2R = Q/2) quantises exactly."""
    levels = 2 * ((modulus - 1) // (2 * platforms))
    if levels < MIN_LEVELS:
        raise ConfigError(
            f"secure aggregation of {platforms} platforms leaves {levels} quantisation levels "
            f"(fewer than {MIN_LEVELS}); use fewer platforms per round (federation.fraction_train)"
        )
    return Quantisation(clip_range, levels, modulus, platforms)


def _gaussian_mu(epsilon: float, delta: float) -> float:
    """μ of the μ-GDP mechanism that is exactly (ε, δ)-DP (Dong, Roth and Su 2022):
    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2), increasing in μ; found by bisection."""

    def delta_of(mu: float) -> float:
        first = math.exp(log_ndtr(-epsilon / mu + mu / 2))
        return first - math.exp(epsilon + log_ndtr(-epsilon / mu - mu / 2))

    low, high = 1e-8, 1e3
    for _ in range(200):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if delta_of(middle) < delta else (low, middle)
    return low


def noise_ceiling(config: RunConfig) -> float:
    """The largest σ any platform of this run can calibrate: the σ of ``federation.rounds``
    unsampled steps (q = 1; subsampling only lowers it, and a lockstep platform steps at most
    once a round) composed with the popularity prior, at the target ε — exact for q = 1, where
    T Gaussian steps compose to √T/σ-GDP. A fixed ``dp.noise_multiplier`` is that σ."""
    dp = config.dp
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    mu = _gaussian_mu(min(dp.target_epsilon, dp.budget), dp.delta)
    prior = 0.0
    if config.model.scorer == "item_tower" and config.prior.enabled:
        prior = 1 / prior_mechanism(config.prior.noise_multiplier, dp.unit).noise_multiplier
    if mu <= prior:
        raise ConfigError("dp.target_epsilon leaves nothing for training after the prior")
    return math.sqrt(config.federation.rounds / (mu**2 - prior**2))


def value_bound(config: RunConfig, names: Sequence[str]) -> float:
    """R = (C / s)(2 + 8σ̄) (module docstring); s: the smallest gradient scale applied to a
    shared tensor (a scale below 1 enlarges the released gradient by 1/s)."""
    scales = [
        scale for key, scale in config.dp.gradient_scales.items() if any(key in n for n in names)
    ]
    smallest = min([1.0, *scales])
    return config.dp.max_grad_norm / smallest * (BATCH_SLACK + TAIL * noise_ceiling(config))


class _OneRound(Strategy):
    """The legacy strategy SecAggPlusWorkflow drives, for one round: it hands out the round's
    instructions and keeps what the workflow aggregated (every result then carries the mean
    of all vectors in the sum as its parameters)."""

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Any, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return self.instructions

    def aggregate_fit(
        self, server_round: int, results: Any, failures: Any
    ) -> tuple[None, dict[str, Any]]:
        self.results = list(results)
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: Any, failures: Any
    ) -> tuple[None, dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        return None


class LoggedGrid(DelegatingGrid):
    """The grid SecAgg+ talks through: every message of its stages goes to the run's wire log
    (the server receives masked vectors only), and each platform's error is kept by node."""

    def __init__(self, grid: Grid, wire_log: Any, server_round: int, names: Sequence[str]):
        super().__init__(grid)
        self.wire_log = wire_log
        self.server_round = server_round
        self.names = list(names)
        self.errors: dict[int, tuple[int, str]] = {}  # node → (code, reason)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self._log(SENT, messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for reply in replies:
            if reply.has_error():
                node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                self.errors.setdefault(node, (reply.error.code, reply.error.reason))
        self._log(RECEIVED, replies)
        return replies

    def _log(self, direction: str, messages: list[Message]) -> None:
        records = [
            message_record("server", direction, m, self.server_round, None, self.names)
            for m in messages
        ]
        append_records(self.wire_log, records)


@dataclass
class SecureRound:
    """What one SecAgg+ session left: the mean over the platforms in the sum (None if the
    session halted), their replies, and the platforms that failed."""

    mean: list[np.ndarray] | None
    results: list[tuple[ClientProxy, FitRes]]
    errors: dict[int, tuple[int, str]]
    sampled: int
    threshold: int
    ranges: Quantisation
    events: list[dict[str, object]] = field(default_factory=list)


class _SessionWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, its session narrowed to the platforms that completed the key
    exchange. Flower 1.41 keeps a platform lost before it shared its keys among the session's
    platforms and, at unmasking, asks the others for key shares of it they never received:
    every platform's unmasking then fails and the round with it (tests/test_secure_aggregation.py,
    a platform lost at key setup). Such a platform masked nothing, so nothing of it needs
    rebuilding: it leaves the session as if never sampled."""

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        done = super().share_keys_stage(grid, context, state)
        kept = set(state.active_node_ids)
        state.sampled_node_ids = kept
        state.nid_to_neighbours = {
            node: neighbours & kept
            for node, neighbours in state.nid_to_neighbours.items()
            if node in kept
        }
        return done and self._check_threshold(state)


def reconstruction_threshold(platforms: int) -> int:
    """t: shares needed to rebuild a platform's secrets, a majority of the sampled platforms
    (at least 2); up to n − t may drop out of a round, and no t − 1 of them can unmask."""
    return max(2, platforms // 2 + 1)


def run_secure_round(
    grid: Grid, instructions: list[tuple[int, FitIns]], server_round: int, ranges: Quantisation
) -> SecureRound:
    """One SecAgg+ session through Flower's workflow: the mean of the platforms' vectors."""
    sampled = len(instructions)
    threshold = reconstruction_threshold(sampled)
    proxies = [(GridClientProxy(node, grid, 0), fitins) for node, fitins in instructions]
    strategy = _OneRound(proxies)
    context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {Key.CURRENT_ROUND: server_round}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = _SessionWorkflow(
        num_shares=1.0,  # every platform holds a share of every other's secrets
        reconstruction_threshold=threshold / sampled,
        max_weight=1.0,
        clipping_range=ranges.clip_range,
        quantization_range=ranges.levels,
        modulus_range=ranges.modulus,
        timeout=TIMEOUT,
    )
    workflow(grid, context)
    results = strategy.results or []
    mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
    errors = grid.errors if isinstance(grid, LoggedGrid) else {}
    return SecureRound(mean, results, errors, sampled, threshold, ranges)


def lockstep_means(secure: SecureRound, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The lockstep rule's mean over the platforms that sent each tensor, from the mean over
    all n in the sum and the indicators: ``n · average_t / c_t``; a tensor nobody sent is
    absent (left as it is by the server's optimiser)."""
    assert secure.mean is not None
    n = len(secure.results)
    values, indicators = secure.mean[: len(names)], secure.mean[len(names) :]
    means = {}
    for name, value, indicator in zip(names, values, indicators, strict=True):
        senders = round(n * float(np.ravel(indicator)[0]))
        if senders > 0:
            means[name] = (value * (n / senders)).astype(np.float32)
    return means


class SecureLockstepStrategy(LockstepStrategy):
    """The lockstep schedule with the train replies summed under SecAgg+.

    ``configure_train`` runs the round's whole SecAgg+ session through the grid and returns no
    message for Flower's ``start`` to send; ``aggregate_train`` then steps the server's AdamW
    on the mean the session revealed. A session that halts (fewer platforms left than the
    reconstruction threshold) fails the round like a round no platform trained.
    """

    def __init__(self, bound: float, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bound = bound
        self.secure: SecureRound | None = None

    @property
    def names(self) -> list[str]:
        return sorted(self.optimizer.tensors)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        absolute = self._round(server_round)
        config = ConfigRecord({**config, "learning-rate": float(self.learning_rate(absolute))})
        self.await_nodes(grid, server_round)
        messages = list(FedAvg.configure_train(self, server_round, arrays, config, grid))
        config["server-round"] = absolute
        self.sent = arrays
        self._log_model()
        vector = ndarrays_to_parameters([arrays[name].numpy() for name in self.names])
        instructions = [(m.metadata.dst_node_id, FitIns(vector, dict(config))) for m in messages]
        if len(instructions) < 2:  # SecAgg+ sums two vectors at least
            reason = f"round {absolute}: secure aggregation needs 2 platforms, {len(messages)} came"
            self.record.append([{"event": "round-failed", "round": absolute, "reason": reason}])
            raise RoundFailed(reason)
        ranges = quantisation(self.bound, len(instructions))
        logged = LoggedGrid(grid, self.record.root / WIRE_LOG_FILE, absolute, self.names)
        self.secure = run_secure_round(logged, instructions, absolute, ranges)
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        secure, absolute = self.secure, self._round(server_round)
        assert secure is not None
        events = self._events(absolute, secure)
        self._progress("train", absolute, events)
        self.record.append(events)
        if secure.mean is None:
            left = len(secure.results) or secure.sampled - len(secure.errors)
            reason = (
                f"round {absolute}: secure aggregation halted: {left} of {secure.sampled} "
                f"platforms left, {secure.threshold} needed to unmask"
            )
            reasons = sorted({why for _, why in secure.errors.values()})
            if reasons:
                reason += f": {reasons[0]}"
            self.record.append([{"event": "round-failed", "round": absolute, "reason": reason}])
            raise RoundFailed(reason)
        means = lockstep_means(secure, self.names)
        rate = float(self.learning_rate(absolute))
        stepped = self.optimizer.step([means], rate) if means else self.optimizer.arrays
        stepping = sum(1 for e in events if e["status"] == "ok" and e.get("local-steps"))
        metrics = MetricRecord({"platforms-stepped": stepping})
        return ArrayRecord({name: Array(value) for name, value in stepped.items()}), metrics

    def _events(self, server_round: int, secure: SecureRound) -> list[dict[str, object]]:
        """One metrics.jsonl line per platform: its plaintext metrics (sent beside the masked
        vector), or its error."""
        events: list[dict[str, object]] = []
        summed = set()
        for proxy, fitres in secure.results:
            metrics = dict(fitres.metrics)
            platform = str(metrics.pop("platform", ""))
            node = int(proxy.node_id)
            summed.add(node)
            self.platforms[node] = platform
            events.append(
                {"event": "train", "round": server_round, "node": node, "status": "ok"}
                | {"platform": platform, **metrics, "secagg-step": secure.ranges.step}
            )
        for node, (code, reason) in sorted(secure.errors.items()):
            if node not in summed:
                events.append(
                    {"event": "train", "round": server_round, "node": node, "status": "error"}
                    | {"code": code, "reason": reason}
                )
        return events
