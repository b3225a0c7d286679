"""Which VM a queued packet belongs to, from the devices the kernel reports with it.

A group of VMs shares one NFQUEUE queue pair, so the queue no longer says whose a packet is. The
kernel hands every queued packet its device indexes (netfilterqueue's ``indev``, ``outdev``,
``physindev``, ``physoutdev``; 0 when not applicable), and these say it in one dict lookup:

* uplink (PREROUTING): ``indev`` is the VM's tap or veth when routed; for a bridge port ``indev``
  is the bridge and ``physindev`` the port.
* downlink (POSTROUTING): ``outdev`` is the VM's device when routed; a bridged packet has the
  bridge as ``outdev`` and the port as ``physoutdev``; a packet the host routes onto a bridge has
  no port yet (``physoutdev`` 0) and is told by its destination address (the kernel steered it by
  that address too). ``indev`` is never used downlink: a forwarded packet's ``indev`` is the
  sender's device.

Pure: the map from interface names to indexes is handed in (``set_indexes``) by the shell, which
reads it from the kernel at start and again whenever an unknown device shows up (a tap recreated
gets a new index). Lookups are O(1) in the number of VMs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Classifier(Generic[T]):
    """Interface names and addresses of each VM's target (a ``VmPath``) → O(1) lookups."""

    def __init__(self) -> None:
        self.by_index: dict[int, T] = {}  # ifindex → target; updated in place (the shell binds it)
        self.by_address: dict[bytes, T] = {}  # packed IPv4/IPv6 destination → target
        self._by_name: dict[str, T] = {}
        self.indexes: dict[str, int] = {}  # the VM interfaces' indexes in force

    def add(self, interface: str, target: T, addresses: Iterable[str | None] = ()) -> None:
        if interface in self._by_name:
            raise ValueError(f"interface {interface} belongs to two VMs")
        self._by_name[interface] = target
        for address in addresses:
            if address:
                self.by_address[ipaddress.ip_address(address).packed] = target

    def remove(self, interface: str) -> None:
        """Forget ``interface`` and its addresses (the VM went away); lookups stop finding it."""
        target = self._by_name.pop(interface, None)
        if target is None:
            return
        for address in [a for a, t in self.by_address.items() if t is target]:
            del self.by_address[address]
        index = self.indexes.pop(interface, None)
        if index is not None:
            self.by_index.pop(index, None)

    def set_indexes(self, indexes: Mapping[str, int]) -> bool:
        """Take the kernel's current name → index map; whether any VM interface's index changed."""
        wanted = {name: indexes[name] for name in self._by_name if indexes.get(name)}
        if wanted == self.indexes:
            return False
        self.indexes = wanted
        self.by_index.clear()
        self.by_index.update({index: self._by_name[name] for name, index in wanted.items()})
        return True

    def uplink(self, indev: int, physindev: int) -> T | None:
        target = self.by_index.get(indev)
        return target if target is not None else self.by_index.get(physindev)

    def downlink(self, outdev: int, physoutdev: int, payload: bytes | None) -> T | None:
        target = self.by_index.get(outdev)
        if target is None:
            target = self.by_index.get(physoutdev)
            if target is None and payload is not None:
                target = self.by_address.get(destination_of(payload))
        return target


def destination_of(payload: bytes) -> bytes | None:
    """The packed destination address of an IPv4 or IPv6 packet (None if too short)."""
    version = payload[0] >> 4 if payload else 0
    if version == 4 and len(payload) >= 20:
        return payload[16:20]
    if version == 6 and len(payload) >= 40:
        return payload[24:40]
    return None
