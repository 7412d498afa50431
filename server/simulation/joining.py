"""Does joining pay? The platform's in-house model alone, and blended with a DP model.

- ``inhouse``: what a platform already runs, non-private, on its own data: per platform the
  better on validation NDCG@10 of its own BPR and its own SASRec (``bpr_local``,
  ``sasrec_local``), as a platform would choose its production model. When people bring
  their histories from elsewhere (``model.carried_history``), its own SASRec over those too
  (``sasrec_carried``) is a third candidate: what the platform gets from them without joining.
- ``inhouse+fedavg``: that model blended (server/simulation/blend.py, the weight fitted on the
  platform's validation cases) with the federation's DP model of the same level and run — the
  ``fedavg`` cell's run folder, trained (or reused) exactly as that cell trains it.
- ``inhouse+local``: the same blend with the DP model the platform trains alone (the
  ``local`` cell's tensors), so the difference between the two blends is what the federation
  adds beyond the platform's own DP training.

The in-house part is trained after the federation, on the platform alone, and never leaves
it: the released DP tensors and their ledgers are untouched by it. Its own users get no DP
from it (it is their data, fitted without noise, served to them).
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any

from client.ledger import LEDGER_FILE, PrivacyLedger
from client.platform_client import PlatformClient
from common.adapters import load_adapter, trainable_arrays
from common.atomic import atomic_write
from common.config import RunConfig
from common.dataset_summary import markdown_table
from common.platform_data import federation_platforms
from common.sharing import shared_scorer
from server.federation.run_record import RunRecord
from server.simulation.baselines import Arrays, Metrics, Scoring, evaluation_clients
from server.simulation.blend import BlendScorer, CaseScorer, fit_weight
from server.simulation.bpr import BPRScorer, Settings, train_bpr
from server.simulation.inhouse import TrainedStore, training_digest
from server.simulation.sasrec import SASRecScorer, SASRecSettings, fit, sasrec_carried_scorer

logger = logging.getLogger(__name__)

INHOUSE = "inhouse"
PARTNERS = ("fedavg", "local")  # the DP models a platform's in-house model is blended with
BLENDS = tuple(f"{INHOUSE}+{partner}" for partner in PARTNERS)

SIDE_BY_SIDE_FILE = "joining.md"  # the main job's in-house / federated / blend table
INHOUSE_MODELS = "inhouse_models"  # a comparison's trained in-house models, kept for its resume


def _key(config: RunConfig) -> str:
    """What the in-house models depend on: the data, the task, the baselines' settings and
    whether people's carried histories are read."""
    parts = (config.data, config.task, config.baselines)
    text = "".join(p.model_dump_json() for p in parts) + str(config.model.carried_history)
    return hashlib.sha256(text.encode()).hexdigest()


Candidate = tuple[str, CaseScorer, float]  # a platform's own model: name, scorer, valid NDCG@10
# one process, one training per configuration, platform and keeping folder (a folder named
# later still gets its models written, though they were trained earlier without it)
_trained: dict[tuple[str, str, Path | None], list[Candidate]] = {}


def _store(config: RunConfig, name: str, kept: Path | None) -> TrainedStore | None:
    """Where platform ``name``'s trained in-house models are kept under ``kept`` (none: not
    kept), named by a digest of its settings, its data files and the training code."""
    if kept is None:
        return None
    folder = dict(federation_platforms(config.data))[name]
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return TrainedStore(kept / name, training_digest(_key(config), name, files=files))


def inhouse_candidates(
    config: RunConfig, client: PlatformClient, kept: Path | None = None
) -> list[Candidate]:
    """The platform's own models, BPR and SASRec, each with its validation NDCG@10.
    Deterministic (seeded), so they are trained once per process and configuration, and
    once at all when ``kept`` names a folder to keep them in (:class:`TrainedStore`)."""
    name = client.identity.name
    key = (_key(config), name, kept)
    if key not in _trained:
        tasks = {name: client.task}
        store = _store(config, name, kept)
        bpr_settings = Settings.of(config.baselines, config.task.seed)
        bpr, data, bpr_record = train_bpr(tasks, False, bpr_settings, store)
        settings = SASRecSettings.of(config)
        sasrec, sequences, sasrec_record = fit(tasks, False, settings, None, store, "sasrec_local")
        _trained[key] = [
            ("bpr_local", BPRScorer(bpr, data), bpr_record["chosen"]["valid_ndcg@10"]),
            (
                "sasrec_local",
                SASRecScorer(sasrec, sequences.data.items, settings.max_len),
                sasrec_record["valid_ndcg@10"],
            ),
        ]
        if client.task.carried is not None:  # people brought their histories: use them too
            carried, record = sasrec_carried_scorer(client.task, config, store)
            _trained[key].append(("sasrec_carried", carried, record["valid_ndcg@10"]))
    return _trained[key]


def inhouse_model(config: RunConfig, client: PlatformClient, kept: Path | None = None) -> Candidate:
    """The platform's better own model on validation, as it would choose its production
    model: (its name, scorer, valid NDCG@10)."""
    return max(inhouse_candidates(config, client, kept), key=lambda c: c[2])


def inhouse(
    config: RunConfig, clients: list[PlatformClient], scoring: Scoring, kept: Path | None = None
) -> tuple[dict[str, Metrics], dict[str, Any]]:
    """Each platform's in-house model alone; metrics, which model each platform chose, and
    every candidate's own metrics on the scored split (the better of the two, looked up
    after the fact, is the yardstick a skeptical platform would name). ``kept``: the folder
    that keeps the trained models for a later command (:func:`inhouse_candidates`)."""
    metrics, chosen = {}, {}
    for client in clients:
        method, scorer, valid = inhouse_model(config, client, kept)
        name = client.identity.name
        logger.info("%s: in-house model %s (valid NDCG@10 %.4f)", name, method, valid)
        chosen[name] = {"model": method, "valid_ndcg@10": valid}
        metrics[name] = scoring.score(client, scorer)  # type: ignore[arg-type]
        for other, candidate, other_valid in inhouse_candidates(config, client, kept):
            scored = metrics[name] if other == method else scoring.score(client, candidate)  # type: ignore[arg-type]
            chosen[name][other] = {k: v for k, v in scored.items() if k != "cases"} | {
                "valid_ndcg@10": other_valid
            }
    return metrics, {"inhouse": chosen}


def blend(
    config: RunConfig,
    clients: list[PlatformClient],
    arrays: dict[str, Arrays],
    scoring: Scoring,
    kept: Path | None = None,
) -> tuple[dict[str, Metrics], dict[str, Any]]:
    """Each platform's in-house model blended with its DP model (``arrays`` per platform, its
    own private part loaded from its state): the weight fitted on validation, then scored."""
    metrics, record = {}, {}
    for client in clients:
        method, own, valid = inhouse_model(config, client, kept)
        partner = client.loaded_scorer(arrays[client.identity.name])
        cases = client.task.ranking("valid")
        weight, curve = fit_weight(own, partner, client.featurizer, cases)  # type: ignore[arg-type]
        name = client.identity.name
        record[name] = {
            "inhouse": method,
            "inhouse_valid_ndcg@10": valid,
            "weight": weight,
            "valid_ndcg@10": curve[weight],
            "dp_alone_valid_ndcg@10": curve[0.0],
        }
        logger.info(
            "%s: blend weight %.2f on %s (valid NDCG@10 %.4f)", name, weight, method, curve[weight]
        )
        metrics[name] = scoring.score(client, BlendScorer(own, partner, weight))  # type: ignore[arg-type]
    return metrics, {"blend": record}


def spent(config: RunConfig, state: Path, names: list[str]) -> dict[str, float]:
    """Each platform's ε from its ledger under ``state`` (∞ without DP)."""
    if not config.dp.enabled:
        return dict.fromkeys(names, math.inf)
    return {name: PrivacyLedger.load(state / name / LEDGER_FILE).spent() for name in names}


def final_model(
    run_dir: Path,
) -> tuple[RunConfig, list[PlatformClient], Arrays, dict[str, float]]:
    """A finished run's configuration, evaluation clients (on its platform state), final
    shared tensors and each platform's ε."""
    config = RunRecord(run_dir).run_config()
    state = Path(config.dp.state_dir)
    clients = evaluation_clients(config, state)
    scorer, _ = shared_scorer(config.model, config.lora, config.federation.strategy)
    load_adapter(scorer, RunRecord(run_dir).adapter_dir(config.federation.rounds))
    epsilons = spent(config, state, [c.identity.name for c in clients])
    return config, clients, trainable_arrays(scorer, clients[0].shared), epsilons


def side_by_side(run_dir: Path, split: str = "test") -> str:
    """The main job's answer to "does joining pay?": per platform, NDCG@10 on ``split`` of the
    in-house model alone, the federation's DP model alone and their blend (weight fitted on
    validation), written to ``RUN/joining.md``; returns the Markdown."""
    config, clients, arrays, epsilons = final_model(run_dir)
    scoring = Scoring(split)  # type: ignore[arg-type]
    fused = scoring.adapters(clients, arrays)
    own, chosen = inhouse(config, clients, scoring)
    mixed, fitted = blend(config, clients, {c.identity.name: arrays for c in clients}, scoring)
    rows, means = [], {"own": [], "fused": [], "mixed": []}
    for name in sorted(fused):
        values = {"own": own[name], "fused": fused[name], "mixed": mixed[name]}
        for key, metrics in values.items():
            means[key].append(metrics["ndcg@10"])
        rows.append(
            [
                name,
                f"{own[name]['ndcg@10']:.4f} ({chosen['inhouse'][name]['model']})",
                f"{fused[name]['ndcg@10']:.4f}",
                f"{mixed[name]['ndcg@10']:.4f} (w = {fitted['blend'][name]['weight']:.2f})",
                f"{epsilons[name]:.3f}",
            ]
        )
    rows.append(["**mean**", *(f"**{sum(v) / len(v):.4f}**" for v in means.values()), ""])
    text = "\n".join(
        [
            f"## Does joining pay? NDCG@10 on the {split} split, all users\n",
            markdown_table(
                ["platform", "in-house alone", "federated DP model", "in-house + federated", "ε"],
                rows,
            ),
            "",
            "In-house: the platform's own non-private BPR or SASRec, whichever validates better; "
            "the blend's weight w is the in-house model's share, fitted on validation.",
        ]
    )
    atomic_write(run_dir / SIDE_BY_SIDE_FILE, text + "\n")
    return text
