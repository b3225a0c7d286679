"""Which VM a queued packet belongs to, from the devices the kernel reports (pure)."""

from __future__ import annotations

import ipaddress

from interceptor.engine.classify import Classifier, destination_of


def ipv4_to(address: str) -> bytes:
    return bytes([0x45]) + bytes(15) + ipaddress.ip_address(address).packed


def ipv6_to(address: str) -> bytes:
    return bytes([0x60]) + bytes(23) + ipaddress.ip_address(address).packed


def classifier() -> Classifier[str]:
    c: Classifier[str] = Classifier()
    c.add("tap-a", "a", ("10.0.0.2", None))
    c.add("tap-b", "b", ("10.77.100.3", "fd77:100::3"))  # a bridge port
    c.set_indexes({"lo": 1, "br0": 5, "tap-a": 7, "tap-b": 8, "eth0": 2})
    return c


def test_uplink_by_the_incoming_device_or_the_bridge_port():
    c = classifier()
    assert c.uplink(7, 0) == "a"  # routed tap
    assert c.uplink(5, 8) == "b"  # bridged: indev is the bridge, physindev the port
    assert c.uplink(2, 0) is None  # no VM's device: the caller applies fail_mode


def test_downlink_by_the_outgoing_device_the_port_or_the_destination():
    c = classifier()
    assert c.downlink(7, 0, None) == "a"
    assert c.downlink(5, 8, None) == "b"  # bridged
    assert c.downlink(5, 0, ipv4_to("10.77.100.3")) == "b"  # routed onto the bridge: no port yet
    assert c.downlink(5, 0, ipv6_to("fd77:100::3")) == "b"
    assert c.downlink(5, 0, ipv4_to("10.77.100.99")) is None
    assert c.downlink(2, 0, b"") is None


def test_a_recreated_interface_is_found_under_its_new_index():
    c = classifier()
    assert not c.set_indexes({"lo": 1, "br0": 5, "tap-a": 7, "tap-b": 8, "eth9": 3})  # no VM device moved
    assert c.set_indexes({"lo": 1, "br0": 5, "tap-a": 17, "tap-b": 8})
    assert c.uplink(7, 0) is None and c.uplink(17, 0) == "a"
    assert c.set_indexes({"lo": 1})  # gone: nothing of theirs is known
    assert c.by_index == {} and c.indexes == {}


def test_the_index_map_is_updated_in_place():
    c = classifier()
    bound = c.by_index  # the shell binds this dict once
    c.set_indexes({"tap-a": 70})
    assert bound is c.by_index and bound == {70: "a"}


def test_destination_of_a_short_or_odd_packet_is_none():
    assert destination_of(b"") is None
    assert destination_of(bytes([0x45]) + bytes(10)) is None
    assert destination_of(bytes([0x10]) + bytes(40)) is None
    assert destination_of(ipv4_to("1.2.3.4")) == bytes([1, 2, 3, 4])


def test_many_vms_one_lookup_each():
    c: Classifier[int] = Classifier()
    for i in range(500):
        c.add(f"tap{i}", i, (f"10.1.{i // 250}.{i % 250 + 1}",))
    c.set_indexes({f"tap{i}": 100 + i for i in range(500)})
    assert c.uplink(100 + 499, 0) == 499 and c.downlink(0, 100 + 250, None) == 250
    assert len(c.by_index) == 500
