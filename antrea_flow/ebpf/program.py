"""Loading the per-flow packet counter (bpf/flows.c), once at start, and the layouts of
its maps.

The compiling is done by a helper process (compile.py: BCC and LLVM never enter the
agent's memory), which hands back the file descriptors of the two programs and the maps.
BCC compiles against the kernel headers it finds at /lib/modules/$(uname -r)/build (and
`source`, Debian's other half) or BCC_KERNEL_SOURCE; `make setup` links Debian's generic
headers there. Whatever stops it (no bcc module, no headers, no BTF, no CAP_BPF) is a
LoadError with one line saying what and what to do.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

from .bpfsys import possible_cpus
from .compile import HANDED

# struct flow_key and struct flow_counts of flows.c (host byte order).
KEY_DTYPE = np.dtype(
    [("src", "u1", 16), ("dst", "u1", 16), ("sport", "=u2"), ("dport", "=u2"),
     ("proto", "u1"), ("version", "u1"), ("fragment", "u1"), ("pad", "u1")]
)  # fmt: skip
COUNTS_DTYPE = np.dtype(
    [("packets", "=u8"), ("bytes", "=u8"), ("rev_packets", "=u8"), ("rev_bytes", "=u8"),
     ("first_ns", "=u8"), ("last_ns", "=u8"), ("flags", "=u4"), ("pad", "=u4")]
)  # fmt: skip
# struct fallback_record.
FALLBACK_DTYPE = np.dtype(
    [("key", KEY_DTYPE), ("ns", "=u8"), ("bytes", "=u4"), ("flags", "=u4"),
     ("reverse", "u1"), ("pad", "u1", 3), ("error", "=i4")]
)  # fmt: skip
COMPILE_TIMEOUT = 60.0


class LoadError(Exception):
    """The counter could not be loaded; the message says why and what to do."""


@dataclass
class CounterProgram:
    """The loaded program: descriptors of its two functions and its maps. Closing them
    unloads it (once nothing else, such as a TC filter, holds the programs)."""

    ingress_fd: int
    egress_fd: int
    flows_fd: int
    counted_fd: int  # counted_ifaces: interface index (u32) -> 1 (u8)
    fallback_fd: int  # the ring buffer
    fallback_size: int
    lost_fd: int  # per-CPU u64 of packets that found no room anywhere
    max_flows: int
    cpus: int  # possible CPUs: the per-CPU values of one entry

    def close(self) -> None:
        for fd in (self.ingress_fd, self.egress_fd, self.flows_fd, self.counted_fd,
                   self.fallback_fd, self.lost_fd):  # fmt: skip
            os.close(fd)


def load(max_flows: int, fallback_pages: int = 64) -> CounterProgram:
    """Compile and load flows.c sized for `max_flows` entries (blocking: about a second)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        try:
            helper = subprocess.Popen(
                [sys.executable, "-m", "antrea_flow.ebpf.compile", str(theirs.fileno()),
                 str(max_flows), str(fallback_pages)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
        except OSError as exc:
            raise LoadError(f"cannot start the compiler helper: {exc}") from None
        theirs.close()
        ours.settimeout(COMPILE_TIMEOUT)
        try:
            message, descriptors, _, _ = socket.recv_fds(ours, 65536, len(HANDED))
        except (OSError, TimeoutError) as exc:
            helper.kill()
            raise LoadError(f"the compiler helper did not answer: {exc}") from None
        finally:
            _, errors = helper.communicate(timeout=COMPILE_TIMEOUT)
    answer = json.loads(message or b"{}") if message else {}
    if "error" in answer or len(descriptors) != len(HANDED):
        for fd in descriptors:
            os.close(fd)
        last = (errors or b"").decode(errors="replace").strip().splitlines()[-1:]
        reason = answer.get("error") or (last[0] if last else "no reason given")
        raise LoadError(reason)
    ingress, egress, flows, counted, fallback, lost = descriptors
    return CounterProgram(
        ingress, egress, flows, counted, fallback, answer["fallback_size"], lost,
        max_flows, possible_cpus(),
    )  # fmt: skip
