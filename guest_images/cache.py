"""Where provisioned artefacts live: one cache per user, shared by every clone.

``$VSMMU_CACHE`` wins; otherwise ``$XDG_CACHE_HOME/vsmmu`` (``~/.cache/vsmmu``).
Entries are keyed by content (package versions, content hashes), so a fresh
clone on a machine that has provisioned once reuses what is there, and several
clones may use the cache at once (the apt root is file-locked).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "VSMMU_CACHE"


def default_cache() -> Path:
    """The per-user cache directory (not created here)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(xdg).expanduser() / "vsmmu").resolve()
