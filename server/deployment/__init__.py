"""``fedfuse deploy``: a SuperLink and one SuperNode per platform, TLS and node keys."""
