"""manager.libvirt_lab's pure part: the lab guest's domain XML, read back by netskin's source."""

from __future__ import annotations

from pathlib import Path

from interceptor.libvirt_source import parse_domain
from manager.libvirt_lab import GuestDomain, LabLibvirt, guest_domain_xml


def test_the_lab_guest_domain_reads_back_as_its_vms():
    guest = GuestDomain(name="g1", address="10.77.201.2/24", gateway="10.77.201.1", tap="lvtap0",
                        mac="02:77:00:00:c9:02", console_path=Path("/run/lab/g1.console"),
                        serial_log=Path("/run/lab/g1.serial.log"), mtu=1400, bridge="lvbr0", skin="3g")
    xml = guest_domain_xml(guest, Path("/cache/vmlinuz"), Path("/cache/initrd.gz"), "tcg")
    assert "<domain type=\"qemu\">" in xml and "<cpu mode='maximum'/>" in xml
    assert "netskin.ip=10.77.201.2/24 netskin.gw=10.77.201.1" in xml and "netskin.mtu=1400" in xml
    # libvirt gives the domain its uuid when it is defined.
    view = parse_domain(xml.replace("</name>", "</name><uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>", 1))
    assert (view.name, view.running, view.skin, view.problems) == ("g1", False, "3g", ())
    assert [(vm.name, vm.kind, vm.tap, vm.bridge, vm.mac, vm.mtu) for vm in view.vms] == [
        ("g1/net0", "ethernet", "lvtap0", None, "02:77:00:00:c9:02", 1400),
        ("g1/net1", "bridge", None, "lvbr0", "02:77:00:00:c9:12", 1500),
    ]
    assert "type=\"kvm\"" in guest_domain_xml(guest, Path("/k"), Path("/i"), "kvm")


def test_the_lab_libvirt_is_reached_through_its_own_sockets():
    lab = LabLibvirt(Path("/run/netskin-lab/x/libvirt"), 1, "x-hv")
    assert lab.uri == "qemu+unix:///system?socket=/run/netskin-lab/x/libvirt/sock/libvirt-sock"
    assert lab.uri_ro.endswith("/sock/libvirt-sock-ro")
