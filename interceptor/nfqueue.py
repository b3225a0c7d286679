"""NFQUEUE binding: netfilterqueue queues served from trio without threads.

Each queue's netlink fd is awaited with ``trio.lowlevel.wait_readable`` and drained with
``run(block=False)``. A drain is bounded: the callback raises ``_BatchDone`` after ``batch``
packets (netfilterqueue propagates callback exceptions out of ``run``), so a flood cannot starve
the timer that releases held packets. The kernel's fail-open flag, which netfilterqueue does not
expose, is set with one raw NFQNL_MSG_CONFIG message on the queue's own socket.
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
        batch: int = 64,
    ) -> None:
        self.number = number
        self.batch = batch
        self._left = batch
        self._handler = handler
        self._nfq = NetfilterQueue()
        # Held packets count against max_len, so it must cover the deepest rate-limit queue.
        self._nfq.bind(number, self._on_packet, max_len=max_len, mode=COPY_PACKET, sock_len=8 << 20)
        if fail_open:
            set_fail_open(self._nfq.get_fd(), number)

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


def set_fail_open(fd: int, queue: int) -> None:
    """Ask the kernel to accept, not drop, packets when this queue is full."""
    attrs = b"".join(
        struct.pack("=HH", 8, attr_type) + struct.pack("!I", value)
        for attr_type, value in ((_NFQA_CFG_FLAGS, _NFQA_CFG_F_FAIL_OPEN), (_NFQA_CFG_MASK, _NFQA_CFG_F_FAIL_OPEN))
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
                    raise OSError(-error, f"setting NFQUEUE {queue} fail-open: {os.strerror(-error)}")
                return
    finally:
        sock.close()  # closes only our duplicate of the queue's fd
