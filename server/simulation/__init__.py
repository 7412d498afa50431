"""``fedfuse simulate`` (Flower's Simulation Engine on one machine) and ``fedfuse compare``
(federated strategies against local, centralized, popularity, the DP prior and BPR)."""
