"""Parse a JSON document that must be one object: the header payload and the
control messages come from outside, and both refuse anything else with
their own error class and one line."""

from __future__ import annotations

import json

from .errors import EvscryptError


def load_object(raw: bytes, error: type[EvscryptError], what: str) -> dict:
    """``raw`` as UTF-8 JSON that is an object, else ``error`` naming ``what``."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise error(f"{what} is not valid JSON")
    if not isinstance(obj, dict):
        raise error(f"{what} is not a JSON object")
    return obj
