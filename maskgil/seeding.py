"""Seeds derived from a key by hashing: independent random streams that need no saved state
(a training step's masks and dropout, an evaluation chunk's samples, a rank's crops)."""
from __future__ import annotations

import hashlib


def hashed_seed(key: str) -> int:
    """A 63-bit seed from `key` (SHA-256): the same key always gives it, other keys unrelated ones."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)
