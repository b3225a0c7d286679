"""VMs found through libvirt: each running domain's interfaces become netskin VMs.

The pure core reads a domain's XML (``virDomain.XMLDesc()``) into ``LibvirtVm`` entries and keeps
an ``Inventory`` that turns successive readings into ``Appeared`` / ``Changed`` / ``Gone`` events.
The shell, ``LibvirtSource``, owns the connection: it lists the domains, subscribes to libvirt's
domain events (lifecycle, metadata, device added/removed), re-reads a domain when one arrives,
reconnects when libvirtd restarts, and delivers the core's events into trio. It imports the
libvirt binding only when it runs, so netskin works without it unless ``[libvirt]`` is configured.

Theory of operation. libvirt's events only say *which* domain changed; the shell then reads the
domain's current XML and hands it to the inventory, which compares it with what it had. So a burst
of events for one domain costs one reading each and the result is always the domain's latest
state; after a reconnect a full listing replaces the inventory (a domain undefined meanwhile is
Gone, one started meanwhile Appears). A VM exists while its domain runs: that is when it has a tap.

Naming. A domain with one interface is the VM ``DOMAIN``; with several, each is ``DOMAIN/IFACE``,
IFACE being the interface's libvirt alias: ``netN`` as libvirt numbers a running domain's NICs in
device order (for a shut-off domain the same number is taken from the order), or the user's
alias without libvirt's ``ua-`` prefix (``<alias name='ua-uplink'/>`` gives ``DOMAIN/uplink``).
Not the tap: libvirt names taps ``vnetN`` afresh at each start, the alias stays.

The skin. netskin's metadata element in the domain, namespace ``NETSKIN_XMLNS``:
``virsh metadata DOMAIN --uri https://netskin.dev/xmlns/1 --key netskin --set '<skin name="3g"/>'``
names the skin of every VM of the domain.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from interceptor.schema import UserError, _check_name

log = logging.getLogger("netskin.libvirt")

NETSKIN_XMLNS = "https://netskin.dev/xmlns/1"
METADATA_KEY = "netskin"  # the prefix virsh gives the element (--key)
DEFAULT_MTU = 1500  # no <mtu> in the domain: libvirt leaves the guest's virtio-net at 1500
# Interface types whose traffic passes the host's stack on a host-side device netskin can steer.
STEERABLE_TYPES = ("ethernet", "bridge", "network")
_IGNORED_WHY = {
    "direct": "a macvtap port: its traffic bypasses the host's netfilter",
    "user": "user-mode networking: there is no host-side device",
    "hostdev": "a device passed through to the guest: the host does not see its traffic",
    "vhostuser": "a vhost-user port: its traffic bypasses the host's netfilter",
    "vdpa": "a vDPA device: its traffic bypasses the host's netfilter",
}
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 10.0


class LibvirtUnavailable(UserError):
    """``[libvirt]`` is configured but the binding is not installed or the connection fails."""


class DomainXmlError(RuntimeError):
    """libvirt returned a domain description this module cannot read."""


# --- the pure core: a domain's XML → VM entries ------------------------------------------------


@dataclass(frozen=True)
class LibvirtVm:
    """One interface of a libvirt domain, as netskin sees a VM: its original configuration."""

    name: str  # DOMAIN, or DOMAIN/IFACE when the domain has several interfaces
    domain: str
    uuid: str  # the domain's: a renamed domain is the same domain
    iface: str  # the alias without "ua-": net0, net1, or the user's alias
    kind: str  # the interface type: ethernet, bridge or network
    tap: str | None  # host-side device (<target dev>); None while libvirt has not named it
    mac: str | None  # the guest's MAC, lower case
    mtu: int  # <mtu size>, else DEFAULT_MTU
    bridge: str | None = None  # <source bridge>, or a running network's bridge
    network: str | None = None  # <source network> for a network-backed interface
    skin: str | None = None  # from netskin's metadata element
    address: str | None = None  # IPv4, where libvirt knows it (see addresses_by_mac)
    address6: str | None = None
    running: bool = False

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class DomainView:
    """What one reading of a domain's XML says."""

    name: str
    uuid: str
    running: bool
    skin: str | None
    vms: tuple[LibvirtVm, ...]
    problems: tuple[str, ...] = ()  # ignored interfaces, bad metadata: one line each


def parse_domain(xml: str) -> DomainView:
    """A domain's XML (live or inactive, as ``XMLDesc()`` gives it) into its VM entries."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DomainXmlError(f"domain XML is not well-formed: {exc}") from None
    if root.tag != "domain":
        raise DomainXmlError(f"expected a <domain> element, got <{root.tag}>")
    name = (root.findtext("name") or "").strip()
    uuid = (root.findtext("uuid") or "").strip()
    if not name or not uuid:
        raise DomainXmlError("domain XML without <name> or <uuid>")
    # A running domain's live XML carries its id; an inactive one has none (or id='-1').
    running = root.get("id") not in (None, "-1")
    problems: list[str] = []
    skin = _metadata_skin(root.find("metadata"), name, problems)

    steerable: list[tuple[str, ET.Element]] = []
    for index, iface in enumerate(root.findall("devices/interface")):
        kind = iface.get("type", "")
        label = _iface_label(iface, index)
        if kind not in STEERABLE_TYPES:
            why = _IGNORED_WHY.get(kind, f"type {kind!r} has no host-side device netskin can steer")
            problems.append(f"domain {name}: interface {label} ignored: {why}")
            continue
        steerable.append((label, iface))

    vms = []
    for label, iface in steerable:
        vm_name = name if len(steerable) == 1 else f"{name}/{label}"
        vms.append(_vm(iface, vm_name, name, uuid, label, skin, running, problems))
    return DomainView(name, uuid, running, skin, tuple(vms), tuple(problems))


def _iface_label(iface: ET.Element, index: int) -> str:
    alias = iface.find("alias")
    if alias is not None and alias.get("name"):
        return alias.get("name").removeprefix("ua-")
    return f"net{index}"


def _vm(iface: ET.Element, vm_name: str, domain: str, uuid: str, label: str, skin: str | None,
        running: bool, problems: list[str]) -> LibvirtVm:
    kind = iface.get("type", "")
    source = iface.find("source")
    target = iface.find("target")
    mac = iface.find("mac")
    mtu_el = iface.find("mtu")
    mtu = DEFAULT_MTU
    if mtu_el is not None:
        try:
            mtu = int(mtu_el.get("size", ""))
        except ValueError:
            problems.append(f"domain {domain}: interface {label}: <mtu size={mtu_el.get('size')!r}> "
                            f"is not a number; taken as {DEFAULT_MTU}")
    bridge = network = None
    if source is not None:
        bridge = source.get("bridge") or None  # type=bridge; a running network-backed one too
        network = source.get("network") or None if kind == "network" else None
    tap = target.get("dev") if target is not None and target.get("dev") else None
    mac_address = mac.get("address").lower() if mac is not None and mac.get("address") else None
    return LibvirtVm(name=vm_name, domain=domain, uuid=uuid, iface=label, kind=kind, tap=tap,
                     mac=mac_address, mtu=mtu, bridge=bridge, network=network, skin=skin, running=running)


def _metadata_skin(metadata: ET.Element | None, domain: str, problems: list[str]) -> str | None:
    if metadata is None:
        return None
    ours = [el for el in metadata if el.tag.startswith(f"{{{NETSKIN_XMLNS}}}")]
    if not ours:
        return None
    element = ours[0]
    local = element.tag.rpartition("}")[2]
    hint = f"set it with: virsh metadata {domain} --uri {NETSKIN_XMLNS} --key {METADATA_KEY} --set '<skin name=\"SKIN\"/>'"
    if local != "skin":
        problems.append(f"domain {domain}: netskin metadata <{local}> ignored (expected <skin name=...>); {hint}")
        return None
    value = (element.get("name") or "").strip()
    if not value:
        problems.append(f"domain {domain}: netskin metadata <skin> has no name; {hint}")
        return None
    try:
        return _check_name(value, "skin")
    except ValueError as exc:
        problems.append(f"domain {domain}: netskin metadata: {exc}")
        return None


def skin_metadata(skin: str) -> str:
    """The element to store under netskin's namespace for ``skin`` (``virDomain.setMetadata``)."""
    _check_name(skin, "skin")
    element = ET.Element("skin", name=skin)
    return ET.tostring(element, encoding="unicode")


# --- addresses ------------------------------------------------------------------------------
#
# libvirt does not know a guest's address in general. It does for an interface on a libvirt
# network that hands out addresses: the network's DHCP leases (``interfaceAddresses`` with
# VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE). Its ARP source reads the host's neighbour table,
# which the daemon reads better itself (it runs where the taps are; libvirt 9.0's reader fails
# with "wrong nlmsg len" on current kernels), and the guest-agent source needs an agent in the
# guest. So: leases for network-backed interfaces, else unknown here (None).


def addresses_by_mac(interface_addresses: dict[str, Any]) -> dict[str, tuple[str | None, str | None]]:
    """``virDomain.interfaceAddresses()``'s result as {mac: (ipv4, ipv6)}: the first IPv4 and
    the first IPv6 that is not link-local of each interface."""
    found: dict[str, tuple[str | None, str | None]] = {}
    for entry in interface_addresses.values():
        mac = (entry.get("hwaddr") or "").lower()
        if not mac:
            continue
        ipv4 = ipv6 = None
        for addr in entry.get("addrs") or ():
            value = addr.get("addr")
            if addr.get("type") == 0 and ipv4 is None:  # VIR_IP_ADDR_TYPE_IPV4
                ipv4 = value
            elif addr.get("type") == 1 and ipv6 is None and value and not value.lower().startswith("fe80:"):
                ipv6 = value
        found[mac] = (ipv4, ipv6)
    return found


def with_addresses(view: DomainView, by_mac: dict[str, tuple[str | None, str | None]]) -> DomainView:
    """The view with the addresses found for its interfaces' MACs filled in."""
    vms = tuple(replace(vm, address=by_mac[vm.mac][0], address6=by_mac[vm.mac][1])
                if vm.mac in by_mac else vm for vm in view.vms)
    return replace(view, vms=vms)


# --- the inventory: readings → events --------------------------------------------------------


@dataclass(frozen=True)
class Appeared:
    vm: LibvirtVm


@dataclass(frozen=True)
class Changed:
    vm: LibvirtVm
    before: LibvirtVm


@dataclass(frozen=True)
class Gone:
    vm: LibvirtVm  # as it was last seen


Event = Appeared | Changed | Gone


@dataclass
class Inventory:
    """The VMs of the running domains, by name; each reading returns what changed."""

    vms: dict[str, LibvirtVm] = field(default_factory=dict)

    def domain(self, view: DomainView) -> list[Event]:
        """The domain's current reading (it may have started, stopped or changed)."""
        present = {vm.name: vm for vm in view.vms if view.running and vm.tap is not None}
        return self._replace(lambda vm: vm.uuid == view.uuid, present)

    def undefined(self, uuid: str) -> list[Event]:
        """The domain no longer exists."""
        return self._replace(lambda vm: vm.uuid == uuid, {})

    def snapshot(self, views: Iterable[DomainView]) -> list[Event]:
        """A full listing (after connecting): whatever it does not hold is gone."""
        present = {vm.name: vm for view in views if view.running for vm in view.vms if vm.tap is not None}
        return self._replace(lambda vm: True, present)

    def _replace(self, covers, present: dict[str, LibvirtVm]) -> list[Event]:
        events: list[Event] = []
        for name, vm in list(self.vms.items()):
            if covers(vm) and name not in present:
                del self.vms[name]
                events.append(Gone(vm))
        for name, vm in present.items():
            before = self.vms.get(name)
            if before is not None and before.uuid != vm.uuid:
                # Another domain took the name (renamed, or undefined and defined anew).
                events.append(Gone(before))
                before = None
            self.vms[name] = vm
            if before is None:
                events.append(Appeared(vm))
            elif before != vm:
                events.append(Changed(vm, before))
        return events


# --- the shell: libvirt's connection and events into trio -------------------------------------


def load_binding():
    """The libvirt module, or a one-line error saying how to get it."""
    try:
        import libvirt
    except ImportError:
        raise LibvirtUnavailable(
            "[libvirt] is configured but the libvirt-python binding is not installed: "
            "apt-get install libvirt-dev pkg-config && pip install 'netskin[libvirt]'"
        ) from None
    return libvirt


_event_loop_lock = threading.Lock()
_event_loop_started = False


def _start_event_loop(libvirt) -> None:
    """libvirt's default event loop, once per process, in a daemon thread (before any open)."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt's default handler prints every error to stderr, also those it raises as
        # exceptions (which the shell logs or passes on): a reconnect would spam the journal.
        libvirt.registerErrorHandler(lambda _ctx, _error: None, None)

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


class LibvirtSource:
    """Delivers the ``Appeared`` / ``Changed`` / ``Gone`` events of one libvirt connection.

    ``await source.run(send)`` runs until cancelled: it connects (read-only), sends the events of
    the first full listing, calls ``task_status.started()``, then follows libvirt's domain events.
    When libvirtd goes away it reconnects with backoff and sends what changed meanwhile; the
    guests keep running without libvirtd, so nothing is Gone just because it restarted.
    """

    def __init__(self, uri: str, *, reconnect_min_s: float = RECONNECT_MIN_S,
                 reconnect_max_s: float = RECONNECT_MAX_S) -> None:
        self.uri = uri
        self.inventory = Inventory()
        self.problems: dict[str, tuple[str, ...]] = {}  # domain uuid → its last reading's problems
        self.connected = False
        self._reconnect = (reconnect_min_s, reconnect_max_s)
        self._libvirt = None

    async def run(self, send: trio.MemorySendChannel, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        libvirt = self._libvirt = load_binding()
        _start_event_loop(libvirt)
        token = trio.lowlevel.current_trio_token()
        started = False
        delay_s = self._reconnect[0]
        while True:
            touches_send, touches = trio.open_memory_channel[tuple](math.inf)
            try:
                conn = await trio.to_thread.run_sync(self._connect, touches_send, token)
            except libvirt.libvirtError as exc:
                if not started:
                    raise LibvirtUnavailable(f"libvirt {self.uri}: {exc}") from None
                log.warning("libvirt %s: %s; retrying in %.1f s", self.uri, exc, delay_s)
                await trio.sleep(delay_s)
                delay_s = min(delay_s * 2, self._reconnect[1])
                continue
            self.connected = True
            try:
                views = await trio.to_thread.run_sync(self._read_all, conn)
                for event in self.inventory.snapshot(views):
                    await send.send(event)
                delay_s = self._reconnect[0]
                if not started:
                    started = True
                    task_status.started()
                await self._follow(conn, touches, send)
            except libvirt.libvirtError as exc:
                log.warning("libvirt %s: %s; reconnecting", self.uri, exc)
            finally:
                self.connected = False
                touches_send.close()  # the old connection's late callbacks post nowhere
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._close, conn)
            await trio.sleep(delay_s)

    async def _follow(self, conn, touches: trio.MemoryReceiveChannel, send: trio.MemorySendChannel) -> None:
        async for what, uuid in touches:
            if what == "closed":
                log.warning("libvirt %s closed the connection; reconnecting", self.uri)
                return
            events = await trio.to_thread.run_sync(self._reread, conn, uuid)
            for event in events:
                await send.send(event)

    # Everything below runs in worker threads or libvirt's event thread, never in trio's.

    def _connect(self, touches_send: trio.MemorySendChannel, token):
        libvirt = self._libvirt

        def post(item: tuple) -> None:
            try:
                trio.from_thread.run_sync(touches_send.send_nowait, item, trio_token=token)
            except (trio.RunFinishedError, trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # nobody listens any more

        def on_domain(_conn, dom, *_args) -> None:
            post(("domain", dom.UUIDString()))

        def on_close(_conn, reason, _opaque) -> None:
            post(("closed", str(reason)))

        conn = libvirt.openReadOnly(self.uri)
        try:
            conn.registerCloseCallback(on_close, None)
            for event_id in (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
                             libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED):
                conn.domainEventRegisterAny(None, event_id, on_domain, None)
        except BaseException:
            conn.close()
            raise
        return conn

    def _close(self, conn) -> None:
        try:
            conn.unregisterCloseCallback()
        except Exception:  # the connection may be dead already
            pass
        try:
            conn.close()
        except Exception:
            pass

    def _read_all(self, conn) -> list[DomainView]:
        views = []
        for dom in conn.listAllDomains(0):
            view = self._read(dom)
            if view is not None:
                views.append(view)
        return views

    def _reread(self, conn, uuid: str) -> list[Event]:
        libvirt = self._libvirt
        try:
            dom = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                self.problems.pop(uuid, None)
                return self.inventory.undefined(uuid)
            raise
        view = self._read(dom)
        return [] if view is None else self.inventory.domain(view)

    def _read(self, dom) -> DomainView | None:
        libvirt = self._libvirt
        try:
            view = parse_domain(dom.XMLDesc(0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None  # undefined between the listing and the reading
            raise
        except DomainXmlError as exc:
            # One unreadable domain must not hide the others: it is left out, loudly.
            log.error("libvirt %s: domain %s left out: %s", self.uri, dom.UUIDString(), exc)
            return None
        if view.running and any(vm.kind == "network" for vm in view.vms):
            try:
                leases = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0)
            except libvirt.libvirtError as exc:
                log.info("domain %s: no DHCP leases from libvirt: %s", view.name, exc)
            else:
                view = with_addresses(view, addresses_by_mac(leases or {}))
        if view.problems != self.problems.get(view.uuid):
            for line in view.problems:
                log.warning("%s", line)
        self.problems[view.uuid] = view.problems
        return view


def event_json(event: Event) -> dict:
    """An event as JSON: ``{"event": "appeared", "vm": {...}}`` (``before`` too for changed)."""
    data = {"event": type(event).__name__.lower(), "vm": event.vm.to_json(), "time": time.time()}
    if isinstance(event, Changed):
        data["before"] = event.before.to_json()
    return data
