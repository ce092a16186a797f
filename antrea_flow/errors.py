"""Errors that are the user's to fix (bad flags, config keys or files): reported in one line."""

from __future__ import annotations

import errno
import os
import socket


class UsageError(ValueError):
    pass


def cannot_listen(setting: str, host: str, exc: OSError) -> UsageError:
    """A failed bind or resolve as one line naming the flag or key that set the address.

    `setting` names it with its value (e.g. "--address 0.0.0.0:4739:tcp" or "listenAddress
    ':4739'"); `host` is the address's host, for the hints. asyncio wraps bind errors in a
    sentence that repeats the address: the errno alone says what went wrong."""
    if isinstance(exc, socket.gaierror):
        return UsageError(f"{setting}: cannot resolve {host!r}: {exc.strerror}")
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno == errno.EADDRNOTAVAIL:
        reason += f" ({host} is not an address of this host)"
    return UsageError(f"{setting}: cannot listen: {reason}")
