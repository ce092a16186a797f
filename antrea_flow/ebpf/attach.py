"""Attaching the counter to the Node's Pod-facing interfaces, and following them.

In one network namespace (the Node's), a thread of its own keeps the counter's two
programs on the ingress and egress of every Pod-facing interface: the veths that have a
master (Antrea's OVS bridge, or the lab's antrea-gw0), or the names the config lists. It
follows netlink link events, so a Pod's interface is counted from the moment it is
enslaved and forgotten when it goes. The gateway is not attached: its index goes into
`counted_ifaces`, so a packet that a Pod sent through it is not counted again where it
leaves towards another Pod.

Only the agent's own filters (named antrea-flow-*) are ever removed; a clsact qdisc that
was there before is left alone, one the agent added is removed with its filters. Filters
left by an agent that crashed are removed when the next one starts.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from ..conntrack.netns import entered, socket_in
from . import bpfsys
from .program import CounterProgram

log = logging.getLogger(__name__)

FILTER_NAMES = {"ingress": "antrea-flow-ingress", "egress": "antrea-flow-egress"}
PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}  # clsact's ingress and egress
PRIORITY = 0xAF10  # ours, out of the way of others' filters (1..)
_RTMGRP_LINK = 1
_NETLINK_ROUTE = 0


class AttachError(Exception):
    pass


def _name(link: Any) -> str:
    return link.get_attr("IFLA_IFNAME") or ""


def _kind(link: Any) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    return (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""


class Interfaces:
    """Keeps the counter on the Pod-facing interfaces of `netns` (None: our own).

    Owned by its thread once started: the netlink socket, the set of attached interfaces
    and the clsact qdiscs it added. Other threads read `attached` (a frozenset it replaces
    whole) and `errors`.
    """

    def __init__(
        self,
        program: CounterProgram,
        netns: str | None,
        names: Iterable[str] = (),
        gateway: str = "antrea-gw0",
    ):
        self.program = program
        self.netns = netns
        self.names = frozenset(names)  # empty: automatic
        self.gateway = gateway
        self.attached: frozenset[int] = frozenset()
        self.errors = 0
        self._qdiscs_added: set[int] = set()
        self._gateway_index: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._events: Any = None

    # -- lifecycle -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _route(self) -> Iterator[Any]:
        """A route socket of the namespace, for this thread's next operations. Made inside
        the namespace (a socket stays in the namespace it was made in) and by the thread
        that uses it: pyroute2's own netns option forks a helper (a child forked from a
        process whose event loop handles signals wakes that loop with the signals it
        gets), and its sockets do not follow a thread's namespace."""
        from pyroute2 import IPRoute

        with entered(self.netns):
            ipr = IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()

    def start(self) -> None:
        """Attach to what is there now (blocking), then follow link events in a thread."""
        try:
            # Link events only say when to look again (pyroute2 buffers what it reads, so
            # its own sockets cannot be waited on).
            self._events = socket_in(self.netns, socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE)
            self._events.bind((0, _RTMGRP_LINK))
            self._events.setblocking(False)
            with self._route() as ipr:
                links = list(ipr.get_links())
                for link in links:
                    self._remove_own(ipr, link["index"])  # left by an agent that died
                for link in links:
                    self._consider(ipr, link)
        except OSError as exc:
            where = self.netns or "this namespace"
            raise AttachError(f"cannot use netlink in {where}: {exc}") from None
        self._started = True
        self._thread = threading.Thread(target=self._follow, name="ebpf-links", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Detach from every interface (the thread first stops following)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if not self._started:
            return
        with self._route() as ipr:
            for index in list(self.attached):
                self._detach(ipr, index)
        self.attached = frozenset()
        if self._gateway_index is not None:
            self._counted_set(self._gateway_index, False)
        self._events.close()
        self._started = False

    # -- the thread ----------------------------------------------------------------------

    def _follow(self) -> None:
        events = self._events
        while not self._stop.is_set():
            ready, _, _ = select.select([events], [], [], 0.2)
            if not ready:
                continue
            with contextlib.suppress(BlockingIOError, InterruptedError):
                while events.recv(65536):
                    pass
            try:
                self._reconcile()
            except Exception as exc:  # the thread must go on following
                self.errors += 1
                log.warning("cannot list the interfaces of %s: %s", self.netns or "the Node", exc)

    def _reconcile(self) -> None:
        """Attach to the Pod-facing interfaces there are now; forget the ones gone."""
        present = set()
        with self._route() as ipr:
            for link in ipr.get_links():
                present.add(link["index"])
                self._consider(ipr, link)
        for index in self.attached - present:
            self._forget(index)

    # -- decisions -----------------------------------------------------------------------

    def _pod_facing(self, link: Any) -> bool:
        name = _name(link)
        if self.names:
            return name in self.names
        return _kind(link) == "veth" and bool(link.get_attr("IFLA_MASTER")) and name != self.gateway

    def _consider(self, ipr: Any, link: Any) -> None:
        index = link["index"]
        if _name(link) == self.gateway and not self.names:
            self._gateway_index = index
            self._counted_set(index, True)
            return
        if self._pod_facing(link) and index not in self.attached:
            self._attach(ipr, index, _name(link))
        elif not self._pod_facing(link) and index in self.attached:
            self._detach(ipr, index)

    def _forget(self, index: int) -> None:
        # The kernel removed its filters with it.
        if index in self.attached:
            self.attached = self.attached - {index}
            self._counted_set(index, False)
        self._qdiscs_added.discard(index)

    # -- netlink operations --------------------------------------------------------------

    def _counted_set(self, index: int, on: bool) -> None:
        key = struct.pack("=I", index)
        if on:
            bpfsys.update(self.program.counted_fd, key, b"\x01")
        else:
            bpfsys.delete(self.program.counted_fd, key)

    def _attach(self, ipr: Any, index: int, name: str) -> None:
        try:
            if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index)):
                ipr.tc("add", "clsact", index)
                self._qdiscs_added.add(index)
            for direction, fd in (("ingress", self.program.ingress_fd),
                                  ("egress", self.program.egress_fd)):  # fmt: skip
                ipr.tc(
                    "add-filter", "bpf", index, ":1", fd=fd, name=FILTER_NAMES[direction],
                    parent=PARENTS[direction], classid=1, direct_action=True, prio=PRIORITY,
                )  # fmt: skip
        except Exception as exc:  # the link may have gone meanwhile
            self.errors += 1
            log.warning("cannot attach the packet counter to %s: %s", name or index, exc)
            return
        # Counted at its ingress: not again where it leaves towards another Pod.
        self._counted_set(index, True)
        self.attached = self.attached | {index}
        log.debug("packet counter attached to %s", name)

    @staticmethod
    def _own_filters(ipr: Any, index: int) -> list[tuple[int, Any]]:
        own = []
        for direction, parent in PARENTS.items():
            try:
                filters = ipr.get_filters(index, parent=parent)
            except Exception:
                continue
            for f in filters:
                options = f.get_attr("TCA_OPTIONS")
                name = options.get_attr("TCA_BPF_NAME") if options is not None else None
                if name == FILTER_NAMES[direction]:
                    own.append((parent, f))
        return own

    def _remove_own(self, ipr: Any, index: int) -> None:
        """Delete the filters of ours on `index` (by name, priority and handle: a filter
        of someone else's is never touched)."""
        for parent, f in self._own_filters(ipr, index):
            with contextlib.suppress(Exception):  # gone meanwhile
                ipr.tc("del-filter", "bpf", index, f["handle"], parent=parent, prio=f["info"] >> 16)

    def _detach(self, ipr: Any, index: int) -> None:
        self._remove_own(ipr, index)
        if index in self._qdiscs_added:
            with contextlib.suppress(Exception):
                ipr.tc("del", "clsact", index)
            self._qdiscs_added.discard(index)
        self._counted_set(index, False)
        self.attached = self.attached - {index}
