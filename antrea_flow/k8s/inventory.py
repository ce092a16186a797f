"""The static metadata source: a YAML `kind: List` of Kubernetes objects, as the API returns
them, reloaded whenever the file changes."""

from __future__ import annotations

import logging
import os
from typing import Any

from ..configfile import ConfigError, load_yaml_documents
from .stores import MetadataStore

log = logging.getLogger(__name__)


class InventoryError(ValueError):
    pass


def read_inventory(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The objects of a List document (or of several YAML documents of single objects)."""
    try:
        documents = [d for d in load_yaml_documents(path, "inventory") if d is not None]
    except ConfigError as exc:
        raise InventoryError(str(exc)) from None
    objects: list[dict[str, Any]] = []
    for document in documents:
        if not isinstance(document, dict):
            raise InventoryError(
                f"inventory {path}: expected Kubernetes objects, got {document!r:.60}"
            )
        kind = document.get("kind")
        if isinstance(kind, str) and kind.endswith("List"):  # List, PodList, ...
            items = document.get("items") or []
            if not isinstance(items, list):
                raise InventoryError(f"inventory {path}: items is not a list")
            objects.extend(i for i in items if isinstance(i, dict))
        else:
            objects.append(document)
    for number, obj in enumerate(objects):
        if not isinstance(obj.get("metadata", {}), dict):
            raise InventoryError(
                f"inventory {path}: object {number} (kind {obj.get('kind')!r}) has metadata "
                "that is not a mapping"
            )
    return objects


class InventoryFileSource:
    """Feeds a MetadataStore from a file; `refresh()` reloads it when it has changed. It
    runs on the store's owner."""

    def __init__(self, path: str | os.PathLike, store: MetadataStore):
        self.path = os.fspath(path)
        self.store = store
        self._signature: tuple[int, int, int] | None = None

    def refresh(self) -> bool:
        """Reload if the file changed since the last load; True when it did. A file that
        cannot be read or parsed keeps the previous metadata (and is reported)."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._signature is None:
                raise InventoryError(f"cannot read inventory {self.path}: {exc.strerror}") from None
            return False
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature == self._signature:
            return False
        try:
            objects = read_inventory(self.path)
        except InventoryError:
            if self._signature is None:
                raise
            log.warning("keeping the previous inventory: %s", self.path, exc_info=True)
            self._signature = signature
            return False
        self.store.replace(objects)
        self._signature = signature
        counts = self.store.counts
        log.info(
            "inventory %s: %d nodes, %d pod IPs, %d service ports, %d policy rules",
            self.path,
            counts.nodes,
            counts.pod_ips,
            counts.services,
            counts.rules,
        )
        return True
