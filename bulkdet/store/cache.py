"""Where bulkdet keeps what it makes once and reuses: prepared models (models/), TensorRT engines (tensorrt/).

Its own module, below both the model tools and the engines, so that either can find the cache
without importing the other.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(explicit: Path | None = None) -> Path:
    """--cache-dir, else $BULKDET_CACHE_DIR, else $XDG_CACHE_HOME/bulkdet (~/.cache/bulkdet)."""
    if explicit:
        return Path(explicit)
    if os.environ.get("BULKDET_CACHE_DIR"):
        return Path(os.environ["BULKDET_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bulkdet"
