"""The static inventory file: a Kubernetes List (or several documents), reloaded on change."""

import logging
import os
import textwrap

import pytest
from agentkit import ip

from antrea_flow.k8s.inventory import InventoryError, InventoryFileSource, read_inventory
from antrea_flow.k8s.stores import DELETED_POD_RETENTION, MetadataStore

LIST_DOC = """\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: node-1}
  spec: {podCIDRs: [10.10.1.0/24]}
- apiVersion: v1
  kind: Pod
  metadata: {namespace: frontend, name: client}
  spec: {nodeName: node-1}
  status: {podIPs: [{ip: 10.10.1.5}]}
- apiVersion: v1
  kind: Service
  metadata: {namespace: backend, name: web}
  spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
"""

MULTI_DOC = """\
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
spec: {podCIDRs: [10.10.2.0/24]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: default, name: db}
spec: {nodeName: node-2}
status: {podIP: 10.10.2.7}
---
# an empty document is skipped
---
apiVersion: v1
kind: PodList
items:
- apiVersion: v1
  kind: Pod
  metadata: {namespace: default, name: cache}
  spec: {nodeName: node-2}
  status: {podIP: 10.10.2.8}
"""


class Inventory:
    """A file whose modification time the test sets explicitly (no reliance on clocks)."""

    def __init__(self, path):
        self.path = path
        self.mtime_ns = 1_700_000_000_000_000_000

    def write(self, text, bump=True):
        self.path.write_text(textwrap.dedent(text), encoding="utf-8")
        if bump:
            self.mtime_ns += 1_000_000_000
        os.utime(self.path, ns=(self.mtime_ns, self.mtime_ns))


@pytest.fixture
def inventory(tmp_path):
    return Inventory(tmp_path / "inventory.yaml")


def test_read_inventory_of_a_list_document(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text(LIST_DOC)
    objects = read_inventory(path)
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Node", "node-1"),
        ("Pod", "client"),
        ("Service", "web"),
    ]


def test_read_inventory_of_several_documents_including_a_typed_list(tmp_path):
    path = tmp_path / "multi.yaml"
    path.write_text(MULTI_DOC)
    objects = read_inventory(path)
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Node", "node-2"),
        ("Pod", "db"),
        ("Pod", "cache"),
    ]


def test_read_inventory_of_an_empty_file_is_empty(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    assert read_inventory(path) == []


@pytest.mark.parametrize(
    "text",
    [
        "kind: List\nitems: [unclosed\n",  # not YAML
        "- just\n- a\n- list\n",  # a sequence, not objects
        "just a string\n",
        "kind: List\nitems: {a: 1}\n",  # items is not a list
        "kind: Pod\nmetadata: 5\n",  # metadata is not a mapping
        "kind: List\nitems: [{kind: Pod, metadata: [x]}]\n",
    ],
)
def test_read_inventory_rejects_what_is_not_kubernetes_objects(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InventoryError) as info:
        read_inventory(path)
    assert str(path) in str(info.value)


def test_objects_without_a_kind_are_objects_not_lists(tmp_path):
    path = tmp_path / "kindless.yaml"
    path.write_text("kind:\nmetadata: {name: x}\n---\nkind: 7\nitems: []\n")
    assert [o["kind"] for o in read_inventory(path)] == [None, 7]


def test_read_inventory_of_a_missing_file(tmp_path):
    with pytest.raises(InventoryError) as info:
        read_inventory(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(info.value)


def test_refresh_loads_then_reloads_only_when_the_file_changed(inventory):
    now = [1000.0]
    store = MetadataStore(clock=lambda: now[0])
    source = InventoryFileSource(inventory.path, store)
    inventory.write(LIST_DOC)
    assert source.refresh() is True
    assert store.pod(ip("10.10.1.5")).name == "client"
    version = store.version

    assert source.refresh() is False  # unchanged
    assert source.refresh() is False
    assert store.version == version

    inventory.write(MULTI_DOC)  # a different size and time
    assert source.refresh() is True
    assert store.version > version
    assert store.pod(ip("10.10.2.8")).name == "cache"
    assert set(store.nodes_by_name) == {"node-2"}
    # A full replacement, not a merge: the Pod that went resolves only while a late
    # record of its connections may still come.
    assert store.pod(ip("10.10.1.5")).name == "client"
    now[0] += DELETED_POD_RETENTION + 1
    assert store.pod(ip("10.10.1.5")) is None


def test_refresh_notices_a_new_modification_time_with_the_same_size(inventory):
    now = [1000.0]
    store = MetadataStore(clock=lambda: now[0])
    source = InventoryFileSource(inventory.path, store)
    inventory.write(LIST_DOC)
    assert source.refresh() is True
    edited = LIST_DOC.replace("10.10.1.5", "10.10.1.9")  # same length
    assert len(edited) == len(LIST_DOC)
    inventory.write(edited)
    assert source.refresh() is True
    assert store.pod(ip("10.10.1.9")).name == "client"
    now[0] += DELETED_POD_RETENTION + 1
    assert store.pod(ip("10.10.1.5")) is None


def test_refresh_notices_a_new_size_with_the_same_modification_time(inventory):
    store = MetadataStore()
    source = InventoryFileSource(inventory.path, store)
    inventory.write(LIST_DOC)
    assert source.refresh() is True
    inventory.write(LIST_DOC.replace("10.10.1.5", "10.10.1.55"), bump=False)
    assert source.refresh() is True
    assert store.pod(ip("10.10.1.55")).name == "client"


def test_a_broken_later_version_keeps_the_previous_metadata(inventory, caplog):
    store = MetadataStore()
    source = InventoryFileSource(inventory.path, store)
    inventory.write(LIST_DOC)
    assert source.refresh() is True
    version = store.version

    inventory.write("kind: List\nitems: [oops\n")
    with caplog.at_level(logging.WARNING, logger="antrea_flow.k8s.inventory"):
        assert source.refresh() is False  # no exception
    assert store.version == version
    assert store.pod(ip("10.10.1.5")).name == "client"
    assert any("inventory" in r.getMessage() for r in caplog.records)

    assert source.refresh() is False  # the same broken file is not re-read
    inventory.write(MULTI_DOC)  # fixed
    assert source.refresh() is True
    assert store.pod(ip("10.10.2.7")).name == "db"


def test_a_later_non_object_document_keeps_the_previous_metadata(inventory):
    store = MetadataStore()
    source = InventoryFileSource(inventory.path, store)
    inventory.write(LIST_DOC)
    source.refresh()
    inventory.write("- not\n- objects\n")
    assert source.refresh() is False
    assert store.pod(ip("10.10.1.5")).name == "client"


def test_a_file_removed_later_keeps_the_previous_metadata(inventory):
    store = MetadataStore()
    source = InventoryFileSource(inventory.path, store)
    inventory.write(LIST_DOC)
    source.refresh()
    os.unlink(inventory.path)
    assert source.refresh() is False
    assert store.pod(ip("10.10.1.5")).name == "client"
    inventory.write(MULTI_DOC)
    assert source.refresh() is True
    assert store.pod(ip("10.10.2.7")).name == "db"


def test_first_load_of_a_missing_file_raises(tmp_path):
    source = InventoryFileSource(tmp_path / "absent.yaml", MetadataStore())
    with pytest.raises(InventoryError) as info:
        source.refresh()
    assert "absent.yaml" in str(info.value)


def test_first_load_of_a_broken_file_raises_and_a_retry_raises_again(inventory):
    store = MetadataStore()
    source = InventoryFileSource(inventory.path, store)
    inventory.write("kind: List\nitems: [oops\n")
    with pytest.raises(InventoryError):
        source.refresh()
    with pytest.raises(InventoryError):
        source.refresh()
    assert store.version == 0
    inventory.write(LIST_DOC)
    assert source.refresh() is True
    assert store.pod(ip("10.10.1.5")).name == "client"
