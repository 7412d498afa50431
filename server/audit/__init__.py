"""``fedfuse audit``: ε recomputed from the ledgers, wire contents listed, the canary bounds."""
