"""``fedfuse recommend`` and ``fedfuse serve``: a finished run's recommendations for one
platform, explained (``recommender.py`` is the front door)."""
