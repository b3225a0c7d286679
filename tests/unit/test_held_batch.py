"""Held packets released together leave with one batch verdict where that is safe
(interceptor/nfqueue.py HeldIds, interceptor/shell.py _release): never a packet still held,
never a rewritten one, across the kernel's 32-bit id wrap."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from interceptor.nfqueue import HeldIds, id_before
from interceptor.schema import compile_document
from interceptor.shell import Shell
from tests.unit.test_engine_path import dns_answer
from tests.unit.test_shell_classify import FakePacket

M = 0xFFFF_FFFF


def test_ids_compare_across_the_wrap():
    assert id_before(1, 2) and not id_before(2, 1) and not id_before(5, 5)
    assert id_before(M, 0) and id_before(M - 3, 2) and not id_before(2, M - 3)


def test_accepts_behind_a_packet_still_held_go_one_by_one():
    held = HeldIds()
    for packet_id in (10, 11, 12, 13):
        held.hold(packet_id)
    # 11 and 13 are released; 10 is still held, so neither may be covered by a batch.
    assert held.release([], [11, 13]) == (None, [11, 13])
    # 10 leaves (dropped one by one): 12 is now the oldest held; nothing to batch.
    assert held.release([10], []) == (None, [])
    assert held.release([], [12]) == (12, [])  # nothing older held: one batch through 12
    assert len(held) == 0


class _Kernel:
    """A queue as the kernel keeps it: ids in order; a batch verdict takes every waiting packet
    from the head until the first whose id comes after its own (nfqnl_recv_verdict_batch)."""

    def __init__(self) -> None:
        self.waiting: list[int] = []

    def batch(self, through: int) -> list[int]:
        taken = []
        while self.waiting and not id_before(through, self.waiting[0]):
            taken.append(self.waiting.pop(0))
        return taken

    def one(self, packet_id: int) -> None:
        self.waiting.remove(packet_id)


@settings(max_examples=300, deadline=None)
@given(
    first=st.sampled_from([0, 1000, M - 20, M]),
    steps=st.lists(st.tuples(st.sampled_from(["hold", "rewrite", "pass", "release"]),
                             st.lists(st.tuples(st.integers(0, 50), st.booleans()), max_size=6)),
                   max_size=60),
)
def test_a_batch_verdict_never_takes_a_packet_still_held_or_one_that_must_leave_alone(first, steps):
    kernel, held = _Kernel(), HeldIds()
    engine: dict[int, bool] = {}  # held by the engine: id → may it leave in a batch
    next_id = first
    for action, picks in steps:
        if action in ("hold", "rewrite", "pass"):
            packet_id, next_id = next_id, (next_id + 1) & M
            kernel.waiting.append(packet_id)
            if action == "pass":
                kernel.one(packet_id)  # accepted at once
            else:
                engine[packet_id] = action == "hold"  # a rewritten payload leaves on its own
                held.hold(packet_id)
            continue
        order = list(engine)
        chosen = {order[i % len(order)]: accept for i, accept in picks} if order else {}
        accepts = [i for i, accept in chosen.items() if accept and engine[i]]
        alone_ids = [i for i, accept in chosen.items() if not (accept and engine[i])]
        for packet_id in alone_ids:
            kernel.one(packet_id)
        through, alone = held.release(alone_ids, accepts)
        assert set(alone) <= set(accepts)
        for packet_id in alone:
            kernel.one(packet_id)
        if through is not None:
            taken = kernel.batch(through)
            assert set(taken) <= set(accepts) - set(alone), (taken, accepts, alone)
        for packet_id in chosen:
            del engine[packet_id]
            assert packet_id not in kernel.waiting  # every released packet got its verdict
    assert sorted(kernel.waiting, key=lambda i: (i - first) & M) == sorted(engine, key=lambda i: (i - first) & M)


class _Queue:
    """The parts of interceptor.nfqueue.Queue the shell's handler and timer use."""

    def __init__(self) -> None:
        self.held = HeldIds()
        self.batches: list[int] = []

    def accept_later(self, packet_id: int) -> None:
        raise AssertionError("nothing is deferred while packets are held")

    def accept_through(self, packet_id: int) -> None:
        self.batches.append(packet_id)


class _Packet(FakePacket):
    def __init__(self, packet_id: int, payload: bytes = b"\x45" + bytes(27), **devices) -> None:
        super().__init__(payload=payload, **devices)
        self.id = packet_id
        self.sent_payload = None

    def set_payload(self, payload: bytes) -> None:
        self.sent_payload = payload


def _shell(doc: dict, **options) -> Shell:
    shell = Shell(fail_open=True, **options)
    shell.add_vm("vm", "tap-a", 7700, 7701)
    shell.set_indexes({"tap-a": 7})
    shell.set_skin("vm", compile_document(doc, "slow"), 1)
    return shell


def _release_after(shell: Shell, seconds: float) -> None:
    time.sleep(seconds)
    with shell.lock:
        shell._release()


def test_held_packets_due_together_leave_in_one_batch_verdict():
    shell = _shell({"uplink": {"delay_ms": 5}})
    queue = _Queue()
    handle = shell._handler(True, queue=queue)
    try:
        packets = [_Packet(i, indev=7) for i in (100, 101, 102)]
        for packet in packets:
            handle(packet)
        _release_after(shell, 0.01)
        assert queue.batches == [102]  # one verdict for the three: nothing older is held
        assert [p.verdict for p in packets] == [None, None, None]  # none of their own
        assert len(queue.held) == 0 and not shell._holding
    finally:
        shell.close()


def test_a_held_rewritten_answer_leaves_alone_and_what_is_behind_it_does_too():
    # The answer waits 200 ms for the slow resolver, the plain packets 5 ms: a slow machine has
    # 195 ms of margin before the first release below would find the answer due as well.
    shell = _shell({"downlink": {"delay_ms": 5}, "dns": {"rewrite": {"*.example": "192.0.2.7"}, "delay_ms": 200}})
    queue = _Queue()
    handle = shell._handler(False, queue=queue)
    try:
        answer = _Packet(100, dns_answer("a.example"), outdev=7)
        plain = [_Packet(i, outdev=7) for i in (101, 102)]
        for packet in (answer, *plain):
            handle(packet)
        assert answer.sent_payload is not None and answer.verdict is None  # rewritten, held
        _release_after(shell, 0.01)  # the plain ones are due, the answer is not
        assert [p.verdict for p in plain] == ["accept", "accept"] and queue.batches == []
        _release_after(shell, 0.21)
        assert answer.verdict == "accept" and queue.batches == []  # its own verdict, with its payload
        assert len(queue.held) == 0 and not shell._holding
    finally:
        shell.close()


def test_without_batch_verdicts_every_held_packet_gets_its_own():
    shell = _shell({"uplink": {"delay_ms": 5}}, batch_verdicts=False)
    queue = _Queue()
    handle = shell._handler(True, queue=queue)
    try:
        packets = [_Packet(i, indev=7) for i in (1, 2)]
        for packet in packets:
            handle(packet)
        _release_after(shell, 0.01)
        assert [p.verdict for p in packets] == ["accept", "accept"] and queue.batches == []
    finally:
        shell.close()
