"""Seeds of units of work: each a function of the run's seed and the unit's names, never of the order
units run in, nor of any text meant for people (log lines, labels)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence


def derive_seed(seed: int, *parts: str) -> int:
    """A seed for one unit of work that does not depend on the order units run in."""
    digest = hashlib.sha256("/".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seeded_subset(items: Sequence, limit: int | None, seed: int) -> list:
    """At most `limit` of `items`, drawn at random under `seed`, in their original order."""
    if limit is None or len(items) <= limit:
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]
