"""A platform folder's on-disk format: file and column names, and the limits on values.

A platform is a folder holding an interactions file and an items file, each as CSV, TSV or
JSON Lines (``interactions.csv|tsv|jsonl``, ``items.csv|tsv|jsonl``), and optionally a
``carried/`` subfolder in the same format (see ``common/platform_data.py``).
"""

FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None}
INTERACTIONS = "interactions"
ITEMS = "items"
CARRIED = "carried"  # a platform's subfolder: its users' histories from other platforms
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "title")
MAX_TEXT_CHARS = 1000
MAX_ID_CHARS = 256
