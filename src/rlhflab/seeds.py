"""Seeds derived from a run's seed and names: independent streams that do not depend on the
order in which they are asked for (prompt order, minibatch shuffles, one seed per sampled
row, the world's streams)."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object, bits: int = 63) -> int:
    """A ``bits``-bit seed from the SHA-256 of ``parts`` joined by "/".

    63 bits (the default) fits ``torch.Generator.manual_seed`` and a signed int64."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**bits - 1)
