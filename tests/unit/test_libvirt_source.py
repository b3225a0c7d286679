"""interceptor.libvirt_source's pure core: domain XML → VM entries, and readings → events."""

from __future__ import annotations

import pytest

from interceptor import libvirt_source as ls
from interceptor.libvirt_source import (
    Appeared,
    Changed,
    DomainXmlError,
    Gone,
    Inventory,
    addresses_by_mac,
    parse_domain,
    skin_metadata,
    with_addresses,
)

UUID = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"


def domain_xml(interfaces: str, *, running: bool = True, metadata: str = "", name: str = "web",
               uuid: str = UUID) -> str:
    """A domain as ``virsh dumpxml`` prints it (trimmed to what matters here)."""
    domain_id = " id='7'" if running else ""
    return f"""<domain type='kvm'{domain_id}>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  {metadata}
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static'>1</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/{name}.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    {interfaces}
    <console type='pty'><target type='serial' port='0'/></console>
  </devices>
</domain>"""


BRIDGE_RUNNING = """
    <interface type='bridge'>
      <mac address='52:54:00:6B:3C:58'/>
      <source bridge='br0'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>"""

NETSKIN_META = "<metadata><netskin:skin xmlns:netskin='https://netskin.dev/xmlns/1' name='3g-average'/></metadata>"


def test_one_nic_on_a_bridge_is_the_vm_named_by_the_domain():
    view = parse_domain(domain_xml(BRIDGE_RUNNING, metadata=NETSKIN_META))
    assert (view.name, view.uuid, view.running, view.skin, view.problems) == ("web", UUID, True, "3g-average", ())
    (vm,) = view.vms
    assert vm == ls.LibvirtVm(name="web", domain="web", uuid=UUID, iface="net0", kind="bridge", tap="vnet3",
                              mac="52:54:00:6b:3c:58", mtu=1500, bridge="br0", skin="3g-average", running=True)


def test_two_nics_are_domain_slash_alias_and_keep_their_own_mtu():
    interfaces = BRIDGE_RUNNING + """
    <interface type='bridge'>
      <mac address='52:54:00:aa:00:02'/>
      <source bridge='br-storage'/>
      <target dev='vnet4'/>
      <model type='virtio'/>
      <mtu size='9000'/>
      <alias name='ua-storage'/>
    </interface>"""
    view = parse_domain(domain_xml(interfaces))
    assert [(vm.name, vm.iface, vm.tap, vm.bridge, vm.mtu) for vm in view.vms] == [
        ("web/net0", "net0", "vnet3", "br0", 1500),
        ("web/storage", "storage", "vnet4", "br-storage", 9000),  # a user alias, without libvirt's "ua-"
    ]
    assert {vm.skin for vm in view.vms} == {None}


def test_an_ethernet_interface_is_its_tap_with_no_bridge():
    interfaces = """
    <interface type='ethernet'>
      <mac address='02:77:00:00:01:02'/>
      <target dev='tap-web' managed='yes'/>
      <model type='virtio'/>
      <mtu size='1400'/>
      <alias name='net0'/>
    </interface>"""
    (vm,) = parse_domain(domain_xml(interfaces)).vms
    assert (vm.kind, vm.tap, vm.bridge, vm.network, vm.mac, vm.mtu) == ("ethernet", "tap-web", None, None,
                                                                        "02:77:00:00:01:02", 1400)


def test_a_network_backed_interface_names_the_network_and_while_running_its_bridge():
    running = """
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default' portid='b6f3b1b4-5a0f-4d59-93c8-9e3f1bd3e7a1' bridge='virbr0'/>
      <target dev='vnet0'/>
      <model type='virtio'/>
      <alias name='net0'/>
    </interface>"""
    (vm,) = parse_domain(domain_xml(running)).vms
    assert (vm.kind, vm.network, vm.bridge, vm.tap) == ("network", "default", "virbr0", "vnet0")
    inactive = """
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>"""
    (vm,) = parse_domain(domain_xml(inactive, running=False)).vms
    assert (vm.network, vm.bridge, vm.tap, vm.running) == ("default", None, None, False)


def test_a_shut_off_domain_has_no_tap_and_its_nics_are_numbered_by_order():
    interfaces = """
    <interface type='bridge'>
      <mac address='52:54:00:00:00:01'/>
      <source bridge='br0'/>
      <model type='virtio'/>
    </interface>
    <interface type='ethernet'>
      <mac address='52:54:00:00:00:02'/>
      <target dev='tap-fixed' managed='yes'/>
      <model type='virtio'/>
    </interface>"""
    view = parse_domain(domain_xml(interfaces, running=False))
    assert not view.running
    assert [(vm.name, vm.tap) for vm in view.vms] == [("web/net0", None), ("web/net1", "tap-fixed")]
    # A shut-off domain's VMs are not in the inventory: nothing to steer until it runs.
    assert Inventory().domain(view) == []


def test_interfaces_without_a_host_side_device_are_ignored_with_a_reason():
    interfaces = BRIDGE_RUNNING + """
    <interface type='direct'>
      <mac address='52:54:00:00:00:09'/>
      <source dev='eth0' mode='bridge'/>
      <target dev='macvtap0'/>
      <alias name='net1'/>
    </interface>
    <interface type='user'>
      <mac address='52:54:00:00:00:0a'/>
      <alias name='net2'/>
    </interface>"""
    view = parse_domain(domain_xml(interfaces))
    assert [vm.name for vm in view.vms] == ["web"]  # one VM left: named by the domain alone
    assert len(view.problems) == 2
    assert "interface net1 ignored" in view.problems[0] and "macvtap" in view.problems[0]
    assert "interface net2 ignored" in view.problems[1] and "no host-side device" in view.problems[1]


@pytest.mark.parametrize("metadata, skin, problem", [
    ("", None, None),
    ("<metadata><other:x xmlns:other='https://example.org/x' name='y'/></metadata>", None, None),
    (NETSKIN_META, "3g-average", None),
    ("<metadata><netskin:skin xmlns:netskin='https://netskin.dev/xmlns/1'/></metadata>", None, "has no name"),
    ("<metadata><netskin:skin xmlns:netskin='https://netskin.dev/xmlns/1' name='../etc'/></metadata>", None,
     "not a valid skin name"),
    ("<metadata><netskin:vm xmlns:netskin='https://netskin.dev/xmlns/1' skin='3g'/></metadata>", None,
     "expected <skin name=...>"),
])
def test_the_skin_comes_from_netskins_metadata_element(metadata, skin, problem):
    view = parse_domain(domain_xml(BRIDGE_RUNNING, metadata=metadata))
    assert view.skin == skin and view.vms[0].skin == skin
    if problem is None:
        assert view.problems == ()
    else:
        (line,) = view.problems
        assert line.startswith("domain web: netskin metadata") and problem in line
        assert "virsh metadata web --uri https://netskin.dev/xmlns/1 --key netskin" in line or "valid" in line


def test_the_metadata_element_round_trips():
    text = skin_metadata("3g")
    assert text == '<skin name="3g" />'
    meta = f"<metadata><netskin:skin xmlns:netskin='{ls.NETSKIN_XMLNS}' name='3g'/></metadata>"
    assert parse_domain(domain_xml(BRIDGE_RUNNING, metadata=meta)).skin == "3g"
    with pytest.raises(ValueError):
        skin_metadata("no spaces")


@pytest.mark.parametrize("xml, message", [
    ("<domain><name>x</name>", "not well-formed"),
    ("<network><name>x</name></network>", "expected a <domain>"),
    ("<domain><name>x</name></domain>", "without <name> or <uuid>"),
])
def test_unreadable_domain_xml_is_an_error_with_context(xml, message):
    with pytest.raises(DomainXmlError, match=message):
        parse_domain(xml)


def test_a_bad_mtu_is_reported_and_taken_as_the_default():
    interfaces = BRIDGE_RUNNING.replace("<model type='virtio'/>", "<model type='virtio'/><mtu size='big'/>")
    view = parse_domain(domain_xml(interfaces))
    assert view.vms[0].mtu == 1500 and "is not a number" in view.problems[0]


def test_lease_addresses_fill_in_by_mac():
    leases = {  # virDomain.interfaceAddresses(VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE)
        "vnet3": {"hwaddr": "52:54:00:6B:3C:58", "addrs": [
            {"type": 1, "addr": "fe80::5054:ff:fe6b:3c58", "prefix": 64},
            {"type": 0, "addr": "192.168.122.45", "prefix": 24},
            {"type": 1, "addr": "fd00:122::45", "prefix": 64},
        ]},
        "vnet9": {"hwaddr": "52:54:00:ff:ff:ff", "addrs": None},
    }
    by_mac = addresses_by_mac(leases)
    assert by_mac == {"52:54:00:6b:3c:58": ("192.168.122.45", "fd00:122::45"), "52:54:00:ff:ff:ff": (None, None)}
    (vm,) = with_addresses(parse_domain(domain_xml(BRIDGE_RUNNING)), by_mac).vms
    assert (vm.address, vm.address6) == ("192.168.122.45", "fd00:122::45")


def test_the_inventory_follows_a_domain_through_start_change_stop_and_undefine():
    inventory = Inventory()
    off = parse_domain(domain_xml(BRIDGE_RUNNING.replace("<target dev='vnet3'/>", ""), running=False))
    assert inventory.domain(off) == []

    on = parse_domain(domain_xml(BRIDGE_RUNNING, metadata=NETSKIN_META))
    assert inventory.domain(on) == [Appeared(on.vms[0])]
    assert inventory.domain(on) == []  # the same reading again: nothing new

    reskinned = parse_domain(domain_xml(BRIDGE_RUNNING, metadata=NETSKIN_META.replace("3g-average", "edge")))
    assert inventory.domain(reskinned) == [Changed(reskinned.vms[0], on.vms[0])]

    assert inventory.domain(off) == [Gone(reskinned.vms[0])]
    restarted = parse_domain(domain_xml(BRIDGE_RUNNING.replace("vnet3", "vnet8")))
    assert inventory.domain(restarted) == [Appeared(restarted.vms[0])]
    assert inventory.vms["web"].tap == "vnet8"
    assert inventory.undefined(UUID) == [Gone(restarted.vms[0])]
    assert inventory.vms == {}


def test_a_second_nic_renames_the_first_and_the_snapshot_drops_what_it_lacks():
    inventory = Inventory()
    one = parse_domain(domain_xml(BRIDGE_RUNNING))
    other = parse_domain(domain_xml(BRIDGE_RUNNING.replace("vnet3", "vnet5"), name="db",
                                    uuid="11111111-2222-3333-4444-555555555555"))
    assert [type(e) for e in inventory.snapshot([one, other])] == [Appeared, Appeared]
    two = parse_domain(domain_xml(BRIDGE_RUNNING + BRIDGE_RUNNING.replace("net0", "net1").replace("vnet3", "vnet4")))
    events = inventory.domain(two)
    assert [(type(e).__name__, e.vm.name) for e in events] == [
        ("Gone", "web"), ("Appeared", "web/net0"), ("Appeared", "web/net1")]
    # After a reconnect the listing holds only db: web's VMs are gone, db is unchanged.
    assert [(type(e).__name__, e.vm.name) for e in inventory.snapshot([other])] == [
        ("Gone", "web/net0"), ("Gone", "web/net1")]


def test_a_name_taken_over_by_another_domain_is_gone_then_appeared():
    inventory = Inventory()
    first = parse_domain(domain_xml(BRIDGE_RUNNING))
    inventory.domain(first)
    second = parse_domain(domain_xml(BRIDGE_RUNNING, uuid="99999999-2222-3333-4444-555555555555"))
    assert inventory.domain(second) == [Gone(first.vms[0]), Appeared(second.vms[0])]


def test_the_module_imports_without_the_binding_and_says_how_to_get_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_libvirt(name, *args, **kwargs):
        if name == "libvirt":
            raise ImportError("No module named 'libvirt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_libvirt)
    with pytest.raises(ls.LibvirtUnavailable, match=r"pip install 'netskin\[libvirt\]'"):
        ls.load_binding()
