"""The NFQUEUE fail-open config message the deny queue sends after binding."""

import socket
import struct
import sys

import pytest

from antrea_flow.exporter.denyqueue import (
    NFNL_SUBSYS_QUEUE,
    NFQA_CFG_F_FAIL_OPEN,
    NFQA_CFG_FLAGS,
    NFQA_CFG_MASK,
    NFQNL_MSG_CONFIG,
    _fail_open_message,
)

NATIVE = "<" if sys.byteorder == "little" else ">"


def test_constants_are_the_kernels():
    assert (NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG) == (3, 2)
    assert (NFQA_CFG_MASK, NFQA_CFG_FLAGS, NFQA_CFG_F_FAIL_OPEN) == (4, 5, 1)


@pytest.mark.parametrize("queue", [0, 1, 0x1234, 65535])
def test_fail_open_message_layout(queue):
    message = _fail_open_message(queue)
    assert len(message) == 16 + 4 + 8 + 8
    # struct nlmsghdr, host byte order
    length, kind, flags, seq, pid = struct.unpack(NATIVE + "IHHII", message[:16])
    assert length == len(message)
    assert kind == (3 << 8) | 2
    assert flags == 0x1  # NLM_F_REQUEST
    assert (seq, pid) == (0, 0)
    # struct nfgenmsg: family, version, res_id (the queue number, big endian)
    assert message[16] == socket.AF_UNSPEC
    assert message[17] == 0  # NFNETLINK_V0
    assert message[18:20] == queue.to_bytes(2, "big")
    # two attributes: nla_len/nla_type in host order, u32 values big endian
    attributes = message[20:]
    for offset, attribute in ((0, 4), (8, 5)):
        nla_len, nla_type = struct.unpack_from(NATIVE + "HH", attributes, offset)
        assert (nla_len, nla_type) == (8, attribute)
        assert attributes[offset + 4 : offset + 8] == b"\x00\x00\x00\x01"


def test_fail_open_message_is_attribute_aligned():
    message = _fail_open_message(7)
    assert len(message) % 4 == 0
