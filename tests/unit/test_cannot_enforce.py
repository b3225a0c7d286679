"""What the host knows at once it cannot set on a VM: refused before any swap, one line each."""

from __future__ import annotations

import pytest

from interceptor.reconcile import cannot_enforce
from interceptor.schema import VmConfig, compile_document

GUEST = VmConfig(interface="tap-vm1", address="10.77.1.2")  # no netns: a real guest behind a tap
NETNS_VM = VmConfig(interface="veth-vm1", address="10.77.1.2", netns="lab-vm1")
MAC = "52:54:00:12:34:56"


def skin(**fields):
    return compile_document({"name": "s", **fields}, "s")


@pytest.mark.parametrize(("fields", "field_name"), [
    ({"mac_address": MAC}, "mac_address"),
    ({"mtu": 1400}, "mtu"),
])
def test_a_guest_refuses_what_only_its_own_kernel_could_set(fields, field_name):
    reasons = cannot_enforce(GUEST, skin(latency_ms=10, **fields))
    assert len(reasons) == 1
    line = reasons[0]
    assert line.startswith(f"{field_name} ") and "tap-vm1" in line and "\n" not in line
    assert f'optional = ["{field_name}"]' in line  # and says what would make it work


def test_both_fields_give_one_line_each():
    assert [r.split()[0] for r in cannot_enforce(GUEST, skin(mac_address=MAC, mtu=1400))] == ["mac_address", "mtu"]


@pytest.mark.parametrize("fields", [
    {"mac_address": MAC, "optional": ["mac_address"]},
    {"mtu": 1400, "optional": ["mtu"]},
    {"latency_ms": 50},
])
def test_optional_fields_and_skins_without_identity_pass(fields):
    assert cannot_enforce(GUEST, skin(**fields)) == []


def test_a_vm_in_a_netns_can_have_both_set():
    assert cannot_enforce(NETNS_VM, skin(mac_address=MAC, mtu=1400)) == []


@pytest.mark.parametrize("fields", [{"mac_address": MAC}, {"mtu": 1400}])
def test_a_libvirt_vm_is_told_to_change_its_domain_xml(fields):
    (line,) = cannot_enforce(GUEST, skin(**fields), domain="web")
    assert "libvirt domain web" in line and "virsh edit web" in line and "optional" in line
