"""A VM's network identity (address, MAC, MTU, resolvers): read it, change it, put it back.

Everything goes through netlink (pyroute2), in two places: the host side, in the network
namespace this process runs in (the daemon enters ``host_netns`` at start), and the VM side,
inside the VM's own namespace when the host config names one (``vm.netns``). A VM without a
namespace is a real guest: the host can read what it sees of it but cannot change its MAC.

Two kernel behaviours shape this module. A veth or tap MTU below 1280 makes the kernel drop the
device's whole IPv6 state (addresses and routes), so ``capture`` records the static IPv6 setup
of both ends and ``restore`` (or ``set_mtu`` given the original) adds back what went missing.
And proxy ARP (``claim_address``) only answers for an address whose route leaves through another
device than the one the request came in on, with forwarding on (``arp_process`` in
net/ipv4/arp.c): hence the proxy entry *and* a /32 route to the VM.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Interface, ip_address, ip_interface
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD, IFA_F_PERMANENT

from interceptor.schema import VmConfig

NETNS_CONF_DIR = Path("/etc/netns")  # `ip netns exec` bind-mounts /etc/netns/NS/* over /etc/*
IPV6_MIN_MTU = 1280  # below it the kernel tears down the device's IPv6 state
MAIN_TABLE, LOCAL_TABLE = 254, 255
RTN_UNICAST = 1
RT_SCOPE_LINK = 253
RTPROT_STATIC = 4
# Routes the kernel makes and remakes by itself: connected prefixes, router advertisements, redirects.
_KERNEL_PROTOS = frozenset({1, 2, 9})
# Neighbour states that carry no usable link-layer address.
_NUD_USELESS = ndmsg.NUD_INCOMPLETE | ndmsg.NUD_FAILED | ndmsg.NUD_NOARP

FIELDS = ("address", "address6", "mac", "mtu", "host_mtu", "resolvers", "interface")


class IdentityError(RuntimeError):
    """The host cannot read or change part of a VM's identity; the message says which and why."""


@dataclass(frozen=True)
class Route:
    """One route through an interface, as much of it as is needed to add it back."""

    dst: str  # a prefix: "0.0.0.0/0", "::/0", "fd77::/16"
    gateway: str | None
    table: int = MAIN_TABLE
    priority: int | None = None
    proto: int = RTPROT_STATIC


@dataclass(frozen=True)
class InterfaceSetup:
    """The static addresses and routes of one interface (what a link down or low MTU can take)."""

    addresses: tuple[str, ...] = ()  # "fd77:1::2/64"
    routes: tuple[Route, ...] = ()

    def to_json(self) -> dict:
        return {"addresses": list(self.addresses), "routes": [asdict(route) for route in self.routes]}

    @classmethod
    def from_json(cls, data: dict | None) -> InterfaceSetup | None:
        if data is None:
            return None
        return cls(
            addresses=tuple(data.get("addresses", ())),
            routes=tuple(Route(**route) for route in data.get("routes", ())),
        )


@dataclass(frozen=True)
class Original:
    """A VM's identity before netskin touched it: what ``restore`` puts back.

    ``readable`` names the fields the host actually read; the others are taken from the host
    config (``address``, ``address6``) or unknown (None, empty), and ``restore`` leaves them alone.
    """

    address: str  # "10.77.1.2/24", or the configured "10.77.1.2" when it could not be read
    address6: str | None = None  # "fd77:1::2/64"
    mac: str | None = None  # of the VM-side interface
    mtu: int | None = None  # of the VM-side interface (unknown for a VM without netns: a guest)
    host_mtu: int | None = None  # of the host-side device
    resolvers: tuple[str, ...] = ()  # nameserver IPs from the VM's resolv.conf
    interface: str | None = None  # the VM-side interface inside its netns, e.g. "eth0"
    readable: tuple[str, ...] = ()
    # Static IPv6 setup of each end, re-added when an MTU below 1280 made the kernel drop it.
    ipv6: InterfaceSetup | None = None
    host_ipv6: InterfaceSetup | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data["resolvers"] = list(self.resolvers)
        data["readable"] = list(self.readable)
        data["ipv6"] = self.ipv6.to_json() if self.ipv6 else None
        data["host_ipv6"] = self.host_ipv6.to_json() if self.host_ipv6 else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> Original:
        return cls(
            address=data["address"],
            address6=data.get("address6"),
            mac=data.get("mac"),
            mtu=data.get("mtu"),
            host_mtu=data.get("host_mtu"),
            resolvers=tuple(data.get("resolvers") or ()),
            interface=data.get("interface"),
            readable=tuple(data.get("readable") or ()),
            ipv6=InterfaceSetup.from_json(data.get("ipv6")),
            host_ipv6=InterfaceSetup.from_json(data.get("host_ipv6")),
        )


# --- reading ---------------------------------------------------------------------------------


def capture(vm_name: str, vm: VmConfig) -> Original:
    """Read the VM's identity as it is now (before the first skin)."""
    label = _label(vm, vm_name)
    readable: list[str] = []
    host_mtu, host_ipv6 = None, None
    with _host(label) as host:
        host_index = _lookup(host, vm.interface)
        if host_index is not None:
            host_mtu = _link(host, host_index).get_attr("IFLA_MTU")
            host_ipv6 = _read_setup(host, host_index, (socket.AF_INET6,))
            readable.append("host_mtu")

    if vm.netns is None:
        # A guest: its own MAC is not the host's to read. The neighbour table may hold it by
        # chance (only if the guest spoke lately, never for a quiet one), so the original does not
        # take it from there; a libvirt VM's comes from its domain XML instead.
        return Original(
            address=str(vm.address),
            address6=None if vm.address6 is None else str(vm.address6),
            mac=None,
            mtu=None,  # the guest's own MTU is out of the host's reach (host_mtu is the path's)
            host_mtu=host_mtu,
            readable=tuple(readable),
            host_ipv6=host_ipv6,
        )

    address, address6, mac, mtu, interface, ipv6 = str(vm.address), None, None, None, None, None
    with _vm_netns(vm, label) as ipr:
        index = _find_vm_interface(ipr, vm)
        if index is not None:
            link = _link(ipr, index)
            interface = link.get_attr("IFLA_IFNAME")
            mac = link.get_attr("IFLA_ADDRESS")
            mtu = link.get_attr("IFLA_MTU")
            ipv6 = _read_setup(ipr, index, (socket.AF_INET6,))
            readable += ["interface", "mac", "mtu"]
            found4 = _interface_address(ipr, index, socket.AF_INET, str(vm.address))
            if found4 is not None:
                address = found4
                readable.append("address")
            found6 = _interface_address(
                ipr, index, socket.AF_INET6, None if vm.address6 is None else str(vm.address6)
            )
            if found6 is not None:
                address6 = found6
                readable.append("address6")
    if address6 is None and vm.address6 is not None:
        address6 = str(vm.address6)
    resolvers = _resolvers(vm.netns, label)
    if resolvers is not None:
        readable.append("resolvers")
    return Original(
        address=address,
        address6=address6,
        mac=mac,
        mtu=mtu,
        host_mtu=host_mtu,
        resolvers=tuple(resolvers or ()),
        interface=interface,
        readable=tuple(name for name in FIELDS if name in readable),
        ipv6=ipv6,
        host_ipv6=host_ipv6,
    )


def read(vm: VmConfig, original: Original | None = None, *, vm_name: str | None = None) -> dict:
    """The identity settings as they are now: ``{"mac", "mtu", "host_mtu"}`` (None: unreadable;
    without a netns the guest's own MTU always is)."""
    label = _label(vm, vm_name)
    with _host(label) as host:
        index = _lookup(host, vm.interface)
        host_mtu = None if index is None else _link(host, index).get_attr("IFLA_MTU")
        if vm.netns is None:  # one netlink socket for both reads (a start-up reads every VM)
            mac = None if index is None else _neighbour_mac(host, index, vm, label)
            return {"mac": mac, "mtu": None, "host_mtu": host_mtu}
    with _vm_netns(vm, label) as ipr:
        index = _find_vm_interface(ipr, vm, original.interface if original else None)
        if index is None:
            return {"mac": None, "mtu": None, "host_mtu": host_mtu}
        link = _link(ipr, index)
        return {"mac": link.get_attr("IFLA_ADDRESS"), "mtu": link.get_attr("IFLA_MTU"), "host_mtu": host_mtu}


def _resolvers(netns: str, label: str) -> list[str] | None:
    try:
        text = (NETNS_CONF_DIR / netns / "resolv.conf").read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise IdentityError(f"{label}: cannot read {NETNS_CONF_DIR / netns / 'resolv.conf'}: {exc.strerror}") from exc
    servers = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                servers.append(str(ip_address(words[1].split("%", 1)[0])))
            except ValueError:
                continue  # resolv.conf ignores what it cannot parse; so do we
    return servers


def _neighbour_mac(host: IPRoute, index: int, vm: VmConfig, label: str) -> str | None:
    """The VM's MAC as the host's neighbour table knows it on the VM's device (``index``), if it does."""
    for entry in _call(label, "read the neighbour table", host.get_neighbours, ifindex=index,
                       family=socket.AF_INET):
        if (entry.get_attr("NDA_DST") == str(vm.address) and entry.get_attr("NDA_LLADDR")
                and not entry["state"] & _NUD_USELESS):
            return entry.get_attr("NDA_LLADDR")
    return None


def has_interface(interface: str) -> bool:
    """Whether the host-side device exists (in the current network namespace)."""
    try:
        with IPRoute() as host:
            return _lookup(host, interface) is not None
    except NetlinkError:
        return False


def bridge_of(interface: str) -> str | None:
    """The Linux bridge whose port ``interface`` is (in the current network namespace), or None."""
    try:
        with IPRoute() as host:
            index = _lookup(host, interface)
            if index is None:
                return None
            master = _link(host, index).get_attr("IFLA_MASTER")
            if not master:
                return None
            link = _link(host, master)
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            return link.get_attr("IFLA_IFNAME") if kind == "bridge" else None
    except NetlinkError:
        return None


# --- changing --------------------------------------------------------------------------------


def set_mac(vm: VmConfig, mac: str, *, vm_name: str | None = None, interface: str | None = None) -> None:
    """Give the VM's interface this MAC, keeping its addresses and routes.

    veth (and most drivers) take a new MAC while up; for one that answers EBUSY the link goes
    down for the change and its addresses and routes are put back. The host forgets the VM's old
    MAC at once, so its next packet to the VM is not sent to an address nobody answers to.
    """
    label = _label(vm, vm_name)
    if vm.netns is None:
        raise IdentityError(f"{label} has no netns in the host config: the host cannot set its MAC")
    with _vm_netns(vm, label) as ipr:
        index = _require_vm_interface(ipr, vm, label, interface)
        old_mac = _link(ipr, index).get_attr("IFLA_ADDRESS")
        if old_mac == mac.lower():
            return
        try:
            ipr.link("set", index=index, address=mac)
        except NetlinkError as exc:
            if exc.code != errno.EBUSY:
                raise _error(label, f"set MAC {mac}", exc) from exc
            _set_mac_with_link_down(ipr, index, mac, label)
    _forget_neighbour(vm, old_mac, label)


def set_mtu(vm: VmConfig, mtu: int, original: Original | None = None, *, vm_name: str | None = None,
            interface: str | None = None) -> None:
    """Set the MTU on the VM's interface (when it has a netns) and on the host-side device.

    The host-side MTU is what makes the kernel answer forwarded traffic towards the VM with ICMP
    "fragmentation needed" / "packet too big". Given ``original``, an MTU of 1280 or more also
    brings back the IPv6 addresses and routes a lower MTU made the kernel drop.
    """
    label = _label(vm, vm_name)
    previous = None
    if vm.netns is not None:
        with _vm_netns(vm, label) as ipr:
            index = _require_vm_interface(ipr, vm, label, interface or (original.interface if original else None))
            link = _link(ipr, index)
            interface, previous = link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_MTU")
            _set_link_mtu(ipr, index, mtu, label)
            if original is not None and original.ipv6 and mtu >= IPV6_MIN_MTU:
                _reapply(ipr, index, original.ipv6, label)
    try:
        with _host(label) as host:
            index = _require_host_interface(host, vm, label)
            _set_link_mtu(host, index, mtu, label)
            if original is not None and original.host_ipv6 and mtu >= IPV6_MIN_MTU:
                _reapply(host, index, original.host_ipv6, label)
    except IdentityError:
        if previous is not None and previous != mtu:  # do not leave the two ends disagreeing
            with _vm_netns(vm, label) as ipr:
                _set_link_mtu(ipr, _require_vm_interface(ipr, vm, label, interface), previous, label)
        raise


def restore(vm: VmConfig, original: Original, *, vm_name: str | None = None) -> None:
    """Put back the MAC, MTU and host-side MTU that ``capture`` read, and any IPv6 setup lost."""
    label = _label(vm, vm_name)
    if vm.netns is not None and {"mac", "mtu"} & set(original.readable):
        with _vm_netns(vm, label) as ipr:
            index = _require_vm_interface(ipr, vm, label, original.interface)
            link = _link(ipr, index)
            if "mtu" in original.readable and link.get_attr("IFLA_MTU") != original.mtu:
                _set_link_mtu(ipr, index, original.mtu, label)
            if original.ipv6 and (original.mtu or 0) >= IPV6_MIN_MTU:
                _reapply(ipr, index, original.ipv6, label)
        if "mac" in original.readable and original.mac:
            set_mac(vm, original.mac, vm_name=vm_name, interface=original.interface)
    if "host_mtu" in original.readable:
        with _host(label) as host:
            index = _require_host_interface(host, vm, label)
            if _link(host, index).get_attr("IFLA_MTU") != original.host_mtu:
                _set_link_mtu(host, index, original.host_mtu, label)
            if original.host_ipv6 and (original.host_mtu or 0) >= IPV6_MIN_MTU:
                _reapply(host, index, original.host_ipv6, label)


def _set_link_mtu(ipr: IPRoute, index: int, mtu: int, label: str) -> None:
    try:
        ipr.link("set", index=index, mtu=mtu)
    except NetlinkError as exc:
        raise _error(label, f"set MTU {mtu} on {_ifname(ipr, index)}", exc) from exc


def _set_mac_with_link_down(ipr: IPRoute, index: int, mac: str, label: str) -> None:
    """Change the MAC of a link that refuses it while up; a down link loses its routes (and,
    unless keep_addr_on_down, its IPv6 addresses), so both are read first and put back."""
    setup = _read_setup(ipr, index, (socket.AF_INET, socket.AF_INET6))
    try:
        ipr.link("set", index=index, state="down")
        ipr.link("set", index=index, address=mac)
    except NetlinkError as exc:
        raise _error(label, f"set MAC {mac} with the link down", exc) from exc
    finally:
        ipr.link("set", index=index, state="up")
        _reapply(ipr, index, setup, label)


def _forget_neighbour(vm: VmConfig, old_mac: str | None, label: str) -> None:
    """Drop the host's neighbour entries that still point at the VM's old MAC."""
    if not old_mac:
        return
    with _host(label) as host:
        index = _lookup(host, vm.interface)
        if index is None:
            return
        for family in (socket.AF_INET, socket.AF_INET6):
            for entry in host.get_neighbours(ifindex=index, family=family):
                if entry.get_attr("NDA_LLADDR") == old_mac and entry.get_attr("NDA_DST"):
                    _ignore(errno.ENOENT, host.neigh, "del", dst=entry.get_attr("NDA_DST"), ifindex=index,
                            family=family)


# --- claiming a skin address on a connected subnet --------------------------------------------


def claim_address(ip: str, vm: VmConfig, *, vm_name: str | None = None) -> dict:
    """Make the host answer ARP for ``ip`` on every connected subnet that contains it.

    Needed only when the skin address falls inside a subnet directly connected to a host
    interface other than the VM's: peers there ARP for it instead of routing to the host. Then
    a proxy neighbour entry goes on that interface and a route ``ip/32 dev <vm interface>`` makes
    the kernel's proxy ARP answer. An address the network routes to the host needs nothing
    (returns ``{}``). Idempotent; returns what is claimed, for ``release_address``.
    """
    label = _label(vm, vm_name)
    address = str(IPv4Address(ip))
    with _host(label) as host:
        vm_index = _require_host_interface(host, vm, label)
        connected = _connected_interfaces(host, address, vm_index, label)
        if not connected:
            return {}
        if _link(host, vm_index).get_attr("IFLA_MASTER"):
            raise IdentityError(
                f"{label}: {vm.interface} is a bridge port, so a route cannot steer {address} to it; "
                f"claim the skin address on the bridge instead (not supported)"
            )
        for ifname in connected.values():
            path = Path(f"/proc/sys/net/ipv4/conf/{ifname}/forwarding")
            if path.exists() and path.read_text().strip() == "0":
                raise IdentityError(
                    f"{label}: proxy ARP for {address} on {ifname} needs forwarding; "
                    f"set net.ipv4.conf.{ifname}.forwarding=1"
                )
        routes = _host_routes(host, address)
        for route in routes:
            if route.get_attr("RTA_OIF") != vm_index:
                raise IdentityError(
                    f"{label}: {address} is already routed to {_ifname(host, route.get_attr('RTA_OIF'))} "
                    f"on the host; remove that route or choose another skin address"
                )
        if not routes:
            _call(label, f"add route {address}/32 dev {vm.interface}", host.route, "add", dst=address,
                  dst_len=32, oif=vm_index, scope=RT_SCOPE_LINK, proto=RTPROT_STATIC, table=MAIN_TABLE)
        for index, ifname in connected.items():
            if not _has_proxy(host, address, index):
                _call(label, f"add proxy ARP entry {address} on {ifname}", host.neigh, "add", dst=address,
                      ifindex=index, flags=ndmsg.NTF_PROXY)
    return {"address": address, "route_interface": vm.interface, "proxy_interfaces": sorted(connected.values())}


def release_address(ip: str, vm: VmConfig, *, vm_name: str | None = None) -> dict:
    """Undo ``claim_address``: remove the proxy entries for ``ip`` and its /32 route to the VM.

    Idempotent; returns what was removed, in the shape ``claim_address`` returns.
    """
    label = _label(vm, vm_name)
    address = str(IPv4Address(ip))
    removed_proxies, removed_route = [], False
    with _host(label) as host:
        vm_index = _lookup(host, vm.interface)
        for link in host.get_links():
            index = link["index"]
            if index != vm_index and _has_proxy(host, address, index):
                if _ignore(errno.ENOENT, host.neigh, "del", dst=address, ifindex=index, flags=ndmsg.NTF_PROXY):
                    removed_proxies.append(link.get_attr("IFLA_IFNAME"))
        if vm_index is not None:
            for route in _host_routes(host, address):
                if route.get_attr("RTA_OIF") == vm_index:
                    removed_route |= _ignore(errno.ESRCH, host.route, "del", dst=address, dst_len=32,
                                             oif=vm_index, table=MAIN_TABLE, scope=route["scope"])
    if not removed_proxies and not removed_route:
        return {}
    return {
        "address": address,
        "route_interface": vm.interface if removed_route else None,
        "proxy_interfaces": sorted(removed_proxies),
    }


def _connected_interfaces(host: IPRoute, address: str, vm_index: int, label: str) -> dict[int, str]:
    """Host interfaces (other than the VM's and loopback) whose IPv4 subnet contains address."""
    target = IPv4Address(address)
    found: dict[int, str] = {}
    for msg in host.get_addr(family=socket.AF_INET):
        local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        iface = IPv4Interface(f"{local}/{msg['prefixlen']}")
        ifname = msg.get_attr("IFA_LABEL") or _ifname(host, msg["index"])
        if iface.ip == target:
            raise IdentityError(
                f"{label}: {address} is the host's own address on {ifname}; choose another skin address"
            )
        if msg["index"] == vm_index or iface.ip.is_loopback or msg["prefixlen"] >= 32:
            continue
        if target in iface.network:
            found[msg["index"]] = _ifname(host, msg["index"])
    return found


def _host_routes(host: IPRoute, address: str) -> list:
    return [
        route
        for route in host.route("dump", family=socket.AF_INET)
        if route["dst_len"] == 32 and route.get_attr("RTA_DST") == address and _table(route) == MAIN_TABLE
    ]


def _has_proxy(host: IPRoute, address: str, index: int) -> bool:
    try:
        return bool(host.neigh("get", dst=address, ifindex=index, flags=ndmsg.NTF_PROXY))
    except NetlinkError as exc:
        if exc.code == errno.ENOENT:
            return False
        raise


# --- interface setup: read and put back ---------------------------------------------------------


def _read_setup(ipr: IPRoute, index: int, families: tuple[int, ...]) -> InterfaceSetup:
    """The interface's static (permanent, not link-local) addresses and non-kernel routes."""
    addresses, routes = [], []
    for family in families:
        for msg in ipr.get_addr(family=family, index=index):
            flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
            address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if msg["index"] != index or not flags & IFA_F_PERMANENT:
                continue
            if family == socket.AF_INET6 and ip_address(address).is_link_local:
                continue
            addresses.append(f"{address}/{msg['prefixlen']}")
        for msg in ipr.route("dump", family=family):
            if (msg.get_attr("RTA_OIF") != index or _table(msg) == LOCAL_TABLE
                    or msg["type"] != RTN_UNICAST or msg["proto"] in _KERNEL_PROTOS):
                continue
            default = "0.0.0.0" if family == socket.AF_INET else "::"
            routes.append(Route(
                dst=f"{msg.get_attr('RTA_DST') or default}/{msg['dst_len']}",
                gateway=msg.get_attr("RTA_GATEWAY"),
                table=_table(msg),
                priority=msg.get_attr("RTA_PRIORITY"),
                proto=msg["proto"],
            ))
    return InterfaceSetup(addresses=tuple(addresses), routes=tuple(routes))


def _reapply(ipr: IPRoute, index: int, setup: InterfaceSetup, label: str) -> None:
    """Add back whatever of ``setup`` the interface lacks (addresses first: routes need them)."""
    for address in setup.addresses:
        iface = ip_interface(address)
        # The address was in use on this very link a moment ago: no need to wait for DAD again.
        flags = IFA_F_NODAD if iface.version == 6 else 0
        _call(label, f"add back {address} on {_ifname(ipr, index)}", _ignore, errno.EEXIST, ipr.addr, "add",
              index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen, flags=flags)
    for route in setup.routes:
        network = ip_interface(route.dst).network
        spec: dict[str, Any] = dict(
            family=socket.AF_INET if network.version == 4 else socket.AF_INET6,
            dst_len=network.prefixlen, oif=index, table=route.table, proto=route.proto,
        )
        if network.prefixlen:
            spec["dst"] = str(network.network_address)
        if route.gateway:
            spec["gateway"] = route.gateway
        if route.priority is not None:
            spec["priority"] = route.priority
        _call(label, f"add back route {route.dst} on {_ifname(ipr, index)}", _ignore, errno.EEXIST,
              ipr.route, "add", **spec)


# --- netlink plumbing ----------------------------------------------------------------------------


def _label(vm: VmConfig, vm_name: str | None) -> str:
    return f"VM '{vm_name}'" if vm_name else f"the VM on {vm.interface}"


@contextmanager
def _host(label: str) -> Iterator[IPRoute]:
    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        raise _error(label, "talk to the host's netlink", exc) from exc


@contextmanager
def _vm_netns(vm: VmConfig, label: str) -> Iterator[IPRoute]:
    try:
        # flags=0: a missing namespace is an error, never silently created.
        ipr = IPRoute(netns=vm.netns, flags=0)
    except FileNotFoundError as exc:
        raise IdentityError(
            f"{label}: network namespace '{vm.netns}' not found; check vms.*.netns in the host config"
        ) from exc
    except (OSError, NetlinkError) as exc:
        raise IdentityError(f"{label}: cannot open network namespace '{vm.netns}': {exc}") from exc
    try:
        with ipr:
            yield ipr
    except NetlinkError as exc:
        raise _error(label, f"talk to netlink in network namespace '{vm.netns}'", exc) from exc


def _lookup(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _link(ipr: IPRoute, index: int):
    return ipr.get_links(index)[0]


def _ifname(ipr: IPRoute, index: int | None) -> str:
    if index is None:
        return "?"
    try:
        return _link(ipr, index).get_attr("IFLA_IFNAME")
    except NetlinkError:
        return f"ifindex {index}"


def _table(msg) -> int:
    return msg.get_attr("RTA_TABLE") or msg["table"]


def _find_vm_interface(ipr: IPRoute, vm: VmConfig, interface: str | None = None) -> int | None:
    """The VM's interface: the one named, else the one holding its address, else the default route's."""
    if interface:
        index = _lookup(ipr, interface)
        if index is not None:
            return index
    for msg in ipr.get_addr(family=socket.AF_INET):
        if str(vm.address) in (msg.get_attr("IFA_LOCAL"), msg.get_attr("IFA_ADDRESS")):
            return msg["index"]
    for route in ipr.route("dump", family=socket.AF_INET):
        if route["dst_len"] == 0 and _table(route) == MAIN_TABLE and route.get_attr("RTA_OIF"):
            return route.get_attr("RTA_OIF")
    return None


def _require_vm_interface(ipr: IPRoute, vm: VmConfig, label: str, interface: str | None = None) -> int:
    index = _find_vm_interface(ipr, vm, interface)
    if index is None:
        raise IdentityError(
            f"{label}: no interface in network namespace '{vm.netns}' holds {vm.address} "
            f"or carries a default route"
        )
    return index


def _require_host_interface(host: IPRoute, vm: VmConfig, label: str) -> int:
    index = _lookup(host, vm.interface)
    if index is None:
        raise IdentityError(
            f"{label}: host-side interface '{vm.interface}' not found in this network namespace; "
            f"check vms.*.interface (and host_netns) in the host config"
        )
    return index


def _interface_address(ipr: IPRoute, index: int, family: int, wanted: str | None) -> str | None:
    """``wanted`` with its prefix length if the interface holds it; without ``wanted``, the first
    global address of the family."""
    for msg in ipr.get_addr(family=family, index=index):
        address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if msg["index"] != index or address is None:
            continue
        if wanted is not None:
            if ip_address(address) == ip_address(wanted):
                return f"{address}/{msg['prefixlen']}"
        elif msg["scope"] == 0:
            return f"{address}/{msg['prefixlen']}"
    return None


def _error(label: str, action: str, exc: NetlinkError) -> IdentityError:
    reason = exc.args[1] if len(exc.args) > 1 else errno.errorcode.get(exc.code, str(exc))
    return IdentityError(f"{label}: could not {action}: {reason} (netlink error {exc.code})")


def _call(label: str, action: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except NetlinkError as exc:
        raise _error(label, action, exc) from exc


def _ignore(code: int, fn, *args, **kwargs) -> bool:
    """Call fn, treating the netlink error ``code`` (EEXIST on add, ENOENT on delete) as done
    already. Returns whether this call did it."""
    try:
        fn(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code != code:
            raise
        return False
    return True
