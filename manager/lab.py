"""The demo lab: network namespaces standing in for a hypervisor, its VMs and the internet.

    {prefix}-vm1  eth0 ─── tap-vm1 ┐
    {prefix}-vm2  eth0 ─── tap-vm2 ┼ {prefix}-hv (routes, forwards) up0 ─── eth0 {prefix}-inet
    ...                            ┘                                        (echo, iperf3, DNS)

With ``guests=N`` the VMs are real QEMU guests (manager/guests.py) instead of namespaces, on
one of two layouts: routed taps (``tap-vmN`` in the hv namespace holds the guest's gateway, as
the veths do), or, with ``bridge=True``, taps that are ports of a bridge ``br0`` holding the
gateway, routed and NATed (MASQUERADE in the hv namespace) towards inet: libvirt's default.

The lab has no link to the root namespace, so nothing in it can reach a real network, and
nothing in the root namespace (links, addresses, routes, firewall) is touched. What is built is
recorded in a state file as it is built, so ``lab_down`` removes a half-built lab too, and works
from a fresh process. Links, addresses and routes go through pyroute2; only sysctls and the
sinks use ``ip netns exec``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD, IFA_F_TENTATIVE

log = logging.getLogger("netskin.lab")

LAB_ROOT = Path("/run/netskin-lab")  # default workdirs, and where lab_down(prefix) finds the state
NETNS_RUN_DIR = Path("/run/netns")
NETNS_CONF_DIR = Path("/etc/netns")  # ip netns exec bind-mounts /etc/netns/NS/* over /etc/*

# The inet namespace: the first address runs the primary DNS, the second the secondary.
INET_ADDRESSES = ("10.77.0.2", "10.77.0.3")
INET_ADDRESSES6 = ("fd77::2", "fd77::3")
UPLINK_HV_ADDRESS, UPLINK_HV_ADDRESS6 = "10.77.0.1", "fd77::1"
LAB_NET, LAB_NET6 = ("10.77.0.0", 16), ("fd77::", 16)
ECHO_PORT = 9000
IPERF3_PORTS = (5201, 5202)  # two servers so two VMs can measure at once
DNS_PORT = 53
QUEUE_BASE = 7700
MTU = 1500
MAX_VMS = 200
MAX_GUESTS = 8
BRIDGE = "br0"  # the bridge layout's bridge, in the hv namespace
BRIDGE_NET, BRIDGE_NET6 = "10.77.100", "fd77:100:"  # guest i is .{i+1}; the bridge is .1
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0

_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,15}")
_REPO_ROOT = Path(__file__).resolve().parents[1]
_children: dict[int, subprocess.Popen] = {}  # sinks this process started, to reap them on lab_down


class LabError(RuntimeError):
    """The lab could not be built or removed; the message names the part and the fix."""


@dataclass(frozen=True)
class LabVM:
    """One VM of the lab: its namespace, the host-side interface and its addresses."""

    name: str  # vm1, vm2, ...: the key under [vms] in the host config
    netns: str
    interface: str  # host side, in the hv namespace
    address: str
    address6: str
    gateway: str
    gateway6: str
    mac: str  # the VM's eth0
    prefixlen: int = 24
    guest: bool = False  # a QEMU guest (no netns): commands go through its console

    @property
    def is_namespace(self) -> bool:
        return self.netns is not None


@dataclass
class Lab:
    prefix: str
    hv_ns: str
    inet_ns: str
    vms: tuple[LabVM, ...]
    workdir: Path
    config_path: Path
    state_path: Path
    inet_address: str = INET_ADDRESSES[0]
    inet_address6: str = INET_ADDRESSES6[0]
    dns_servers: tuple[str, ...] = INET_ADDRESSES  # primary, secondary
    echo_port: int = ECHO_PORT
    iperf3_ports: tuple[int, ...] = IPERF3_PORTS
    pids: dict[str, int] = field(default_factory=dict)  # sink name -> pid
    bridge: str | None = None  # the bridge the guests' taps are ports of, if any
    accel: str | None = None  # "kvm" or "tcg" when the lab has guests
    boot_s: dict[str, float] = field(default_factory=dict)  # guest -> seconds until its console answered

    @property
    def namespaces(self) -> list[str]:
        return [self.hv_ns, self.inet_ns, *(vm.netns for vm in self.vms if vm.netns)]

    @property
    def guests(self) -> tuple[LabVM, ...]:
        return tuple(vm for vm in self.vms if vm.guest)

    def console(self, name: str):
        """The console of guest ``name``: ``lab.console("vm1").run("ping -c 1 10.77.0.2")``."""
        from manager.guests import Console

        vm = self.vm(name)
        if not vm.guest:
            raise LabError(f"{name} is a namespace, not a guest; use lab.exec({name!r}, ...)")
        return Console(_guest_dir(self.workdir) / f"{vm.name}.console")

    def vm(self, name: str) -> LabVM:
        """A VM by its name ("vm1") or its namespace."""
        for vm in self.vms:
            if name in (vm.name, vm.netns):
                return vm
        raise LabError(f"lab {self.prefix!r} has no VM {name!r}; it has {[vm.name for vm in self.vms]}")

    def resolve_ns(self, where: str) -> str:
        """The namespace for "hv", "inet", a VM name ("vm1") or a lab namespace name."""
        if where == "hv":
            return self.hv_ns
        if where == "inet":
            return self.inet_ns
        if where in self.namespaces:
            return where
        vm = self.vm(where)
        if vm.netns is None:
            raise LabError(f"{where} is a QEMU guest, not a namespace; run commands in it with lab.console({where!r})")
        return vm.netns

    def exec(self, ns: str, argv: list, *, check: bool = False, timeout: float | None = 60.0,
             **kw) -> subprocess.CompletedProcess:
        """Run argv inside a lab namespace (``ip netns exec``); output captured as text by default."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self._in_ns(ns, argv), check=check, timeout=timeout, **kw)

    def popen(self, ns: str, argv: list, **kw) -> subprocess.Popen:
        """Start argv inside a lab namespace; the caller owns the process."""
        return subprocess.Popen(self._in_ns(ns, argv), **kw)

    def socket(self, ns: str, family: int = socket.AF_INET, sock_type: int = socket.SOCK_DGRAM) -> socket.socket:
        """A socket created inside a lab namespace, to use from this process."""
        return netns.create_socket(self.resolve_ns(ns), family, sock_type, flags=0)

    def _in_ns(self, ns: str, argv: list) -> list[str]:
        return ["ip", "netns", "exec", self.resolve_ns(ns), *map(str, argv)]


def _guest_dir(workdir: Path) -> Path:
    return workdir / "guests"


def _make_guest(i: int, bridge: bool) -> LabVM:
    if bridge:
        return LabVM(name=f"vm{i}", netns=None, interface=f"tap-vm{i}", address=f"{BRIDGE_NET}.{i + 1}",
                     address6=f"{BRIDGE_NET6}:{i + 1:x}", gateway=f"{BRIDGE_NET}.1", gateway6=f"{BRIDGE_NET6}:1",
                     mac=f"02:77:00:00:{i:02x}:02", guest=True)
    return LabVM(name=f"vm{i}", netns=None, interface=f"tap-vm{i}", address=f"10.77.{i}.2",
                 address6=f"fd77:{i}::2", gateway=f"10.77.{i}.1", gateway6=f"fd77:{i}::1",
                 mac=f"02:77:00:00:{i:02x}:02", guest=True)


def _make_lab(prefix: str, vms: int, workdir: Path, pids: dict[str, int] | None = None,
              guests: int = 0, bridge: bool = False, accel: str | None = None, *,
              first_vm: int = 1, hv_ns: str | None = None) -> Lab:
    """The lab's description; ``first_vm``/``hv_ns``: one host of a fleet lab, whose VMs are
    numbered on from the hosts before it (VM n is 10.77.n.2 wherever it lives)."""
    return Lab(
        prefix=prefix,
        hv_ns=hv_ns or f"{prefix}-hv",
        inet_ns=f"{prefix}-inet",
        bridge=BRIDGE if guests and bridge else None,
        accel=accel,
        vms=tuple(_make_guest(i, bridge) for i in range(1, guests + 1)) + tuple(
            LabVM(
                name=f"vm{i}",
                netns=f"{prefix}-vm{i}",
                interface=f"tap-vm{i}",
                address=f"10.77.{i}.2",
                address6=f"fd77:{i}::2",
                gateway=f"10.77.{i}.1",
                gateway6=f"fd77:{i}::1",
                mac=f"02:77:00:00:{i:02x}:02",
            )
            for i in range(first_vm, first_vm + vms)
        ),
        workdir=workdir,
        config_path=workdir / "netskin.toml",
        state_path=workdir / "lab.json",
        pids=dict(pids or {}),
    )


def _lab_ns_re(prefix: str) -> re.Pattern[str]:
    # hvN and ctl: the hosts and the control namespace of a fleet lab (manager/fleet_lab.py).
    return re.compile(rf"{re.escape(prefix)}-(hv|hv\d+|ctl|inet|vm\d+)")


# --- building --------------------------------------------------------------------------------


def lab_up(prefix: str = "nsk", vms: int = 2, workdir: Path | None = None, *, guests: int = 0,
           bridge: bool = False, say=None) -> Lab:
    """Build the lab, start its sinks, write its host config; on any failure remove it again.

    With ``guests`` > 0 the VMs are QEMU guests (``vms`` must be 0): on routed taps, or on
    ports of a bridge with ``bridge``. ``say`` (a callable) hears about slow steps.
    """
    if not _PREFIX_RE.fullmatch(prefix):
        raise LabError(f"lab prefix {prefix!r}: use 1-16 lowercase letters and digits, starting with a letter")
    if guests:
        if not 1 <= guests <= MAX_GUESTS:
            raise LabError(f"lab with {guests} guests: choose between 1 and {MAX_GUESTS}")
        if vms:
            raise LabError("a lab has either namespace VMs or guests; pass vms=0 with guests")
    elif bridge:
        raise LabError("the bridge layout is for guests; add --guests N")
    elif not 1 <= vms <= MAX_VMS:
        raise LabError(f"lab with {vms} VMs: choose between 1 and {MAX_VMS}")
    existing = [n for n in netns.listnetns() if _lab_ns_re(prefix).fullmatch(n)]
    if existing or (LAB_ROOT / prefix / "lab.json").exists():
        raise LabError(f"lab {prefix!r} already exists ({', '.join(existing) or 'state file'}); "
                       f"remove it with `netskin lab down {prefix}` or choose another prefix")
    workdir = Path(workdir) if workdir is not None else LAB_ROOT / prefix
    lab = _make_lab(prefix, vms, workdir, guests=guests, bridge=bridge)
    state = {
        "prefix": prefix,
        "vms": vms,
        "guests": guests,
        "bridge": bridge,
        "accel": None,
        "boot_s": {},
        "workdir": str(workdir),
        "config_path": str(lab.config_path),
        "namespaces": [],
        "netns_conf_dirs": [],
        "processes": [],
        "complete": False,
    }
    try:
        for d in (workdir, workdir / "state", workdir / "skins.d", workdir / "logs"):
            d.mkdir(parents=True, exist_ok=True)
        _save_state(state)
        _build(lab, state, say or (lambda text: log.info("%s", text)))
    except BaseException as exc:
        log.warning("lab %s failed to build; removing what was built", prefix)
        try:
            lab_down(prefix)
        except Exception as cleanup_exc:
            exc.add_note(f"and removing the half-built lab failed too: {cleanup_exc}")
        raise
    return lab


def _build(lab: Lab, state: dict, say) -> None:
    for name in lab.namespaces:
        netns.create(name)
        state["namespaces"].append(name)
        _save_state(state)
    # DAD off before any link exists, so IPv6 addresses are usable at once (IFA_F_NODAD too).
    no_dad = {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0}
    for name in lab.namespaces:
        _sysctl(name, no_dad)
    _sysctl(lab.hv_ns, {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1})

    if lab.guests:
        image, accel = _prepare_guests(lab, say)
        lab.accel = state["accel"] = accel
        _save_state(state)

    _build_links(lab)
    if lab.guests:
        _build_guest_links(lab)

    _write_resolv_confs(lab, state)
    lab.config_path.write_text(host_config_toml(lab))
    _start_sinks(lab, state)
    if lab.guests:
        _boot_guests(lab, state, image, say)
    state["complete"] = True
    _save_state(state)
    log.info("lab %s is up: %d VMs, config %s", lab.prefix, len(lab.vms), lab.config_path)


def _write_resolv_confs(lab: Lab, state: dict) -> None:
    """Each namespace VM's /etc/resolv.conf (``ip netns exec`` mounts /etc/netns/NS/ over /etc)."""
    for vm in lab.vms:
        if vm.netns is None:
            continue
        conf_dir = NETNS_CONF_DIR / vm.netns
        state["netns_conf_dirs"].append(str(conf_dir))
        _save_state(state)
        for _ in range(3):  # another lab's lab_down may rmdir an empty /etc/netns in between
            try:
                conf_dir.mkdir(parents=True, exist_ok=True)
                break
            except FileNotFoundError:
                continue
        (conf_dir / "resolv.conf").write_text(f"nameserver {lab.dns_servers[0]}\n")


# --- guests ----------------------------------------------------------------------------------


def _prepare_guests(lab: Lab, say):
    """The guest image (built at first use) and the accelerator this host boots it with."""
    from manager import guests

    missing = [tool for tool in ("qemu-system-x86_64", "apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise LabError(f"guests need {', '.join(missing)}; apt-get install qemu-system-x86")
    try:
        image = guests.build_image(say=say)
        return image, guests.detect_accel(image)
    except guests.GuestError as exc:
        raise LabError(f"guest image: {exc}") from None


def _build_guest_links(lab: Lab) -> None:
    """The guests' taps in the hv namespace: routed (gateway on the tap) or ports of the bridge."""
    for vm in lab.guests:
        _ip(lab.hv_ns, "tuntap", "add", "dev", vm.interface, "mode", "tap")
    with IPRoute(netns=lab.hv_ns, flags=0) as hv:
        if lab.bridge:
            hv.link("add", ifname=lab.bridge, kind="bridge")
            first = lab.guests[0]
            _configure(hv, lab.bridge, "02:77:00:00:64:01", [(first.gateway, 24), (first.gateway6, 64)])
        for i, vm in enumerate(lab.guests, start=1):
            idx = _index(hv, vm.interface)
            hv.link("set", index=idx, address=f"02:77:00:00:{i:02x}:01", mtu=MTU)
            if lab.bridge:
                hv.link("set", index=idx, master=_index(hv, lab.bridge))
                hv.link("set", index=idx, state="up")
            else:
                _configure(hv, vm.interface, f"02:77:00:00:{i:02x}:01", [(vm.gateway, 24), (vm.gateway6, 64)])
    if lab.bridge:
        # Bridged frames pass the hv namespace's iptables (physdev), as on a libvirt host.
        _sysctl(lab.hv_ns, {"net.bridge.bridge-nf-call-iptables": 1, "net.bridge.bridge-nf-call-ip6tables": 1})
        subnet = f"{BRIDGE_NET}.0/24"
        _ip_netns_exec(lab.hv_ns, ["iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", subnet,
                                   "!", "-d", subnet, "-m", "comment", "--comment", "netskin-lab",
                                   "-j", "MASQUERADE"])


def _ip(ns: str, *argv: str) -> None:
    _ip_netns_exec(ns, ["ip", *argv])


def _ip_netns_exec(ns: str, argv: list[str]) -> None:
    done = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)} in namespace {ns} failed: {done.stderr.strip()}")


def _boot_guests(lab: Lab, state: dict, image, say) -> None:
    from manager import guests

    guest_dir = _guest_dir(lab.workdir)
    guest_dir.mkdir(parents=True, exist_ok=True)
    started = []
    why = " (/dev/kvm is here but did not boot the guest)" if lab.accel == "tcg" and os.path.exists("/dev/kvm") else ""
    say(f"booting {len(lab.guests)} guest(s) with {lab.accel.upper()}{why}")
    for vm in lab.guests:
        net = guests.GuestNet(vm.name, f"{vm.address}/{vm.prefixlen}", vm.gateway, f"{vm.address6}/64",
                              vm.gateway6, MTU, lab.dns_servers[0])
        spec = guests.GuestSpec(net, vm.interface, vm.mac, guest_dir)
        proc = guests.start_guest(image, spec, lab.accel, ["ip", "netns", "exec", lab.hv_ns],
                                  lab.workdir / "logs" / f"qemu-{vm.name}.log")
        _children[proc.pid] = proc
        name = f"qemu-{vm.name}"
        lab.pids[name] = proc.pid
        # ip netns exec execs QEMU in place, so the pid's command line becomes QEMU's.
        state["processes"].append({"name": name, "pid": proc.pid,
                                   "argv": guests.qemu_argv(image, spec, lab.accel)})
        _save_state(state)
        started.append((vm, spec, proc, time.monotonic()))
    for vm, spec, proc, t0 in started:
        try:
            guests.wait_console_socket(spec, proc)
            guests.Console(spec.console_path).wait_ready(proc=proc, serial_log=spec.serial_log)
        except guests.GuestError as exc:
            raise LabError(f"guest {vm.name}: {exc}") from None
        lab.boot_s[vm.name] = state["boot_s"][vm.name] = round(time.monotonic() - t0, 2)
    _save_state(state)


def _sysctl(ns: str, settings: dict[str, int]) -> None:
    argv = ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise LabError(f"sysctl in namespace {ns} failed: {done.stderr.strip()}")


def _build_links(lab: Lab) -> None:
    with IPRoute(netns=lab.hv_ns, flags=0) as hv:
        _set_up(hv, "lo")
        hv.link("add", ifname="up0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": lab.inet_ns})
        _configure(hv, "up0", "02:77:00:00:00:01", [(UPLINK_HV_ADDRESS, 24), (UPLINK_HV_ADDRESS6, 64)])

    with IPRoute(netns=lab.inet_ns, flags=0) as inet:
        _set_up(inet, "lo")
        addresses = [(a, 24) for a in INET_ADDRESSES] + [(a, 64) for a in INET_ADDRESSES6]
        _configure(inet, "eth0", "02:77:00:00:00:02", addresses)
        # Replies to the VMs go back through the hypervisor; there is no default route anywhere.
        inet.route("add", dst=LAB_NET[0], dst_len=LAB_NET[1], gateway=UPLINK_HV_ADDRESS)
        inet.route("add", dst=LAB_NET6[0], dst_len=LAB_NET6[1], gateway=UPLINK_HV_ADDRESS6,
                   family=socket.AF_INET6)

    _build_vm_links(lab)
    _wait_links_ready(lab)


def _build_vm_links(lab: Lab) -> None:
    """A veth per namespace VM: ``tap-vmN`` in the hv namespace holds its gateway, eth0 in the VM."""
    with IPRoute(netns=lab.hv_ns, flags=0) as hv:
        for vm in lab.vms:
            if vm.netns is None:
                continue  # a guest: its tap is made by _build_guest_links
            hv.link("add", ifname=vm.interface, kind="veth", peer={"ifname": "eth0", "net_ns_fd": vm.netns})
            _configure(hv, vm.interface, vm.mac[:-2] + "01", [(vm.gateway, 24), (vm.gateway6, 64)])

    for vm in lab.vms:
        if vm.netns is None:
            continue
        with IPRoute(netns=vm.netns, flags=0) as ipr:
            _set_up(ipr, "lo")
            _configure(ipr, "eth0", vm.mac, [(vm.address, 24), (vm.address6, 64)])
            ipr.route("add", dst="default", gateway=vm.gateway)
            ipr.route("add", dst="default", gateway=vm.gateway6, family=socket.AF_INET6)


def _wait_links_ready(lab: Lab) -> None:
    """Wait until every veth end is operationally up and has its IPv6 link-local address.

    The kernel applies carrier changes asynchronously (linkwatch, up to a second later); a
    packet sent before that is dropped and neighbour discovery retries only after a second,
    which would show up as a one-second first ping.
    """
    wait_namespaces_ready(lab.namespaces)


def wait_namespaces_ready(namespaces) -> None:
    """Every link but lo in these namespaces operationally up with its IPv6 link-local address."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for name in namespaces:
        with IPRoute(netns=name, flags=0) as ipr:
            while True:
                pending = _links_not_ready(ipr)
                if not pending:
                    break
                if time.monotonic() > deadline:
                    raise LabError(f"interfaces {pending} in namespace {name} not up after {READY_TIMEOUT_S:.0f} s")
                time.sleep(0.01)


def _links_not_ready(ipr: IPRoute) -> list[str]:
    with_link_local = {
        msg["index"]
        for msg in ipr.get_addr(family=socket.AF_INET6)
        if msg.get_attr("IFA_ADDRESS", "").startswith("fe80:") and not msg["flags"] & IFA_F_TENTATIVE
    }
    return [
        link.get_attr("IFLA_IFNAME")
        for link in ipr.get_links()
        if link.get_attr("IFLA_IFNAME") != "lo"
        and (link.get_attr("IFLA_OPERSTATE") != "UP" or link["index"] not in with_link_local)
    ]


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"interface {ifname} was not created")
    return found[0]


def _set_up(ipr: IPRoute, ifname: str) -> None:
    ipr.link("set", index=_index(ipr, ifname), state="up")


def _configure(ipr: IPRoute, ifname: str, mac: str, addresses: list[tuple[str, int]]) -> None:
    idx = _index(ipr, ifname)
    ipr.link("set", index=idx, address=mac, mtu=MTU)
    for address, prefixlen in addresses:
        flags = IFA_F_NODAD if ":" in address else 0
        ipr.addr("add", index=idx, address=address, prefixlen=prefixlen, flags=flags)
    ipr.link("set", index=idx, state="up")


def host_config_toml(lab: Lab) -> str:
    """The netskin host config for this lab; the daemon runs inside the hv namespace."""
    q = json.dumps  # a JSON string of plain text is a valid TOML basic string
    lines = [
        f"# written by `netskin lab up` for lab {lab.prefix}; removed by `netskin lab down {lab.prefix}`",
        f"state_dir = {q(str(lab.workdir / 'state'))}",
        f"skins_dir = {q(str(lab.workdir / 'skins.d'))}",
        f"control_socket = {q(str(lab.workdir / 'control.sock'))}",
        'fail_mode = "open"',
        "host_uplink_kbps = 0",
        f"host_netns = {q(lab.hv_ns)}",
        f"queue_base = {QUEUE_BASE}",
    ]
    for vm in lab.vms:
        lines += [
            "",
            f"[vms.{vm.name}]",
            f"interface = {q(vm.interface)}",
            f"address = {q(vm.address)}",
            f"address6 = {q(vm.address6)}",
        ]
        if vm.netns is not None:
            lines.append(f"netns = {q(vm.netns)}")
    return "\n".join(lines) + "\n"


# --- sinks -----------------------------------------------------------------------------------


def _sink_commands(lab: Lab) -> dict[str, tuple[list[str], set[tuple[str, str | None, int]]]]:
    """Each sink's argv and the sockets ((proto, address or None for any, port)) that mean ready."""
    (primary, secondary), (primary6, secondary6) = INET_ADDRESSES, INET_ADDRESSES6
    dns = [("primary", primary), ("primary", primary6), ("secondary", secondary), ("secondary", secondary6)]
    echo = [primary, primary6]
    sinks_argv = [sys.executable, "-m", "manager.sinks"]
    ready: set[tuple[str, str | None, int]] = set()
    for address in echo:
        sinks_argv += ["--echo", f"[{address}]:{ECHO_PORT}"]
        ready |= {("tcp", address, ECHO_PORT), ("udp", address, ECHO_PORT)}
    for zone, address in dns:
        sinks_argv += ["--dns", f"{zone}@[{address}]:{DNS_PORT}"]
        ready |= {("tcp", address, DNS_PORT), ("udp", address, DNS_PORT)}
    commands = {"sinks": (sinks_argv, ready)}
    for port in lab.iperf3_ports:
        commands[f"iperf3-{port}"] = (["iperf3", "-s", "-p", str(port)], {("tcp", None, port)})
    return commands


def _start_sinks(lab: Lab, state: dict) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH")])))
    started: dict[str, tuple[subprocess.Popen, set]] = {}
    for name, (argv, ready) in _sink_commands(lab).items():
        with open(lab.workdir / "logs" / f"{name}.log", "ab") as logfile:
            # A new session: the sinks outlive `netskin lab up` and ignore its terminal's Ctrl-C.
            proc = lab.popen("inet", argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                             start_new_session=True, env=env)
        started[name] = (proc, ready)
        _children[proc.pid] = proc
        lab.pids[name] = proc.pid
        state["processes"].append({"name": name, "pid": proc.pid, "argv": argv})
        _save_state(state)

    deadline = time.monotonic() + READY_TIMEOUT_S
    waiting = dict(started)
    while waiting:
        for name, (proc, ready) in list(waiting.items()):
            if proc.poll() is not None:
                tail = (lab.workdir / "logs" / f"{name}.log").read_text(errors="replace")[-2000:]
                raise LabError(f"lab sink {name} exited with {proc.returncode} before it was ready:\n{tail}")
            if _is_listening(proc.pid, ready):
                del waiting[name]
        if not waiting:
            break
        if time.monotonic() > deadline:
            raise LabError(f"lab sinks {sorted(waiting)} not listening after {READY_TIMEOUT_S:.0f} s; "
                           f"see {lab.workdir / 'logs'}")
        time.sleep(0.02)


def _is_listening(pid: int, wanted: set[tuple[str, str | None, int]]) -> bool:
    bound = _bound_sockets(pid)
    ports_any = {(proto, port) for proto, _, port in bound}
    return all(((proto, host, port) in bound) if host else ((proto, port) in ports_any)
               for proto, host, port in wanted)


def _bound_sockets(pid: int) -> set[tuple[str, str, int]]:
    """Listening TCP and bound UDP sockets in pid's network namespace, from /proc/PID/net."""
    found = set()
    for proto, ready_state in (("tcp", "0A"), ("udp", "07")):  # 0A: LISTEN, 07: unconnected UDP
        for table, family in ((proto, socket.AF_INET), (proto + "6", socket.AF_INET6)):
            try:
                rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                fields = row.split()
                if fields[3] != ready_state:
                    continue
                hexaddr, hexport = fields[1].split(":")
                raw = bytes.fromhex(hexaddr)
                # The kernel prints each 32-bit word in host byte order.
                raw = b"".join(raw[i:i + 4][::-1] if sys.byteorder == "little" else raw[i:i + 4]
                               for i in range(0, len(raw), 4))
                found.add((proto, socket.inet_ntop(family, raw), int(hexport, 16)))
    return found


# --- state -----------------------------------------------------------------------------------


def _state_paths(prefix: str, workdir: Path) -> list[Path]:
    paths = [workdir / "lab.json", LAB_ROOT / prefix / "lab.json"]
    return list(dict.fromkeys(paths))


def _save_state(state: dict) -> None:
    text = json.dumps(state, indent=2) + "\n"
    for path in _state_paths(state["prefix"], Path(state["workdir"])):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def _load_state(prefix: str) -> dict | None:
    try:
        return json.loads((LAB_ROOT / prefix / "lab.json").read_text())
    except FileNotFoundError:
        return None


def load_lab(prefix: str) -> Lab:
    """The running lab with this prefix, as lab_up returned it (from its state file)."""
    state = _load_state(prefix)
    if state is None or not state.get("complete"):
        raise LabError(f"no complete lab {prefix!r} (no {LAB_ROOT / prefix / 'lab.json'}); run `netskin lab up`")
    if state.get("kind") == "fleet":
        raise LabError(f"lab {prefix!r} is a fleet lab (lab up --hosts); manager.fleet_lab.load_fleet_lab describes it")
    lab = _make_lab(prefix, state["vms"], Path(state["workdir"]),
                    {p["name"]: p["pid"] for p in state["processes"]},
                    guests=state.get("guests", 0), bridge=state.get("bridge", False), accel=state.get("accel"))
    lab.boot_s = dict(state.get("boot_s", {}))
    return lab


# --- removing --------------------------------------------------------------------------------


def lab_down(prefix: str) -> None:
    """Remove the lab: its processes, namespaces, /etc/netns entries and state. Idempotent.

    Works on a half-built lab and without a state file: namespaces are also found by name.
    Every process inside the lab's namespaces is stopped (SIGTERM, then SIGKILL), since a
    namespace with a process left in it outlives its name.
    """
    if not _PREFIX_RE.fullmatch(prefix):
        raise LabError(f"lab prefix {prefix!r}: use 1-16 lowercase letters and digits, starting with a letter")
    state = _load_state(prefix) or {}
    errors: list[str] = []
    pattern = _lab_ns_re(prefix)
    names = set(state.get("namespaces", [])) | {n for n in netns.listnetns() if pattern.fullmatch(n)}

    try:
        _stop_processes(names, state.get("processes", []))
    except Exception as exc:  # keep going: the namespaces must go regardless
        errors.append(f"stopping processes: {exc!r}")

    if state.get("guests") and f"{prefix}-hv" in names:
        try:
            _remove_guest_links(f"{prefix}-hv", state["guests"])
        except Exception as exc:
            errors.append(f"removing guest taps: {exc!r}")

    for name in sorted(names):
        try:
            netns.remove(name)
            log.info("removed namespace %s", name)
        except FileNotFoundError:
            pass
        except Exception as exc:
            errors.append(f"removing namespace {name}: {exc!r}")

    conf_dirs = {Path(d) for d in state.get("netns_conf_dirs", [])}
    if NETNS_CONF_DIR.is_dir():
        conf_dirs |= {d for d in NETNS_CONF_DIR.iterdir() if pattern.fullmatch(d.name)}
    for conf_dir in conf_dirs:
        if conf_dir.parent == NETNS_CONF_DIR and pattern.fullmatch(conf_dir.name):
            shutil.rmtree(conf_dir, ignore_errors=True)
    try:
        NETNS_CONF_DIR.rmdir()  # only when empty: other labs, or the admin, may have entries
    except OSError:
        pass

    workdir = Path(state["workdir"]) if "workdir" in state else None
    if workdir is not None and workdir != LAB_ROOT / prefix:
        (workdir / "lab.json").unlink(missing_ok=True)  # a caller's workdir keeps its logs and config
    shutil.rmtree(LAB_ROOT / prefix, ignore_errors=True)

    leftover = [n for n in netns.listnetns() if pattern.fullmatch(n)]
    if leftover:
        errors.append(f"namespaces still present: {leftover}")
    if errors:
        raise LabError(f"lab {prefix!r} not fully removed: " + "; ".join(errors))


def _remove_guest_links(hv_ns: str, guests: int) -> None:
    """The guests' taps and the bridge; they would go with the namespace, but say so plainly."""
    if hv_ns not in netns.listnetns():
        return
    with IPRoute(netns=hv_ns, flags=0) as hv:
        for ifname in [f"tap-vm{i}" for i in range(1, guests + 1)] + [BRIDGE]:
            for idx in hv.link_lookup(ifname=ifname):
                hv.link("del", index=idx)


def _ns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _stop_processes(names: set[str], recorded: list[dict]) -> None:
    """Stop the sinks we recorded and any other process living in one of the lab's namespaces."""
    lab_ns = {i for i in (_ns_id(str(NETNS_RUN_DIR / n)) for n in names) if i is not None}
    victims = set()
    for proc in recorded:  # still ours only if it runs the command we started
        if _cmdline(proc["pid"]) == proc["argv"]:
            victims.add(proc["pid"])
    if lab_ns:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _ns_id(f"/proc/{entry.name}/ns/net") in lab_ns:
                victims.add(int(entry.name))
    victims.discard(os.getpid())
    if not victims:
        return
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
        for pid in victims:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while victims and time.monotonic() < deadline:
            victims = {pid for pid in victims if _alive(pid)}
            if victims:
                time.sleep(0.02)
        if not victims:
            return
        if sig == signal.SIGTERM:
            log.warning("lab processes %s ignored SIGTERM; killing them", sorted(victims))
    raise LabError(f"processes {sorted(victims)} survived SIGKILL")


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")[:-1]


def _alive(pid: int) -> bool:
    """False once pid has exited; reaps it if it is our child (lab_up and lab_down in one process)."""
    if pid in _children:
        if _children[pid].poll() is None:
            return True
        del _children[pid]
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
