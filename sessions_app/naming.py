"""Readable session keys generated from names."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

from slugify import slugify

from .schemas import KEY_MAX_LENGTH

BASE_MAX_LENGTH = 48
FALLBACK_BASE = "session"
ATTEMPTS = 12


def key_candidates(name: str) -> Iterator[str]:
    """The slug of ``name`` (transliterated to ASCII), then the slug with a random suffix.

    Every candidate matches the key pattern. The suffix grows with the attempts,
    so even a crowded prefix yields a free key within a few tries.
    """
    base = slugify(name, max_length=BASE_MAX_LENGTH, word_boundary=True) or FALLBACK_BASE
    yield base
    for attempt in range(1, ATTEMPTS):
        suffix = secrets.token_hex(3 + attempt // 4)
        yield f"{base}-{suffix}"[-KEY_MAX_LENGTH:]
