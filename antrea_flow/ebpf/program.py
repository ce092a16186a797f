"""Compiling and loading the per-flow packet counter (bpf/flows.c) with BCC, once at start.

BCC compiles against the kernel headers it finds at /lib/modules/$(uname -r)/build (and
`source`, Debian's other half), or BCC_KERNEL_SOURCE; `make setup` links Debian's generic
headers there. Whatever stops it (no bcc module, no headers, no BTF, no CAP_BPF, a kernel
without a feature) is a LoadError with one line saying what and what to do.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("flows.c")  # bpf/flows.c, shipped inside the package

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


class LoadError(Exception):
    """The counter could not be loaded; the message says why and what to do."""


@dataclass
class CounterProgram:
    """The loaded program: its two functions and its maps. `bpf` (BCC's object) owns them;
    closing it unloads everything."""

    bpf: Any
    ingress_fd: int
    egress_fd: int
    flows_fd: int
    max_flows: int
    cpus: int  # possible CPUs: the per-CPU values of one entry

    def close(self) -> None:
        self.bpf.cleanup()


def _headers() -> str | None:
    """Where BCC will find kernel headers, or None."""
    explicit = os.environ.get("BCC_KERNEL_SOURCE")
    if explicit:
        return explicit if os.path.isdir(explicit) else None
    build = f"/lib/modules/{os.uname().release}/build"
    return build if os.path.isdir(build) else None


def load(max_flows: int, fallback_pages: int = 64) -> CounterProgram:
    """Compile and load flows.c sized for `max_flows` entries (blocking: about a second)."""
    try:
        from bcc import BPF
    except ImportError:
        raise LoadError(
            "the bcc Python module is missing (Debian: apt-get install python3-bpfcc; "
            "`make setup` installs it and links it into the venv)"
        ) from None
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        raise LoadError("this kernel has no BTF (/sys/kernel/btf/vmlinux): CONFIG_DEBUG_INFO_BTF")
    headers = _headers()
    if headers is None:
        raise LoadError(
            f"no kernel headers for BCC: /lib/modules/{os.uname().release}/build is missing "
            "and BCC_KERNEL_SOURCE is unset (`make setup` links Debian's linux-headers-amd64 "
            "there)"
        )
    cflags = [f"-DMAX_FLOWS={max_flows}", f"-DFALLBACK_PAGES={fallback_pages}", "-w"]
    try:
        bpf = BPF(src_file=str(SOURCE).encode(), cflags=cflags)
        ingress = bpf.load_func(b"flow_ingress", BPF.SCHED_CLS)
        egress = bpf.load_func(b"flow_egress", BPF.SCHED_CLS)
    except Exception as exc:  # BCC raises bare Exceptions, with the errno in the text
        text = " ".join(str(exc).split())
        code = ctypes.get_errno()
        if code in (errno.EPERM, errno.EACCES) or "Operation not permitted" in text:
            raise LoadError(
                "not allowed to load BPF programs: the agent needs CAP_BPF and CAP_PERFMON "
                "(or CAP_SYS_ADMIN), as in build/yamls/antrea-flow-agent.yml"
            ) from None
        raise LoadError(
            f"BCC could not compile or load {SOURCE.name} with {headers}: {text}"
        ) from None
    # LLVM's memory for the compiled module is no longer needed (tens of MB).
    bpf.free_bcc_memory()
    flows = bpf[b"flows"]
    cpus = len(flows.Leaf()) if hasattr(flows.Leaf, "_length_") else 1
    return CounterProgram(bpf, ingress.fd, egress.fd, flows.map_fd, max_flows, cpus)
