"""The Flower ServerApp: rounds, the aggregation rule (``strategy.py``), the run folder and its
report. Used by simulation and deployment alike."""
