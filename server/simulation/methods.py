"""Every method ``fedfuse compare`` and ``fedfuse tune`` know, by name.

A federated strategy (``fedavg``, ``ffa``, ``fedsa``: real ``fedfuse simulate`` runs) or an
ablation of one (``fedavg_text``: the text model alone, no prior and no private item factors;
``fedavg_shared``: no private item factors; ``fedavg_user``: user-level DP; likewise ``ffa_…``
and ``fedsa_…``); the yardsticks ``popularity``, ``local``, ``centralized`` and ``prior``
(server/simulation/baselines.py); the non-private in-house models BPR and SASRec, per platform
or pooled (server/simulation/bpr.py, sasrec.py); and the platform's in-house model alone and
blended with a DP model (server/simulation/joining.py).
"""

from __future__ import annotations

from typing import Any

from server.simulation.bpr import bpr_local, bpr_pooled
from server.simulation.joining import BLENDS, INHOUSE
from server.simulation.sasrec import sasrec_local, sasrec_pooled

FEDERATED = ("fedavg", "ffa", "fedsa")
# Ablations of a federation, named STRATEGY_ABLATION (``fedavg_text``): the settings changed.
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    # the text model alone: no prior, nothing private but the mixing weights
    "text": {"prior": {"enabled": False}, "model": {"private_factors": 0}},
    "shared": {"model": {"private_factors": 0}},  # no private item factors
    "user": {"dp": {"unit": "user"}},  # user-level DP instead of per example
}
VARIANTS = {
    f"{strategy}_{name}": (strategy, changes)
    for strategy in FEDERATED
    for name, changes in ABLATIONS.items()
}
DEFAULT_METHODS = ("popularity", "local", "centralized", *FEDERATED)  # a level without names
# non-private in-house baselines, early-stopped on valid ([baselines]); they ignore the level
NONPRIVATE = {
    "bpr_local": bpr_local,
    "bpr_pooled": bpr_pooled,
    "sasrec_local": sasrec_local,
    "sasrec_pooled": sasrec_pooled,
}
METHODS = (*DEFAULT_METHODS, "prior", *VARIANTS, *NONPRIVATE, INHOUSE, *BLENDS)
# methods whose result does not depend on the privacy level: tuned and frozen once, at inf
LEVELLESS = ("popularity", *NONPRIVATE, INHOUSE)
# Yardsticks a federated cell's gain is stated against, with its 95 % interval (intervals.py)
YARDSTICKS = ("local", "popularity", "bpr_local", "sasrec_local", INHOUSE, "inhouse+local")
