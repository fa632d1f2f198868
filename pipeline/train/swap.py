"""One attribute of several objects replaced for a block: the fast path's way of changing a model only for a step."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable


@contextlib.contextmanager
def swapped(objects: Iterable[Any], name: str, value: Any):
    """Each object's `name` is `value` inside the block; each gets its own back after, also when the block raises."""
    objects = list(objects)
    saved = [getattr(o, name) for o in objects]
    for o in objects:
        setattr(o, name, value)
    try:
        yield
    finally:
        for o, v in zip(objects, saved):
            setattr(o, name, v)
