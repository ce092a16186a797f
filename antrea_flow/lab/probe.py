"""A TCP or UDP probe run inside a Pod: `python -m antrea_flow.lab.probe HOST PORT [udp]`.

Prints one word, what a client would see: `ok` (an HTTP answer, or for UDP a datagram
sent without an error), `refused` (TCP RST or ICMP unreachable), `timeout` (silently
dropped), or `error: ...`.
"""

from __future__ import annotations

import contextlib
import socket
import sys


def probe(host: str, port: int, udp: bool = False, timeout: float = 2.0) -> str:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    with socket.socket(family, kind) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            if udp:
                sock.send(b"probe")
                # Nothing answers UDP in the lab: no ICMP error in time means not rejected.
                with contextlib.suppress(TimeoutError):
                    sock.recv(64)
                return "ok"
            sock.sendall(b"GET / HTTP/1.0\r\nHost: lab\r\n\r\n")
            return "ok" if sock.recv(12).startswith(b"HTTP/") else "error: not HTTP"
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return f"error: {exc.strerror or exc}"


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    print(probe(host, port, udp=sys.argv[3:4] == ["udp"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
