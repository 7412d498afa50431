"""FedFuse's server side, one folder per job: ``federation/`` (the Flower ServerApp, its
aggregation rule and run folder), ``simulation/`` (``fedfuse simulate`` and ``compare``),
``audit/`` (``fedfuse audit``), ``deployment/`` (``fedfuse deploy``), ``serving/``
(``fedfuse recommend`` and ``serve``); ``cli.py`` is the ``fedfuse`` command over all of
them. Imports run one way: common <- client <- server."""
