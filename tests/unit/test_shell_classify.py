"""The shell hands each queued packet to its VM's path by the packet's devices (no kernel)."""

from __future__ import annotations

import ipaddress

import pytest

from interceptor.shell import Shell


class FakePacket:
    def __init__(self, indev=0, outdev=0, physindev=0, physoutdev=0, payload=b"\x45" + bytes(27)):
        self.indev, self.outdev, self.physindev, self.physoutdev = indev, outdev, physindev, physoutdev
        self.payload = payload
        self.verdict = None

    def get_payload_len(self) -> int:
        return len(self.payload)

    def get_payload(self) -> bytes:
        return self.payload

    def get_timestamp(self) -> float:
        return 0.0  # no kernel stamp: the shell uses the time it read the packet

    def accept(self) -> None:
        self.verdict = "accept"

    def drop(self) -> None:
        self.verdict = "drop"


def to(address: str) -> bytes:
    return b"\x45" + bytes(15) + ipaddress.ip_address(address).packed + bytes(8)


@pytest.fixture(params=[True, False], ids=["open", "closed"])
def shell(request):
    s = Shell(fail_open=request.param)
    s.add_vm("routed", "tap-a", 7700, 7701, addresses=("10.0.0.2", None))
    s.add_vm("port", "tap-b", 7700, 7701, addresses=("10.77.100.3", "fd77:100::3"))
    s.set_indexes({"lo": 1, "br0": 5, "tap-a": 7, "tap-b": 8})
    yield s
    s.close()


def packets(shell, vm: str, direction: str) -> int:
    return getattr(shell.paths[vm], direction).snapshot()["packets"]


def test_each_packet_reaches_its_vms_path(shell):
    up, down = shell._handler(True), shell._handler(False)
    for packet, vm, direction in [
        (FakePacket(indev=7), "routed", "uplink"),
        (FakePacket(indev=5, physindev=8), "port", "uplink"),  # bridged
        (FakePacket(indev=7, outdev=8), "routed", "uplink"),  # routed from a to b: a's uplink...
        (FakePacket(indev=7, outdev=8), "port", "downlink"),  # ...and b's downlink, not a's
        (FakePacket(outdev=5, physoutdev=8), "port", "downlink"),
        (FakePacket(outdev=5, payload=to("10.77.100.3")), "port", "downlink"),  # routed onto br0
    ]:
        before = packets(shell, vm, direction)
        (up if direction == "uplink" else down)(packet)
        assert packet.verdict == "accept"
        assert packets(shell, vm, direction) == before + 1
    assert shell.unclassified == 0


def test_a_packet_of_an_unknown_device_gets_fail_mode_and_asks_for_the_indexes(shell):
    packet = FakePacket(indev=9)
    shell._handler(True)(packet)
    assert packet.verdict == ("accept" if shell.fail_open else "drop")
    assert shell.unclassified == 1 and shell.indexes_wanted.is_set()
    shell._handler(False)(FakePacket(outdev=5, payload=to("10.77.100.99")))
    assert shell.unclassified == 2
    # The tap came back under index 9: found from then on.
    assert shell.set_indexes({"br0": 5, "tap-a": 9, "tap-b": 8})
    packet = FakePacket(indev=9)
    shell._handler(True)(packet)
    assert packet.verdict == "accept" and shell.unclassified == 2
