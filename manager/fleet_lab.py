"""The fleet lab: a control namespace with etcd, N hypervisor hosts and one shared internet.

    {prefix}-ctl   etcd (TLS + auth; 1 or 3 members at 10.76.0.1..3) on bridge mgmt
       │  mgmt-hvK ─── mgmt0 (10.76.0.{10+K})
    {prefix}-hvK   daemon + `netskin agent` as host "hvK"; tap-vmN ─── eth0 {prefix}-vmN (10.77.N.2)
       │  up0 (10.77.0.{10+K}) ─── up-hvK
    {prefix}-inet  bridge br0 with 10.77.0.2 and .3: echo, iperf3 and DNS, as in the one-host lab

With ``idle_vms``, each host also has that many VMs without traffic: a veth pair in its hv
namespace (``idleN`` configured as the VM's interface, its peer ``idleNp`` left alone), named
``idleN`` across the fleet. The daemon shapes them like any VM; they are there to give the fleet
many VMs to assign cheaply (the benchmark's 1000-VM row).

VMs are numbered across the fleet (host 1 has vm1..vmM, host 2 the next M), so a VM's name is
unique in the fleet and ``netskin apply vm1,vm3 SKIN`` needs no ``HOST/``. Each host is one
``manager.lab.Lab`` (its hv namespace, its VMs, the shared inet), built with the one-host lab's
own pieces. Each hv namespace has its own netfilter, so every host's daemon uses the same queue
numbers. The manager's configuration (``manager.toml``) reaches etcd from the ctl namespace:
``ip netns exec {prefix}-ctl netskin --config …/manager.toml status``.

Everything started or built is recorded in the lab's state file as it happens, so
``lab_down(prefix)`` (the one-host lab's) removes a half-built fleet lab too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import trio
from pyroute2 import IPRoute, netns

from interceptor.schema import load_host_config
from manager import fleet
from manager.etcd_lab import CLIENT_PORT, Etcd, trio_in_netns
from manager.lab import (INET_ADDRESSES, INET_ADDRESSES6, LAB_ROOT, Lab, LabError, _PREFIX_RE, _REPO_ROOT,
                         _build_vm_links, _configure, _index, _lab_ns_re, _load_state, _make_lab, _save_state,
                         _set_up, _start_sinks, _sysctl, _write_resolv_confs, host_config_toml, lab_down,
                         wait_namespaces_ready)
from manager.process import DaemonProcess
from manager.store import Store

MGMT_NET = "10.76.0"  # etcd member j at .j, host K at .{10 + K}
UPLINK_NET, UPLINK_NET6 = "10.77.0", "fd77::"  # inet at .2/.3 (as in the one-host lab), host K at .{10 + K}
MAX_HOSTS = 16
MAX_FLEET_VMS = 99  # VM n is 10.77.n.0/24; 10.77.100 and up belong to the guests' bridge layout
MAX_IDLE_VMS = 500  # per host; idle VM n's address is 10.78.n//250.n%250+1 (never routed)
LEASE_TTL_S = 5
READY_TIMEOUT_S = 20.0


@dataclass
class FleetLab:
    prefix: str
    ctl_ns: str
    inet_ns: str
    hosts: dict[str, Lab]  # "hv1" → that host's lab (its hv namespace, its VMs, the shared inet)
    workdir: Path
    manager_config: Path
    endpoints: list[str]
    state_path: Path
    idle: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # host → its VMs without traffic

    @property
    def namespaces(self) -> list[str]:
        names = [self.ctl_ns, self.inet_ns]
        for host in self.hosts.values():
            names += [host.hv_ns, *(vm.netns for vm in host.vms)]
        return names

    @property
    def inet_address(self) -> str:
        return INET_ADDRESSES[0]

    def host_of(self, vm: str) -> str:
        for name, host in self.hosts.items():
            if any(v.name == vm for v in host.vms):
                return name
        raise LabError(f"fleet lab {self.prefix!r} has no VM {vm!r}")

    def lab_of(self, vm: str) -> Lab:
        return self.hosts[self.host_of(vm)]

    def vms(self) -> list[str]:
        """The VMs with a namespace (traffic); ``idle_vms`` are the others."""
        return [vm.name for host in self.hosts.values() for vm in host.vms]

    def idle_vms(self) -> list[str]:
        return [vm for names in self.idle.values() for vm in names]

    def host_config(self, host: str) -> Path:
        return self.hosts[host].config_path

    # -- the manager's side ---------------------------------------------------------------------

    def netskin(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`netskin ARGS --config manager.toml`, run in the ctl namespace; output captured."""
        return subprocess.run(["ip", "netns", "exec", self.ctl_ns, sys.executable, "-m", "manager.cli", *args,
                               "--config", str(self.manager_config)], capture_output=True, text=True,
                              timeout=timeout, env=_env())

    def netskin_json(self, *args: str) -> dict:
        done = self.netskin(*args, "--json")
        try:
            return json.loads(done.stdout)
        except ValueError:
            raise LabError(f"netskin {' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}") from None

    def store_call(self, fn: Callable[[Store], Any]) -> Any:
        """``await fn(store)`` with the manager's credentials, from inside the ctl namespace."""
        config = load_host_config(self.manager_config)

        async def main() -> Any:
            async with Store.from_config(config.store) as store:
                return await fn(store)

        return trio_in_netns(self.ctl_ns, main)

    # -- processes ------------------------------------------------------------------------------

    def _state(self) -> dict:
        state = _load_state(self.prefix)
        if state is None:
            raise LabError(f"fleet lab {self.prefix!r} has no state file; it was removed")
        return state

    def start_daemon(self, host: str) -> int:
        state = self._state()
        pid = _start_daemon(self.hosts[host], len(self.hosts[host].vms) + len(self.idle.get(host, ())))
        _record(state, f"daemon-{host}", pid, DaemonProcess.command(self.host_config(host)))
        return pid

    def start_agent(self, host: str, lease_ttl_s: int | None = None) -> int:
        state = self._state()
        lab = self.hosts[host]
        ttl = lease_ttl_s or state.get("lease_ttl_s", LEASE_TTL_S)
        pid = _start_agent(lab, ttl)
        _record(state, f"agent-{host}", pid, _agent_argv(lab.config_path, ttl))
        return pid

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop a recorded process: ``daemon-hv2``, ``agent-hv2`` or ``etcd-1``."""
        state = self._state()
        for proc in state["processes"]:
            if proc["name"] == name:
                _stop_pid(proc["pid"], proc["argv"], sig, timeout)

    def stop_etcd(self, sig: int = signal.SIGKILL) -> None:
        for proc in self._state()["processes"]:
            if proc["name"].startswith("etcd-"):
                _stop_pid(proc["pid"], proc["argv"], sig, 10.0)

    def start_etcd(self) -> None:
        """Start every etcd member again on its data (after ``stop_etcd``); wait until it answers."""
        state = self._state()
        for proc in list(state["processes"]):
            if proc["name"].startswith("etcd-"):
                pid = _spawn(self.ctl_ns, proc["argv"], self.workdir / "etcd" / f"{proc['name']}.log")
                _record(state, proc["name"], pid, proc["argv"])
        _wait(f"etcd in {self.ctl_ns} answering", lambda: self._etcd_answers(), READY_TIMEOUT_S)

    def _etcd_answers(self) -> bool:
        try:
            # A key the manager's role may read (its role covers /netskin/ only).
            self.store_call(lambda store: store.get(f"{fleet.ROOT}/"))
            return True
        except Exception:
            return False

    def alive_hosts(self) -> set[str]:
        async def alive(store: Store) -> set[str]:
            _, kvs = await store.get_prefix(fleet.hosts_prefix())
            return {key.host for key in map(fleet.parse_host_key, (kv.key for kv in kvs))
                    if key is not None and key.kind == "alive"}

        return self.store_call(alive)

    def describe(self) -> dict:
        return {
            "prefix": self.prefix, "kind": "fleet", "manager_config": str(self.manager_config),
            "etcd": {"namespace": self.ctl_ns, "endpoints": self.endpoints},
            "namespaces": self.namespaces,
            "hosts": {name: {"namespace": lab.hv_ns, "config": str(lab.config_path),
                             "management_address": _host_mgmt_address(i),
                             "vms": {vm.name: {"namespace": vm.netns, "interface": vm.interface,
                                               "address": vm.address} for vm in lab.vms}}
                      for i, (name, lab) in enumerate(self.hosts.items(), start=1)},
            "idle_vms": self.idle,
            "inet": {"namespace": self.inet_ns, "addresses": list(INET_ADDRESSES)},
        }


def _host_mgmt_address(k: int) -> str:
    return f"{MGMT_NET}.{10 + k}"


def _env() -> dict:
    # A checkout without an installed package still finds manager/ and interceptor/.
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH")])))


def _idle_address(n: int) -> str:
    return f"10.78.{n // 250}.{n % 250 + 1}"


def _make_fleet_lab(prefix: str, hosts: int, vms: int, members: int, workdir: Path, idle_vms: int = 0) -> FleetLab:
    labs = {}
    for k in range(1, hosts + 1):
        host_dir = workdir / f"hv{k}"
        labs[f"hv{k}"] = _make_lab(prefix, vms, host_dir, first_vm=(k - 1) * vms + 1, hv_ns=f"{prefix}-hv{k}")
    scheme = "https"
    return FleetLab(prefix=prefix, ctl_ns=f"{prefix}-ctl", inet_ns=f"{prefix}-inet", hosts=labs, workdir=workdir,
                    manager_config=workdir / "manager.toml",
                    endpoints=[f"{scheme}://{MGMT_NET}.{j}:{CLIENT_PORT}" for j in range(1, members + 1)],
                    state_path=workdir / "lab.json",
                    idle={f"hv{k}": [f"idle{(k - 1) * idle_vms + j}" for j in range(1, idle_vms + 1)]
                          for k in range(1, hosts + 1)})


def load_fleet_lab(prefix: str) -> FleetLab:
    state = _load_state(prefix)
    if state is None or state.get("kind") != "fleet" or not state.get("complete"):
        raise LabError(f"no complete fleet lab {prefix!r} (no {LAB_ROOT / prefix / 'lab.json'}); "
                       f"run `netskin lab up --hosts N`")
    return _make_fleet_lab(prefix, state["hosts"], state["vms"], state["etcd_members"], Path(state["workdir"]),
                           state.get("idle_vms", 0))


# --- building ------------------------------------------------------------------------------------


def fleet_lab_up(prefix: str = "nsk", hosts: int = 3, vms: int = 2, *, etcd_members: int = 1,
                 idle_vms: int = 0, lease_ttl_s: int = LEASE_TTL_S,
                 say: Callable[[str], None] | None = None) -> FleetLab:
    """Build the fleet lab and start etcd, every host's daemon and agent; on failure remove it all."""
    if not _PREFIX_RE.fullmatch(prefix):
        raise LabError(f"lab prefix {prefix!r}: use 1-16 lowercase letters and digits, starting with a letter")
    if not 1 <= hosts <= MAX_HOSTS:
        raise LabError(f"fleet lab with {hosts} hosts: choose between 1 and {MAX_HOSTS}")
    if vms < 1 or hosts * vms > MAX_FLEET_VMS:
        raise LabError(f"fleet lab with {hosts} hosts × {vms} VMs: at least 1 VM per host and at most "
                       f"{MAX_FLEET_VMS} VMs in all")
    if not 0 <= idle_vms <= MAX_IDLE_VMS:
        raise LabError(f"{idle_vms} VMs without traffic per host: choose between 0 and {MAX_IDLE_VMS}")
    if etcd_members not in (1, 3):
        raise LabError(f"--etcd-members {etcd_members}: choose 1 or 3")
    existing = [n for n in netns.listnetns() if _lab_ns_re(prefix).fullmatch(n)]
    if existing or (LAB_ROOT / prefix / "lab.json").exists():
        raise LabError(f"lab {prefix!r} already exists ({', '.join(existing) or 'state file'}); "
                       f"remove it with `netskin lab down --prefix {prefix}` or choose another prefix")
    say = say or (lambda text: None)
    workdir = LAB_ROOT / prefix
    lab = _make_fleet_lab(prefix, hosts, vms, etcd_members, workdir, idle_vms)
    state = {"prefix": prefix, "kind": "fleet", "hosts": hosts, "vms": vms, "etcd_members": etcd_members,
             "idle_vms": idle_vms,
             "lease_ttl_s": lease_ttl_s, "workdir": str(workdir), "namespaces": [], "netns_conf_dirs": [],
             "processes": [], "complete": False}
    try:
        for d in [workdir, workdir / "logs", workdir / "etcd", workdir / "manager" / "skins.d"] + [
                h.workdir / sub for h in lab.hosts.values() for sub in ("", "state", "skins.d", "logs")]:
            d.mkdir(parents=True, exist_ok=True)
        _save_state(state)
        _build(lab, state, say, lease_ttl_s)
    except BaseException as exc:
        say(f"fleet lab {prefix} failed to build; removing what was built")
        try:
            lab_down(prefix)
        except Exception as cleanup_exc:
            exc.add_note(f"and removing the half-built lab failed too: {cleanup_exc}")
        raise
    return lab


def _build(lab: FleetLab, state: dict, say, lease_ttl_s: int) -> None:
    t0 = time.monotonic()
    say(f"namespaces: {lab.ctl_ns}, {lab.inet_ns}, {len(lab.hosts)} hosts, {len(lab.vms())} VMs")
    for name in lab.namespaces:
        netns.create(name)
        state["namespaces"].append(name)
        _save_state(state)
    no_dad = {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0}
    for name in lab.namespaces:
        _sysctl(name, no_dad)
    for host in lab.hosts.values():
        _sysctl(host.hv_ns, {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1})

    say("links: management bridge in ctl, uplinks to the shared inet, a veth per VM")
    _build_fleet_links(lab)
    for name, host in lab.hosts.items():
        _build_vm_links(host)
        _build_idle_links(host, lab.idle[name])
    wait_namespaces_ready(lab.namespaces)
    for host in lab.hosts.values():
        _write_resolv_confs(host, state)
    sinks = dataclasses.replace(next(iter(lab.hosts.values())), workdir=lab.workdir)
    _start_sinks(sinks, state)

    members = [f"{MGMT_NET}.{j}" for j in range(1, state["etcd_members"] + 1)]
    say(f"etcd: {len(members)} member(s) in {lab.ctl_ns} with TLS and auth (lab CA, one user per host)")
    etcd = Etcd(lab.ctl_ns, members=members, own_netns=False, tls=True, auth_hosts=list(lab.hosts),
                workdir=lab.workdir / "etcd", detach=True)
    # If it fails to start, lab_down still stops it: it runs in one of the lab's namespaces.
    etcd.start()
    for j, proc in enumerate(etcd.procs, start=1):
        _record(state, f"etcd-{j}", proc.pid, etcd.member_argv(j - 1))
    assert etcd.pki is not None
    _write_manager_config(lab, etcd)

    for name, host in lab.hosts.items():
        host.config_path.write_text(host_config_toml(host) + _idle_toml(lab.idle[name]) + _store_table(lab, etcd, name))
    for name, host in lab.hosts.items():
        idle = f" and {len(lab.idle[name])} without traffic" if lab.idle[name] else ""
        say(f"{name}: daemon and agent ({len(host.vms)} VMs: {', '.join(vm.name for vm in host.vms)}{idle})")
    # The daemons start together: one with hundreds of VMs takes a while to install its steering.
    with ThreadPoolExecutor(max_workers=len(lab.hosts)) as pool:
        every = len(lab.vms()) + len(lab.idle_vms())  # they share the machine's cores
        pids = dict(zip(lab.hosts, pool.map(lambda host: _start_daemon(host, every), lab.hosts.values())))
    for name, host in lab.hosts.items():
        _record(state, f"daemon-{name}", pids[name], DaemonProcess.command(host.config_path))
        _record(state, f"agent-{name}", _start_agent(host, lease_ttl_s), _agent_argv(host.config_path, lease_ttl_s))
    _wait("every host's agent alive in the store", lambda: lab.alive_hosts() == set(lab.hosts), READY_TIMEOUT_S,
          lambda: "\n".join((h.workdir / "logs" / "agent.log").read_text(errors="replace")[-1500:]
                            for h in lab.hosts.values() if (h.workdir / "logs" / "agent.log").exists()))
    state["complete"] = True
    _save_state(state)
    say(f"fleet lab {lab.prefix} up in {time.monotonic() - t0:.1f} s")


def _build_fleet_links(lab: FleetLab) -> None:
    with IPRoute(netns=lab.ctl_ns, flags=0) as ctl:
        _set_up(ctl, "lo")
        ctl.link("add", ifname="mgmt", kind="bridge")
        members = len(lab.endpoints)
        _configure(ctl, "mgmt", "02:76:00:00:00:01", [(f"{MGMT_NET}.{j}", 24) for j in range(1, members + 1)])
    with IPRoute(netns=lab.inet_ns, flags=0) as inet:
        _set_up(inet, "lo")
        inet.link("add", ifname="br0", kind="bridge")
        _configure(inet, "br0", "02:77:00:00:00:02",
                   [(a, 24) for a in INET_ADDRESSES] + [(a, 64) for a in INET_ADDRESSES6])
    for k, host in enumerate(lab.hosts.values(), start=1):
        with IPRoute(netns=lab.ctl_ns, flags=0) as ctl:
            ctl.link("add", ifname=f"mgmt-hv{k}", kind="veth", peer={"ifname": "mgmt0", "net_ns_fd": host.hv_ns})
            idx = _index(ctl, f"mgmt-hv{k}")
            ctl.link("set", index=idx, master=_index(ctl, "mgmt"))
            ctl.link("set", index=idx, state="up")
        with IPRoute(netns=lab.inet_ns, flags=0) as inet:
            inet.link("add", ifname=f"up-hv{k}", kind="veth", peer={"ifname": "up0", "net_ns_fd": host.hv_ns})
            idx = _index(inet, f"up-hv{k}")
            inet.link("set", index=idx, master=_index(inet, "br0"))
            inet.link("set", index=idx, state="up")
            uplink, uplink6 = f"{UPLINK_NET}.{10 + k}", f"{UPLINK_NET6}{10 + k:x}"
            # Replies to host K's VMs go back through host K; there is no default route anywhere.
            for vm in host.vms:
                inet.route("add", dst=vm.gateway.rsplit(".", 1)[0] + ".0", dst_len=24, gateway=uplink)
                inet.route("add", dst=vm.gateway6.rsplit(":", 1)[0] + ":", dst_len=64, gateway=uplink6,
                           family=socket.AF_INET6)
        with IPRoute(netns=host.hv_ns, flags=0) as hv:
            _set_up(hv, "lo")
            _configure(hv, "mgmt0", f"02:76:00:00:{k:02x}:10", [(_host_mgmt_address(k), 24)])
            _configure(hv, "up0", f"02:77:00:{k:02x}:00:01", [(uplink, 24), (uplink6, 64)])


def _build_idle_links(host: Lab, names: list[str]) -> None:
    if not names:
        return
    script = "".join(f"link add {n} type veth peer name {n}p\nlink set {n}p up\nlink set {n} up\n" for n in names)
    done = subprocess.run(["ip", "-n", host.hv_ns, "-batch", "-"], input=script, capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise LabError(f"creating {len(names)} idle VM links in {host.hv_ns} failed: {done.stderr.strip()}")


def _idle_toml(names: list[str]) -> str:
    lines = []
    for name in names:
        lines += ["", f"[vms.{name}]", f'interface = "{name}"', f'address = "{_idle_address(int(name[4:]))}"']
    return "\n".join(lines) + "\n" if lines else ""


def _write_manager_config(lab: FleetLab, etcd: Etcd) -> None:
    q = json.dumps
    pki = etcd.pki
    manager = pki.users["manager"]
    lab.manager_config.write_text("\n".join([
        f"# written by `netskin lab up` for lab {lab.prefix}; the fleet manager: [store] and no VMs",
        f"# run it in the control namespace: ip netns exec {lab.ctl_ns} netskin --config {lab.manager_config} status",
        f"state_dir = {q(str(lab.workdir / 'manager' / 'state'))}",
        f"skins_dir = {q(str(lab.workdir / 'manager' / 'skins.d'))}",
        "",
        "[store]",
        f"endpoints = {q(etcd.endpoints)}",
        f"ca_file = {q(str(pki.ca_file))}",
        f"cert_file = {q(str(manager.cert_file))}",
        f"key_file = {q(str(manager.key_file))}",
        'user = "manager"',
        f"password_file = {q(str(manager.password_file))}",
    ]) + "\n")


def _store_table(lab: FleetLab, etcd: Etcd, host: str) -> str:
    q = json.dumps
    cred = etcd.pki.users[host]
    return "\n".join(["", "[store]", f"endpoints = {q(etcd.endpoints)}", f"host = {q(host)}",
                      f"ca_file = {q(str(etcd.pki.ca_file))}", f"cert_file = {q(str(cred.cert_file))}",
                      f"key_file = {q(str(cred.key_file))}", f"user = {q(host)}",
                      f"password_file = {q(str(cred.password_file))}"]) + "\n"


def fleet_lab_down(prefix: str) -> None:
    """``lab_down``, after stopping a fleet lab's processes in order: agents first (each revokes its
    lease while etcd still answers), then daemons (each removes its steering), then etcd. Any lab."""
    state = _load_state(prefix) or {}
    if state.get("kind") == "fleet":
        order = ("agent-", "daemon-", "etcd-")
        for kind in order:
            for proc in state.get("processes", []):
                if proc["name"].startswith(kind):
                    try:
                        _stop_pid(proc["pid"], proc["argv"], signal.SIGTERM, 5.0)
                    except OSError:
                        pass  # gone meanwhile; lab_down sweeps whatever is left
    lab_down(prefix)


# --- processes -----------------------------------------------------------------------------------


def _record(state: dict, name: str, pid: int, argv: list[str]) -> None:
    state["processes"] = [p for p in state["processes"] if p["name"] != name]
    state["processes"].append({"name": name, "pid": pid, "argv": [str(a) for a in argv]})
    _save_state(state)


def _spawn(ns: str, argv: list[str], log_path: Path) -> int:
    with open(log_path, "ab") as log:
        # A new session: it outlives `netskin lab up` and ignores its terminal's Ctrl-C.
        # `ip netns exec` execs in place, so the pid runs argv.
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=_env())
    return proc.pid


def _start_daemon(host: Lab, starting_vms: int) -> int:
    """``starting_vms``: VMs the daemons starting at this moment have in all. Measured on 2 cores: a
    daemon takes about 0.25 s of CPU per VM to start (its steering and the VM's original
    configuration), so four daemons of 250 VMs starting together take over two minutes."""
    daemon = DaemonProcess(host.config_path, host.workdir / "logs" / "interceptor.log", detach=True)
    daemon.start(timeout=30 + 0.6 * starting_vms)
    return daemon.proc.pid


def _agent_argv(config: Path, lease_ttl_s: int) -> list[str]:
    return [sys.executable, "-m", "manager.cli", "agent", "--config", str(config), "--lease-ttl", str(lease_ttl_s),
            "--conditions-every", "2"]


def _start_agent(host: Lab, lease_ttl_s: int) -> int:
    return _spawn(host.hv_ns, _agent_argv(host.config_path, lease_ttl_s), host.workdir / "logs" / "agent.log")


def _cmdline(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return None


def _stop_pid(pid: int, argv: list[str], sig: int, timeout: float) -> None:
    """Signal pid if it still runs argv (ours), and wait for it to go (reaping it if it is our child)."""
    if _cmdline(pid) != argv:
        return
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        if _cmdline(pid) != argv:
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


def _wait(what: str, predicate: Callable[[], bool], timeout: float, details: Callable[[], str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise LabError(f"not within {timeout:g} s: {what}" + (f"\n{details()}" if details else ""))
