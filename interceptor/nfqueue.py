"""NFQUEUE binding: netfilterqueue queues drained by the shell's data-path thread.

The shell waits for each queue's netlink fd (``fd``) in its own epoll and calls ``drain``, which
reads with ``run(block=False)``. A drain is bounded: the callback raises ``_BatchDone`` after
``batch`` packets (netfilterqueue propagates callback exceptions out of ``run``), so a flood
cannot starve the timer that releases held packets. The kernel's queue flags, which netfilterqueue does not
expose (fail-open; GSO: take a GSO super-packet whole instead of cut into segments), are set with
one raw NFQNL_MSG_CONFIG message on the queue's own socket.

On a GSO queue a super-packet (up to 64 KiB) arrives with only its first bytes copied
(``GSO_COPY_BYTES``: the IP header is all the engine reads there): its real size is in its IP
header (``real_length``), and it must be accepted or dropped as it is, never rewritten.

netfilterqueue reads each netlink message into a 4096-byte buffer and assumes 80 bytes of
metadata; a forwarded packet's message carries more (both devices, bridge ports, hardware
address, skb info, the captured length), so a full 4016-byte copy overflows the buffer and the
truncated message is lost without a callback: the packet stays queued for good. Copies are
therefore capped at ``SEGMENT_COPY_BYTES``, which leaves room for any metadata.

Accepts may be sent as one batch verdict (``accept_later``, ``flush``): the kernel's
NFQNL_MSG_VERDICT_BATCH accepts every packet of the queue up to an id, so the caller may only
defer a packet when no earlier packet of the queue is still waiting for its own verdict (the
shell defers only while the engine holds nothing). Deferred accepts go out at the end of each
drain, or when ``deferred_max`` have gathered, whichever comes first.

Held packets released together are accepted the same way where that is safe (``HeldIds``, used
by the shell's timer): the queue keeps the ids of its packets still waiting in the engine, in
the order the kernel numbered them, and a release's accepts that all come before the oldest one
still waiting go out as one batch verdict through the latest of them (``accept_through``).
"""

from __future__ import annotations

import os
import socket
import struct
from collections import deque
from collections.abc import Iterable
from typing import Callable

from netfilterqueue import COPY_PACKET, NetfilterQueue

_NFNL_SUBSYS_QUEUE = 3
_NFQNL_MSG_CONFIG = 2
_NFQNL_MSG_VERDICT_BATCH = 3
_NFQA_VERDICT_HDR = 2
_NF_ACCEPT = 1
_NFQA_CFG_FLAGS = 4
_NFQA_CFG_MASK = 5
_NFQA_CFG_F_FAIL_OPEN = 1
_NFQA_CFG_F_GSO = 4

SEGMENT_COPY_BYTES = 3840  # a segment's copy: 256 bytes of the 4096-byte read left for metadata
GSO_COPY_BYTES = 128  # a super-packet's copy: its IP header (and a TCP/UDP header after it)
_NLM_F_REQUEST = 1
_NLM_F_ACK = 4
_NLMSG_ERROR = 2


_ID_MASK = 0xFFFF_FFFF
_ID_HALF = 0x8000_0000


def id_before(a: int, b: int) -> bool:
    """Whether packet id ``a`` was given before ``b`` (the kernel's 32-bit ids wrap, as its own
    batch verdict's comparison does)."""
    return a != b and (b - a) & _ID_MASK < _ID_HALF


class HeldIds:
    """One queue's packets held by the engine, by id, and which released accepts a batch verdict
    may cover. Sans-IO: ``hold`` as a packet is held, ``release`` with what a release verdicted."""

    __slots__ = ("_ids", "_done")

    def __init__(self) -> None:
        self._ids: deque[int] = deque()  # held, in the order the kernel numbered them
        self._done: set[int] = set()  # verdicted, but not yet at the front of ``_ids``

    def hold(self, packet_id: int) -> None:
        self._ids.append(packet_id)

    def release(self, verdicted: Iterable[int], accepts: list[int]) -> tuple[int | None, list[int]]:
        """``verdicted``: ids this release verdicted one by one; ``accepts``: ids it would accept
        in a batch. Returns the id to send one batch verdict through (None: none), and the
        accepts that must go one by one: a batch accepts every packet of the queue up to its id,
        so it may only cover accepts older than every packet still held."""
        ids, done = self._ids, self._done
        done.update(verdicted)
        done.update(accepts)
        while ids and ids[0] in done:
            done.discard(ids.popleft())
        front = ids[0] if ids else None
        through, alone = None, []
        for packet_id in accepts:
            if front is None or id_before(packet_id, front):
                if through is None or id_before(through, packet_id):
                    through = packet_id
            else:
                alone.append(packet_id)
        return through, alone

    def __len__(self) -> int:
        return len(self._ids)


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
        deferred_max: int = 16,
    ) -> None:
        self.number = number
        self.gso = gso
        self.batch = batch
        self._left = batch
        self.handler = handler  # may be set after construction (it may need the queue itself)
        self.deferred_max = deferred_max
        self._deferred = 0  # accepts waiting for the batch verdict
        self._deferred_id = 0  # the highest of them
        self._verdict_message = batch_verdict_message(number)
        self._verdict_socket: socket.socket | None = None
        self.held = HeldIds()  # its packets the engine holds (the shell keeps it)
        self._nfq = NetfilterQueue()
        # Held packets count against max_len, so it must cover the deepest rate-limit queue.
        self._nfq.bind(number, self._on_packet, max_len=max_len, mode=COPY_PACKET,
                       range=GSO_COPY_BYTES if gso else SEGMENT_COPY_BYTES, sock_len=8 << 20)
        flags = (_NFQA_CFG_F_FAIL_OPEN if fail_open else 0) | (_NFQA_CFG_F_GSO if gso else 0)
        if flags:
            set_queue_flags(self._nfq.get_fd(), number, flags)

    def _on_packet(self, packet) -> None:
        self.handler(packet)
        self._left -= 1
        if self._left <= 0:
            raise _BatchDone

    @property
    def fd(self) -> int:
        return self._nfq.get_fd()

    def drain(self) -> None:
        """Handle the packets waiting on the socket, at most ``batch`` of them (the fd stays
        readable if more wait), and send their deferred accepts."""
        self._left = self.batch
        try:
            self._nfq.run(block=False)
        except _BatchDone:
            pass
        finally:
            self.flush()

    def accept_later(self, packet_id: int) -> None:
        """Accept this packet with the next batch verdict (see the module's docstring)."""
        self._deferred_id = packet_id
        self._deferred += 1
        if self._deferred >= self.deferred_max:
            self.flush()

    def flush(self) -> None:
        """Send the deferred accepts as one batch verdict."""
        if not self._deferred:
            return
        self._deferred = 0
        self._send_batch(self._deferred_id)

    def accept_through(self, packet_id: int) -> None:
        """Accept, with one batch verdict, every packet of the queue up to ``packet_id`` that
        is still waiting for a verdict (the caller knows none of them must be dropped or held)."""
        self.flush()
        self._send_batch(packet_id)

    def _send_batch(self, packet_id: int) -> None:
        if self._verdict_socket is None:
            self._verdict_socket = socket.socket(fileno=os.dup(self._nfq.get_fd()))
        struct.pack_into("!I", self._verdict_message, len(self._verdict_message) - 4, packet_id)
        self._verdict_socket.sendto(self._verdict_message, (0, 0))

    def close(self) -> None:
        """Destroy the queue; the kernel drops whatever it still holds for it."""
        try:
            self.flush()
        finally:
            if self._verdict_socket is not None:
                self._verdict_socket.close()  # our duplicate of the queue's fd only
            self._nfq.unbind()


def batch_verdict_message(queue: int, packet_id: int = 0) -> bytearray:
    """NFQNL_MSG_VERDICT_BATCH accepting every packet of ``queue`` up to ``packet_id`` (its last
    four bytes, the id, are rewritten per use)."""
    attr = struct.pack("=HH", 4 + 8, _NFQA_VERDICT_HDR) + struct.pack("!II", _NF_ACCEPT, packet_id)
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attr
    header = struct.pack("=IHHII", 16 + len(body), (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_VERDICT_BATCH,
                         _NLM_F_REQUEST, 0, 0)
    return bytearray(header + body)


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
    blocking = os.get_blocking(fd)  # the timeout below sets O_NONBLOCK on the shared description
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
        os.set_blocking(fd, blocking)
