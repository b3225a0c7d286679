"""Which directions take GSO super-packets, and how the shell weighs and verdicts one (no kernel)."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from interceptor.compiled import CompiledSkin
from interceptor.engine import ACCEPT
from interceptor.engine.path import Rewrite
from interceptor.nfqueue import HeldIds, real_length
from interceptor.schema import compile_skin, validate_skin
from interceptor.shell import Shell
from interceptor.timeline import compile_timeline
from tests.unit.test_shell_classify import FakePacket


def takes(**fields) -> tuple[bool, bool]:
    skin = validate_skin({"name": "s", **fields})
    compiled = compile_skin(skin)
    if skin.timeline is not None:
        compiled = replace(compiled, timeline=compile_timeline(skin, compiled))
    return compiled.takes_super_packets()


@pytest.mark.parametrize("fields, expected", [
    ({}, (True, True)),
    ({"latency_ms": 1, "jitter_ms": 5}, (True, True)),
    ({"bandwidth_limit_kbps": 1_000_000}, (True, True)),
    # 4 super-packets at 1 Mbit/s are 2.1 s of queue: more than the 500 ms allowed.
    ({"bandwidth_limit_kbps": 1000}, (False, False)),
    ({"bandwidth_limit_kbps": 1000, "queue_limit_ms": 3000}, (True, True)),
    ({"packet_loss_percent": 1}, (False, False)),
    ({"reorder_percent": 5, "latency_ms": 10}, (False, False)),
    ({"uplink": {"loss_percent": 2}}, (False, True)),  # per direction
    ({"downlink": {"rate_kbps": 500}}, (True, False)),
    ({"security_profile": "restricted"}, (False, False)),
    ({"mtu": 1400}, (False, False)),
    ({"dns": {"block": ["ads.example"]}}, (False, False)),
    # A timeline takes super-packets only if every one of its steps does.
    ({"timeline": {"steps": [{"for": "2s"}, {"for": "1s", "set": {"packet_loss_percent": 100}}]}}, (False, False)),
    ({"timeline": {"steps": [{"for": "2s"}, {"for": "1s", "set": {"latency_ms": 300}, "ramp": True}]}}, (True, True)),
])
def test_only_directions_without_per_packet_decisions_take_super_packets(fields, expected):
    assert takes(**fields) == expected


def ipv4(total: int, captured: int) -> bytes:
    return (struct.pack("!BBH", 0x45, 0, total) + bytes(16))[:captured].ljust(captured, b"\0")


def test_real_length_reads_the_ip_header():
    assert real_length(ipv4(64_000, 4016)) == 64_000
    assert real_length(b"\x60" + bytes(3) + struct.pack("!H", 60_000) + bytes(34)) == 60_040
    assert real_length(ipv4(20, 60)) == 60  # a header that says less: the bytes at hand
    assert real_length(b"\x60" + bytes(39)) == 40  # a jumbogram's zero length
    assert real_length(b"\x45") == 1


class _Rewriting:
    """A path stand-in whose uplink always asks for a rewrite."""

    name = "vm"
    needs_payload_up = True
    uplink = None

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_uplink(self, packet, size, data, now, rand):
        self.sizes.append(size)
        return Rewrite(b"rewritten", ACCEPT)


class RecordingPacket(FakePacket):
    def set_payload(self, payload: bytes) -> None:
        self.payload = payload


@pytest.fixture
def shell():
    s = Shell(fail_open=True)
    s.add_vm("vm", "tap-a", 7702, 7703)
    s.set_indexes({"tap-a": 7})
    yield s
    s.injector.close()


def test_a_super_packet_is_weighed_by_its_header_and_never_rewritten(shell):
    shell.set_skin("vm", CompiledSkin(name="plain"), 1)
    shell._handler(True, gso=True)(packet := FakePacket(indev=7, payload=ipv4(64_000, 4016)))
    assert packet.verdict == "accept"
    snapshot = shell.paths["vm"].uplink.snapshot()
    assert (snapshot["packets"], snapshot["bytes"]) == (1, 64_000)
    # The per-segment queue's handler counts what was copied: there it is the whole packet.
    shell._handler(True)(FakePacket(indev=7, payload=ipv4(1500, 1500)))
    assert shell.paths["vm"].uplink.snapshot()["bytes"] == 65_500

    rewriting = _Rewriting()
    shell.classifier.by_index[7] = rewriting
    handle = shell._handler(True, gso=True)
    handle(truncated := RecordingPacket(indev=7, payload=ipv4(64_000, 4016)))
    handle(whole := RecordingPacket(indev=7, payload=ipv4(300, 300)))
    assert rewriting.sizes == [64_000, 300]
    assert truncated.verdict == "accept" and truncated.payload == ipv4(64_000, 4016)
    assert whole.verdict == "accept" and whole.payload == b"rewritten"


# --- batch verdicts -------------------------------------------------------------------------


class NumberedPacket(FakePacket):
    def __init__(self, packet_id: int, **kw) -> None:
        super().__init__(**kw)
        self.id = packet_id


class FakeQueue:
    def __init__(self) -> None:
        self.later: list[int] = []
        self.held = HeldIds()

    def accept_later(self, packet_id: int) -> None:
        self.later.append(packet_id)


def test_accepts_are_deferred_to_the_batch_verdict_only_while_nothing_is_held(shell):
    queue = FakeQueue()
    handle = shell._handler(True, False, queue)
    shell.set_skin("vm", CompiledSkin(name="plain"), 1)
    first = NumberedPacket(1, indev=7)
    handle(first)
    assert queue.later == [1] and first.verdict is None  # accepted by the batch, not one by one
    # Once anything is held, a batch up to a later id would release it early: one by one.
    shell.engine.held.append((0, 0, None))
    second = NumberedPacket(2, indev=7)
    handle(second)
    assert queue.later == [1] and second.verdict == "accept"
    shell.engine.held.clear()
    off = Shell(fail_open=True, batch_verdicts=False)
    off.add_vm("vm", "tap-a", 7700, 7701)
    off.set_indexes({"tap-a": 7})
    third = NumberedPacket(3, indev=7)
    off._handler(True, False, queue)(third)
    assert queue.later == [1] and third.verdict == "accept"
    off.injector.close()


def test_the_batch_verdict_message_accepts_up_to_an_id():
    from interceptor.nfqueue import batch_verdict_message

    message = batch_verdict_message(7702, 0x01020304)
    length, kind, flags = struct.unpack_from("=IHH", message)
    assert (length, kind, flags) == (len(message), (3 << 8) | 3, 1)  # NFNL_SUBSYS_QUEUE, VERDICT_BATCH, REQUEST
    assert struct.unpack_from("!H", message, 18)[0] == 7702  # nfgenmsg res_id, big-endian
    assert struct.unpack_from("=HH", message, 20) == (12, 2)  # NFQA_VERDICT_HDR
    assert struct.unpack_from("!II", message, 24) == (1, 0x01020304)  # NF_ACCEPT, up to this id


def test_setting_queue_flags_leaves_the_queue_fd_blocking_as_it_was():
    """The flag request's timeout sets O_NONBLOCK on the description the queue's fd shares: left
    there, a blocking ``run()`` returned at once (EAGAIN) and the bare loop served nothing."""
    import os
    import socket

    from interceptor.nfqueue import set_queue_flags

    # A routing netlink socket: the kernel answers the queue request with an error, changing nothing.
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        assert os.get_blocking(sock.fileno())
        with pytest.raises(OSError):
            set_queue_flags(sock.fileno(), 7702, 4)
        assert os.get_blocking(sock.fileno())
    finally:
        sock.close()


# --- moves between the queue pairs --------------------------------------------------------------


class _Steering:
    """Just what ``Daemon._steer`` reads: the shell's queues, the counters, and a transaction."""

    def __init__(self, vms: int, fail: bool = False) -> None:
        import trio

        self.shell = Shell(fail_open=True)
        for i in range(vms):
            self.shell.add_vm(f"vm{i}", f"tap{i}", 7700, 7701)
        self._steering_lock = trio.Lock()
        self._steering_asked = self._steering_done = 0
        self.installed: list[dict] = []
        self.fail = fail

    async def _install_rules(self) -> None:
        import trio

        from interceptor import rules

        snapshot = dict(self.shell.queues)
        await trio.sleep(0.01)  # the transaction takes a while; other moves are asked meanwhile
        if self.fail:
            raise rules.RulesError("iptables-restore: exit 1")
        self.installed.append(snapshot)


def test_moves_asked_together_share_transactions_and_each_is_installed():
    import trio

    from interceptor.daemon import Daemon

    state = _Steering(50)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Daemon._steer, state, "vm0", (7702, 7703))
            await trio.sleep(0.002)  # its transaction is under way
            for i in range(1, 50):
                nursery.start_soon(Daemon._steer, state, f"vm{i}", (7702, 7703))

    trio.run(main)
    # Fifty moves, two transactions: the first alone, the 49 asked during it in the next one.
    assert len(state.installed) == 2
    assert state.installed[0]["vm0"] == (7702, 7703) and state.installed[0]["vm1"] == (7700, 7701)
    assert all(queues == (7702, 7703) for queues in state.installed[1].values())
    state.shell.injector.close()


def test_a_move_whose_transaction_fails_stays_where_it_was():
    import trio

    from interceptor.daemon import Daemon

    state = _Steering(1, fail=True)
    trio.run(Daemon._steer, state, "vm0", (7702, 7703))
    assert state.shell.queues["vm0"] == (7700, 7701) and state.installed == []
    state.shell.injector.close()


def test_a_jumbo_segment_is_weighed_by_its_header_and_never_rewritten(shell):
    from interceptor.nfqueue import SEGMENT_COPY_BYTES

    shell.set_skin("vm", CompiledSkin(name="plain"), 1)
    shell._handler(True)(FakePacket(indev=7, payload=ipv4(9000, SEGMENT_COPY_BYTES)))
    assert shell.paths["vm"].uplink.snapshot()["bytes"] == 9000
    rewriting = _Rewriting()
    shell.classifier.by_index[7] = rewriting
    handle = shell._handler(True)
    handle(cut := RecordingPacket(indev=7, payload=ipv4(9000, SEGMENT_COPY_BYTES)))
    handle(whole := RecordingPacket(indev=7, payload=ipv4(1500, 1500)))
    assert rewriting.sizes == [9000, 1500]
    assert cut.verdict == "accept" and cut.payload == ipv4(9000, SEGMENT_COPY_BYTES)
    assert whole.payload == b"rewritten"
