"""NFQUEUE binding: netfilterqueue queues served from trio without threads.

Each queue's netlink fd is awaited with ``trio.lowlevel.wait_readable`` and drained with
``run(block=False)``. A drain is bounded: the callback raises ``_BatchDone`` after ``batch``
packets (netfilterqueue propagates callback exceptions out of ``run``), so a flood cannot starve
the timer that releases held packets. The kernel's queue flags, which netfilterqueue does not
expose (fail-open; GSO: take a GSO super-packet whole instead of cut into segments), are set with
one raw NFQNL_MSG_CONFIG message on the queue's own socket.

On a GSO queue a super-packet (up to 64 KiB) arrives with only its first bytes copied
(netfilterqueue caps the copy at about 4 KB): its real size is in its IP header
(``real_length``), and it must be accepted or dropped as it is, never rewritten.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Callable

import trio
from netfilterqueue import COPY_PACKET, NetfilterQueue

_NFNL_SUBSYS_QUEUE = 3
_NFQNL_MSG_CONFIG = 2
_NFQA_CFG_FLAGS = 4
_NFQA_CFG_MASK = 5
_NFQA_CFG_F_FAIL_OPEN = 1
_NFQA_CFG_F_GSO = 4
_NLM_F_REQUEST = 1
_NLM_F_ACK = 4
_NLMSG_ERROR = 2


class _BatchDone(Exception):
    """Raised from the callback to end one bounded drain of the socket."""


class Queue:
    """One bound NFQUEUE queue whose packets go to ``handler(packet)``."""

    def __init__(
        self,
        number: int,
        handler: Callable,
        *,
        max_len: int = 16384,
        fail_open: bool = True,
        gso: bool = False,
        batch: int = 64,
    ) -> None:
        self.number = number
        self.gso = gso
        self.batch = batch
        self._left = batch
        self._handler = handler
        self._nfq = NetfilterQueue()
        # Held packets count against max_len, so it must cover the deepest rate-limit queue.
        self._nfq.bind(number, self._on_packet, max_len=max_len, mode=COPY_PACKET, sock_len=8 << 20)
        flags = (_NFQA_CFG_F_FAIL_OPEN if fail_open else 0) | (_NFQA_CFG_F_GSO if gso else 0)
        if flags:
            set_queue_flags(self._nfq.get_fd(), number, flags)

    def _on_packet(self, packet) -> None:
        self._handler(packet)
        self._left -= 1
        if self._left <= 0:
            raise _BatchDone

    async def serve(self) -> None:
        fd = self._nfq.get_fd()
        run = self._nfq.run
        while True:
            await trio.lowlevel.wait_readable(fd)
            self._left = self.batch
            try:
                run(block=False)
            except _BatchDone:
                pass
            # Let the release timer and the control socket run between batches.
            await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Destroy the queue; the kernel drops whatever it still holds for it."""
        self._nfq.unbind()


def real_length(payload: bytes) -> int:
    """The packet's size by its IP header (IPv4 total length, IPv6 payload length + 40), or the
    bytes at hand if the header says less (a jumbogram's zero, a malformed header)."""
    if len(payload) >= 4:
        version = payload[0] >> 4
        if version == 4:
            return max(len(payload), (payload[2] << 8) | payload[3])
        if version == 6 and len(payload) >= 6:
            return max(len(payload), 40 + ((payload[4] << 8) | payload[5]))
    return len(payload)


def set_queue_flags(fd: int, queue: int, flags: int) -> None:
    """Set the queue's flags (one attribute holding all of them: the kernel reads one per type)."""
    mask = _NFQA_CFG_F_FAIL_OPEN | _NFQA_CFG_F_GSO
    attrs = b"".join(
        struct.pack("=HH", 8, attr_type) + struct.pack("!I", value)
        for attr_type, value in ((_NFQA_CFG_FLAGS, flags), (_NFQA_CFG_MASK, mask))
    )
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    seq = 0x6E736B  # arbitrary; only this request's ACK is read below
    header = struct.pack(
        "=IHHII", 16 + len(body), (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_CONFIG, _NLM_F_REQUEST | _NLM_F_ACK, seq, 0
    )
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.settimeout(2.0)
        sock.sendto(header + body, (0, 0))
        while True:
            reply = sock.recv(65536)
            length, msg_type, _flags, reply_seq, _pid = struct.unpack_from("=IHHII", reply)
            if msg_type == _NLMSG_ERROR and reply_seq == seq:
                (error,) = struct.unpack_from("=i", reply, 16)
                if error != 0:
                    raise OSError(-error, f"setting NFQUEUE {queue} flags {flags:#x}: {os.strerror(-error)}")
                return
    finally:
        sock.close()  # closes only our duplicate of the queue's fd
