"""What a record key is, and readable session keys generated from names."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

from slugify import slugify

# Agent and session keys: 1 to 64 of these characters (the contract's pattern).
KEY_CHARS = "0-9a-zA-Z_-"
KEY_MAX_LENGTH = 64
KEY_PATTERN = rf"^[{KEY_CHARS}]+$"
# API key ids: this prefix, then key characters.
KEY_ID_PREFIX = "ak_"
# Event ids: this prefix, then letters and digits, at most 64 characters in all.
EVENT_ID_PREFIX = "aev_"
EVENT_ID_MAX_LENGTH = 64
EVENT_ID_PATTERN = rf"^{EVENT_ID_PREFIX}[0-9a-zA-Z]+$"


def new_event_id() -> str:
    """A fresh event id: the prefix and 24 random hexadecimal digits (96 bits)."""
    return EVENT_ID_PREFIX + secrets.token_hex(12)


def is_event_id(value: str) -> bool:
    return (
        len(value) <= EVENT_ID_MAX_LENGTH
        and value.startswith(EVENT_ID_PREFIX)
        and len(value) > len(EVENT_ID_PREFIX)
        and value[len(EVENT_ID_PREFIX) :].isascii()
        and value[len(EVENT_ID_PREFIX) :].isalnum()
    )


# Vectara's OpenAPI document bounds agent and session keys to 50 characters;
# keys the service generates stay within it, suffix included (a key a client
# supplies may have the contract's 64).
GENERATED_MAX_LENGTH = 50
BASE_MAX_LENGTH = 48
FALLBACK_BASE = "session"
ATTEMPTS = 12


def key_candidates(name: str) -> Iterator[str]:
    """The slug of ``name`` (transliterated to ASCII), then the slug with a random suffix.

    Every candidate matches the key pattern and is at most
    ``GENERATED_MAX_LENGTH`` characters: the slug is cut, after a whole word
    where one fits, to leave room for the suffix. The suffix grows with
    the attempts, so even a crowded prefix yields a free key within a few tries.
    """
    base = slugify(name, max_length=BASE_MAX_LENGTH, word_boundary=True) or FALLBACK_BASE
    yield base
    for attempt in range(1, ATTEMPTS):
        suffix = secrets.token_hex(3 + attempt // 4)
        yield f"{cut(base, GENERATED_MAX_LENGTH - len(suffix) - 1)}-{suffix}"


def cut(slug: str, length: int) -> str:
    """The start of ``slug`` in at most ``length`` characters, after a whole word if one fits."""
    if len(slug) <= length:
        return slug
    start = slug[:length]
    if slug[length] != "-" and "-" in start:
        start = start.rpartition("-")[0]
    return start.rstrip("-")
