"""Network namespaces by name (as `ip netns` creates them): sockets and sysctls inside them.

A socket stays in the namespace it was created in, so the agent can run anywhere and poll
another namespace's conntrack: it enters the namespace on this thread only long enough to
create the socket or open the sysctl file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(name: str) -> str:
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"invalid network namespace name {name!r}")
    return os.path.join(NETNS_DIR, name)


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body with this thread in namespace `name` (None: stay where we are)."""
    if name is None:
        yield
        return
    target = os.open(netns_path(name), os.O_RDONLY)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(original)
    finally:
        os.close(target)
        os.close(original)


def socket_in(name: str | None, family: int, kind: int, proto: int = 0) -> socket.socket:
    with entered(name):
        return socket.socket(family, kind, proto)


def _sysctl_path(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def read_sysctl(name: str | None, key: str) -> str:
    with entered(name), open(_sysctl_path(key)) as f:
        return f.read().strip()


def write_sysctl(name: str | None, key: str, value: str) -> None:
    with entered(name), open(_sysctl_path(key), "w") as f:
        f.write(value)
