"""The helper process that compiles and loads bpf/flows.c with BCC, hands the program's
and maps' file descriptors to the agent over a Unix socket, and exits.

BCC links LLVM: compiling leaves well over a hundred megabytes in a process (file-backed
and heap). Doing it here keeps the agent's own footprint that of Python and its buffers;
the kernel objects live as long as the agent holds their descriptors.

    python -m antrea_flow.ebpf.compile SOCKET_FD MAX_FLOWS FALLBACK_PAGES
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("flows.c")  # bpf/flows.c, shipped inside the package
# The descriptors handed over, in this order.
HANDED = ("flow_ingress", "flow_egress", "flows", "counted_ifaces", "fallback", "lost")


def _headers() -> str | None:
    """Where BCC will find kernel headers, or None."""
    explicit = os.environ.get("BCC_KERNEL_SOURCE")
    if explicit:
        return explicit if os.path.isdir(explicit) else None
    build = f"/lib/modules/{os.uname().release}/build"
    return build if os.path.isdir(build) else None


def build(max_flows: int, fallback_pages: int) -> tuple[list[int], dict]:
    """(descriptors in HANDED order, facts) or raise RuntimeError with the reason."""
    try:
        from bcc import BPF
    except ImportError:
        raise RuntimeError(
            "the bcc Python module is missing (Debian: apt-get install python3-bpfcc; "
            "`make setup` installs it and links it into the venv)"
        ) from None
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        raise RuntimeError(
            "this kernel has no BTF (/sys/kernel/btf/vmlinux): CONFIG_DEBUG_INFO_BTF"
        )
    headers = _headers()
    if headers is None:
        raise RuntimeError(
            f"no kernel headers for BCC: /lib/modules/{os.uname().release}/build is missing "
            "and BCC_KERNEL_SOURCE is unset (`make setup` links Debian's linux-headers-amd64 "
            "there)"
        )
    cflags = [f"-DMAX_FLOWS={max_flows}", f"-DFALLBACK_PAGES={fallback_pages}", "-w"]
    try:
        bpf = BPF(src_file=str(SOURCE).encode(), cflags=cflags)
        ingress = bpf.load_func(b"flow_ingress", BPF.SCHED_CLS)
        egress = bpf.load_func(b"flow_egress", BPF.SCHED_CLS)
    except Exception as exc:  # BCC raises bare Exceptions
        text = " ".join(str(exc).split())
        if ctypes.get_errno() in (errno.EPERM, errno.EACCES) or "not permitted" in text:
            raise RuntimeError(
                "not allowed to load BPF programs: the agent needs CAP_BPF and CAP_PERFMON "
                "(or CAP_SYS_ADMIN), as in build/yamls/antrea-flow-agent.yml"
            ) from None
        raise RuntimeError(
            f"BCC could not compile or load {SOURCE.name} with {headers}: {text}"
        ) from None
    maps = [bpf[name.encode()].map_fd for name in HANDED[2:]]
    facts = {"fallback_size": fallback_pages * os.sysconf("SC_PAGE_SIZE")}
    return [ingress.fd, egress.fd, *maps], facts


def main() -> int:
    channel = socket.socket(fileno=int(sys.argv[1]))
    try:
        descriptors, facts = build(int(sys.argv[2]), int(sys.argv[3]))
    except RuntimeError as exc:
        channel.sendall(json.dumps({"error": str(exc)}).encode())
        return 1
    socket.send_fds(channel, [json.dumps(facts).encode()], descriptors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
