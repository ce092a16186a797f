"""Logging helpers: report a recurring condition once per key instead of once per event."""

from __future__ import annotations

import logging
from collections.abc import Hashable


class LogOnce:
    """Logs the first occurrence of each key; later ones go to DEBUG. Memory is bounded."""

    def __init__(self, logger: logging.Logger, max_keys: int = 4096):
        self._logger = logger
        self._seen: set[Hashable] = set()
        self._max_keys = max_keys

    def __call__(self, key: Hashable, level: int, msg: str, *args: object) -> bool:
        """Log `msg`; True when it was the first time for `key`."""
        first = key not in self._seen
        if first:
            if len(self._seen) >= self._max_keys:
                self._seen.clear()
            self._seen.add(key)
        self._logger.log(level if first else logging.DEBUG, msg, *args)
        return first
