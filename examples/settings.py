"""Hyperparameters from the environment, for the examples run as worker plugins.

A logic started by `psworker --logic examples.module:Class` gets no arguments, so
each example reads what it was not given from `STREAMPS_<PREFIX>_<NAME>`
(PA, LR, MF, SKETCH); an unset or empty variable means the default.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def env(prefix: str, name: str, cast: Callable[[str], Any], default: Any) -> Any:
    """`cast(STREAMPS_<prefix>_<name>)`, or `default` when the variable is unset or empty."""
    text = os.environ.get(f"STREAMPS_{prefix}_{name}")
    return default if text is None or text == "" else cast(text)


def flag(text: str) -> bool:
    """A boolean setting: 1, true, yes or on (any case) are true, anything else false."""
    return text.strip().lower() in ("1", "true", "yes", "on")


def label(text: str) -> Any:
    """A class label: an int when the text is one, else the text."""
    try:
        return int(text)
    except ValueError:
        return text


def labels(text: str) -> tuple[Any, ...]:
    """Comma-separated class labels: '0,1' -> (0, 1), 'cat,dog' -> ('cat', 'dog')."""
    return tuple(label(part.strip()) for part in text.split(",") if part.strip())
