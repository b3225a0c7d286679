"""netskin-interceptor: the daemon that enforces every VM's skin.

Start-up order matters: compile every VM's assigned skin, bind the queues, then install the
netfilter rules, so the first packet a VM sends already meets its skin. Shutdown reverses it:
rules out first (no new packets queue), held packets verdicted, queues unbound. All tasks live
in one trio nursery; SIGINT/SIGTERM cancel it, SIGHUP rescans the skin library.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import signal
import struct
import sys
import time
from dataclasses import replace
from pathlib import Path

import trio

from interceptor import control, identity, nat, rules
from interceptor.assignments import Assignment, AssignmentStore, SkinCopy
from interceptor.compiled import NO_SKIN, CompiledSkin
from interceptor.library import Entry, SkinLibrary
from interceptor.profiles import load_profile, profile_dirs
from interceptor.schema import ConfigError, HostConfig, SkinError, UserError, compile_document, load_host_config
from interceptor.shell import Shell, VmPath

log = logging.getLogger("netskin.daemon")

RESCAN_INTERVAL_S = 0.5
DNS_PROBE_INTERVAL_S = 2.0
FLOW_EXPIRY_POLLS = 10  # every 5 s
DNS_PROBE_TIMEOUT_S = 1.0


class Daemon:
    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.store = AssignmentStore(Path(config.state_dir))
        self.library = SkinLibrary.for_config(config)
        self.shell = Shell(fail_open=config.fail_mode == "open", host_uplink_kbps=config.host_uplink_kbps)
        self.assignments: dict[str, Assignment] = {}
        self.profile_dirs = profile_dirs(config.rules_dir)
        self._library_stamp = None
        self._cancel: trio.CancelScope | None = None
        # Identity (MAC, MTU, ip_address, DNS redirection) is kernel state the daemon keeps in
        # line with each VM's skin. Changing it takes netlink and iptables round trips, so it runs
        # in a worker thread, one change at a time, while the data path keeps going.
        self._identity_lock = trio.Lock()
        self._identity_pending: set[str] = set()
        self.identity_problems: dict[str, list[str]] = {}
        self.identity_state: dict[str, dict] = {}
        self._claims: dict[str, str] = {}  # vm → the skin address claimed on the host for it
        self._nat_plans: list | None = None
        self.dns_targets: dict[str, dict[int, str | None]] = {}  # vm → {4: server, 6: server}
        self._dns_alive: dict[str, dict[str, bool]] = {}  # vm → server → answered the last probe
        self._nursery: trio.Nursery | None = None

    # -- start-up -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Compile every VM's skin and bind its queues (before any rule steers traffic)."""
        self._library_stamp = self.library.stamp()
        for index, (name, vm) in enumerate(self.config.vms.items()):
            up, down = self.config.queue_numbers(index)
            path = VmPath(name=name, index=index, interface=vm.interface, uplink_queue=up, downlink_queue=down)
            assignment = self.store.load(name)
            if assignment is None:
                assignment = Assignment(vm=name)
                if vm.skin:
                    try:
                        assignment.active = self._copy(vm.skin)
                        assignment.generation = 1
                        self.store.save(assignment)
                    except UserError as exc:
                        log.error("vm %s: configured skin not applied: %s", name, exc)
            self.assignments[name] = assignment
            try:
                compiled = self._compile(assignment.active)
            except UserError as exc:
                log.error("vm %s: skin %r cannot be compiled (%s); running it without a skin", name,
                          assignment.active.name if assignment.active else None, "; ".join(exc.lines))
                compiled = NO_SKIN
            path.set_skin(compiled, assignment.generation)
            self.shell.add_vm(path)
            self._capture_original(name)
            self.sync_identity(name)
            log.info("vm %s: queues %d/%d, skin %r generation %d", name, up, down,
                     path.skin.name, assignment.generation)

    def _copy(self, name: str) -> SkinCopy:
        """A copy of the library's valid skin ``name`` (``UserError`` if unknown or invalid)."""
        entry = self.library.entry(name)
        if entry.errors:
            raise SkinError(list(entry.errors))
        return SkinCopy(entry.name, entry.document, str(entry.path))

    def _compile(self, copy: SkinCopy | None) -> CompiledSkin:
        """Compile a stored skin and resolve its security profile (``UserError`` if either fails)."""
        if copy is None:
            return NO_SKIN
        compiled = compile_document(copy.document, copy.name)
        if compiled.security_profile:
            compiled = replace(compiled, firewall=load_profile(compiled.security_profile, self.profile_dirs))
        return compiled

    # -- identity -----------------------------------------------------------------------------

    def _capture_original(self, vm: str) -> None:
        """Before a VM's first skin: record its address, MAC, MTU and resolvers as the host sees them."""
        assignment = self.assignments[vm]
        if assignment.original is not None:
            return
        try:
            assignment.original = identity.capture(vm, self.config.vms[vm]).to_json()
        except identity.IdentityError as exc:
            log.error("vm %s: original configuration not captured: %s", vm, exc)
            return
        self.store.save(assignment)
        log.info("vm %s: original configuration captured: %s", vm, assignment.original)

    def _wanted_identity(self, vm: str) -> dict:
        """The identity ``vm`` should have now: its skin's fields, else its original ones."""
        skin = self.shell.paths[vm].skin
        original = self.assignments[vm].original or {}
        return {
            "mac": skin.mac_address or original.get("mac"),
            "mtu": skin.mtu or original.get("mtu"),
            "host_mtu": skin.mtu or original.get("host_mtu"),
            "ip_address": skin.ip_address,
            "dns_servers": list(skin.dns_servers),
        }

    def _nat_plan(self, vm: str) -> nat.NatPlan:
        config = self.config.vms[vm]
        targets = self.dns_targets.get(vm, {})
        return nat.NatPlan(vm=vm, interface=config.interface, address=config.address, address6=config.address6,
                           ip_address=self.shell.paths[vm].skin.ip_address, dns4=targets.get(4),
                           dns6=targets.get(6))

    def _pick_dns_targets(self, vm: str) -> None:
        """The first configured server of each address family (the DNS watcher moves past dead ones)."""
        servers = self.shell.paths[vm].skin.dns_servers
        alive = self._dns_alive.get(vm, {})
        targets: dict[int, str | None] = {4: None, 6: None}
        for version in (4, 6):
            family = [s for s in servers if ipaddress.ip_address(s).version == version]
            answering = [s for s in family if alive.get(s, True)]
            targets[version] = (answering or family or [None])[0]
        self.dns_targets[vm] = targets

    def sync_identity(self, vm: str) -> None:
        """Bring ``vm``'s MAC, MTU, NAT and address claim in line with its skin (blocking)."""
        vm_config = self.config.vms[vm]
        skin = self.shell.paths[vm].skin
        original = self.assignments[vm].original
        wanted = self._wanted_identity(vm)
        problems: list[str] = []
        unset: list[str] = []
        state: dict = {"asked": wanted, "unset": unset}
        original_obj = identity.Original.from_json(original) if original else None
        current = {}
        if original_obj is not None:
            try:
                current = identity.read(vm_config, original_obj, vm_name=vm)
            except identity.IdentityError as exc:
                problems.append(f"identity not readable: {exc}")
        setters = {
            "mac": lambda mac: identity.set_mac(vm_config, mac, vm_name=vm),
            "mtu": lambda mtu: identity.set_mtu(vm_config, mtu, original_obj, vm_name=vm),
        }
        # Without a netns the host only sees the VM's MAC in its neighbour table; it never sets it
        # unless a skin asks (and then fails verification, unless the skin made it optional).
        if vm_config.netns is None and skin.mac_address is None:
            wanted["mac"] = None
        failed: set[str] = set()
        differs = [key for key in ("mac", "mtu", "host_mtu") if wanted[key] is not None
                   and current.get(key) != wanted[key]]
        if differs and skin.mac_address is None and skin.mtu is None and original_obj is not None:
            # Back to the original (revert, or a skin without identity): restore() puts each end
            # back as it was, even where the VM's and the host's MTUs differed.
            try:
                identity.restore(vm_config, original_obj, vm_name=vm)
            except identity.IdentityError as exc:
                problems.append(f"original identity not restored: {exc}")
            differs = []
        for field, key in (("mac_address", "mac"), ("mtu", "mtu")):
            want = wanted[key]
            if want is None or (key not in differs and (key != "mtu" or "host_mtu" not in differs)):
                continue
            try:
                setters[key](want)
            except identity.IdentityError as exc:
                failed.add(key)
                if getattr(skin, field) is not None and field in skin.optional:
                    unset.append(f"{field}: {exc}")
                else:
                    problems.append(f"{field} {want} not set: {exc}")
        self._pick_dns_targets(vm)
        # The skin's address: peers must be able to reach it, then NAT maps it to the VM.
        claimed = self._claims.get(vm)
        if claimed is not None and claimed != skin.ip_address:
            try:
                identity.release_address(claimed, vm_config, vm_name=vm)
                del self._claims[vm]
            except identity.IdentityError as exc:
                problems.append(f"ip_address {claimed} not released: {exc}")
        if skin.ip_address is not None and vm not in self._claims:
            try:
                identity.claim_address(skin.ip_address, vm_config, vm_name=vm)
                self._claims[vm] = skin.ip_address
            except identity.IdentityError as exc:
                problems.append(f"ip_address {skin.ip_address} not claimed: {exc}")
        # Only VMs that need translation get rules; with none, no nat chains exist at all (and
        # the kernel does not start tracking connections for netskin's sake).
        plans = [plan for plan in (self._nat_plan(name) for name in self.shell.paths)
                 if plan.ip_address or plan.dns4 or plan.dns6]
        if plans != self._nat_plans:
            try:
                if plans:
                    nat.install_nat(plans)
                else:
                    nat.remove_nat()  # also what a crashed run left behind
                self._nat_plans = plans
            except (rules.RulesError, ValueError) as exc:
                problems.append(f"NAT rules not installed: {exc}")
        if original_obj is not None:
            try:
                current = identity.read(vm_config, original_obj, vm_name=vm)
            except identity.IdentityError as exc:
                problems.append(f"identity not readable: {exc}")
        for key in ("mac", "mtu", "host_mtu"):
            if wanted[key] is not None and key in current and current[key] != wanted[key] \
                    and key not in failed and (key != "host_mtu" or "mtu" not in failed):
                problems.append(f"{key} reads back {current[key]!r}, asked {wanted[key]!r}")
        nat_plan = self._nat_plan(vm)
        state.update(current=current, nat={"ip_address": nat_plan.ip_address, "dns4": nat_plan.dns4,
                                           "dns6": nat_plan.dns6})
        self.identity_state[vm] = state
        self.identity_problems[vm] = problems
        if problems:
            log.error("vm %s: identity: %s", vm, "; ".join(problems))

    async def _sync_identity_soon(self, vm: str) -> None:
        self._identity_pending.add(vm)
        try:
            async with self._identity_lock:
                await trio.to_thread.run_sync(self.sync_identity, vm)
        finally:
            self._identity_pending.discard(vm)

    def _release_identity(self) -> None:
        """On exit: remove the NAT rules and the address claims the daemon owns."""
        for vm, address in self._claims.items():
            try:
                identity.release_address(address, self.config.vms[vm], vm_name=vm)
            except identity.IdentityError as exc:
                log.error("vm %s: could not release %s: %s", vm, address, exc)
        self._claims.clear()
        nat.remove_nat()

    def install_rules(self) -> None:
        queues = [
            rules.VmQueues(p.interface, p.uplink_queue, p.downlink_queue) for p in self.shell.paths.values()
        ]
        rules.install(queues, fail_open=self.config.fail_mode == "open")

    async def run(self) -> None:
        self.prepare()
        self.install_rules()
        # Everything allocated so far lives for the daemon's lifetime: move it out of the
        # collector's sight so full collections stay short on the hot path.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                self._nursery = nursery
                await nursery.start(self.shell.run)
                await nursery.start(control.serve, Path(self.config.control_socket), self.handle)
                nursery.start_soon(self._signals)
                nursery.start_soon(self._watch_library)
                nursery.start_soon(self._watch_dns_servers)
                log.info("netskin-interceptor ready: %d VM(s), fail_mode=%s", len(self.shell.paths),
                         self.config.fail_mode)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        try:
            rules.remove()
            self._release_identity()
        finally:
            released = self.shell.release_all()
            self.shell.close()
            log.info("netskin-interceptor stopped: rules removed, %d held packet(s) released", released)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: rescanning the skin library")
                    self.rescan()
                else:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    self._cancel.cancel()
                    return

    # -- skins --------------------------------------------------------------------------------

    def _path(self, vm: str) -> VmPath:
        try:
            return self.shell.paths[vm]
        except KeyError:
            known = ", ".join(self.shell.paths) or "none"
            raise control.ControlError(
                f"unknown VM '{vm}' (configured VMs: {known}); add it under [vms.{vm}] in the host config"
            ) from None

    def _enforce(self, vm: str, assignment: Assignment) -> None:
        """Persist, then swap: a crash in between re-applies the persisted state on restart."""
        compiled = self._compile(assignment.active)
        self.store.save(assignment)
        self.assignments[vm] = assignment
        self._path(vm).set_skin(compiled, assignment.generation)
        log.info("vm %s: skin %r generation %d (shadow %r)", vm, compiled.name, assignment.generation,
                 assignment.shadow.name if assignment.shadow else None)

    def apply(self, vm: str, copy: SkinCopy) -> Assignment:
        self._path(vm)
        old = self.assignments[vm]
        self._compile(copy)  # refuse before touching anything
        new = Assignment(vm=vm, active=copy, shadow=old.active, generation=old.generation + 1,
                         original=old.original, identity=old.identity)
        self._enforce(vm, new)
        return new

    def rollback(self, vm: str) -> Assignment:
        self._path(vm)
        old = self.assignments[vm]
        if old.shadow is None:
            raise control.ControlError(f"VM '{vm}' has no shadow skin to roll back to; apply a skin first")
        new = Assignment(vm=vm, active=old.shadow, shadow=old.active, generation=old.generation + 1,
                         original=old.original, identity=old.identity)
        self._enforce(vm, new)
        return new

    def revert(self, vm: str) -> Assignment:
        self._path(vm)
        old = self.assignments[vm]
        new = Assignment(vm=vm, active=None, shadow=old.active or old.shadow,
                         generation=old.generation + 1, original=old.original)
        self._enforce(vm, new)
        return new

    def rescan(self) -> None:
        """Re-apply active skins whose drop-in file changed; keep the last good one on error."""
        entries: dict[str, Entry] = {entry.name: entry for entry in self.library.entries()}
        for vm, assignment in self.assignments.items():
            active = assignment.active
            if active is None:
                continue
            entry = entries.get(active.name)
            if entry is None:
                if assignment.reload_error is None and active.source and not Path(active.source).exists():
                    assignment.reload_error = f"{active.source} was deleted; VM stays on its last version"
                    log.warning("vm %s: %s", vm, assignment.reload_error)
                continue
            if entry.errors:
                error = "; ".join(entry.errors)
                if assignment.reload_error != error:
                    assignment.reload_error = error
                    log.error("vm %s: skin %r not reloaded, keeping the last good version: %s",
                              vm, active.name, error)
                continue
            if entry.document != active.document:
                try:
                    self.apply(vm, SkinCopy(entry.name, entry.document, str(entry.path)))
                except UserError as exc:  # e.g. its security profile does not exist
                    assignment.reload_error = "; ".join(exc.lines)
                    log.error("vm %s: skin %r not reloaded: %s", vm, active.name, assignment.reload_error)
                    continue
                if self._nursery is not None:
                    self._nursery.start_soon(self._sync_identity_soon, vm)
                log.info("vm %s: skin %r reloaded from %s", vm, entry.name, entry.path)
            elif assignment.reload_error:
                assignment.reload_error = None

    async def _watch_library(self) -> None:
        # Polling the directory's stamp twice a second is cheap, needs no inotify binding and
        # also catches edits made through bind mounts or network filesystems.
        polls = 0
        while True:
            await trio.sleep(RESCAN_INTERVAL_S)
            polls += 1
            if polls % FLOW_EXPIRY_POLLS == 0:  # forget idle flows so status counts live ones
                now = time.monotonic_ns()
                for path in self.shell.paths.values():
                    path.firewall.expire(now)
            stamp = self.library.stamp()
            if stamp != self._library_stamp:
                self._library_stamp = stamp
                self.rescan()

    # -- control requests ---------------------------------------------------------------------

    async def handle(self, request: dict) -> dict:
        cmd = request["cmd"]
        vm = request.get("vm")
        if cmd == "status":
            return {"vms": self.status(vm), "host": self.host_status()}
        if cmd == "apply":
            try:
                self.apply(vm, self._copy(request["skin"]))
            except UserError as exc:
                raise control.ControlError("; ".join(exc.lines)) from None
        elif cmd == "rollback":
            self.rollback(vm)
        elif cmd == "revert":
            self.revert(vm)
        elif cmd == "reload":
            self.rescan()
            return {"vms": self.status(vm)}
        else:
            raise control.ControlError(f"unknown command '{cmd}'")
        await self._sync_identity_soon(vm)
        return {"vms": self.status(vm)}

    def _verify_problems(self, vm: str) -> list[str]:
        """What keeps ``vm``'s skin from being wholly in force (the manager rolls back on any)."""
        if vm in self._identity_pending:
            return ["identity change still in progress"]
        return list(self.identity_problems.get(vm, []))

    async def _watch_dns_servers(self) -> None:
        """Probe each VM's dns_servers; redirect to the first one that answers."""
        while True:
            for vm, path in list(self.shell.paths.items()):
                servers = path.skin.dns_servers
                if not servers:
                    self._dns_alive.pop(vm, None)
                    continue
                alive = {server: await _dns_answers(server) for server in servers}
                if alive != self._dns_alive.get(vm):
                    self._dns_alive[vm] = alive
                    before = dict(self.dns_targets.get(vm, {}))
                    self._pick_dns_targets(vm)
                    if self.dns_targets[vm] != before:
                        log.warning("vm %s: DNS servers answering: %s; redirecting to %s", vm, alive,
                                    self.dns_targets[vm])
                        await self._sync_identity_soon(vm)
            await trio.sleep(DNS_PROBE_INTERVAL_S)

    def host_status(self) -> dict:
        link = self.shell.link
        return {
            "host_uplink_kbps": self.config.host_uplink_kbps,
            "shared_uplink": {str(k): v for k, v in link.snapshot().items()} if link else None,
            "held_packets": self.shell.held_packets,
        }

    def status(self, vm: str | None = None) -> dict:
        names = [vm] if vm else list(self.shell.paths)
        out = {}
        for name in names:
            path = self._path(name)
            a = self.assignments[name]
            out[name] = {
                "interface": path.interface,
                "active": a.active.name if a.active else None,
                "shadow": a.shadow.name if a.shadow else None,
                "generation": a.generation,
                "enforced_generation": path.generation,
                "original": a.original,
                "reload_error": a.reload_error,
                "verify_problems": self._verify_problems(name),
                "identity": self.identity_state.get(name),
                "firewall": path.firewall.snapshot(),
                "dns": dict(path.dns_answers),
                "icmp_errors_sent": path.icmp_sent,
                "queues": {"uplink": path.uplink_queue, "downlink": path.downlink_queue},
                "uplink": path.uplink.snapshot(),
                "downlink": path.downlink.snapshot(),
            }
        return out


async def _dns_answers(server: str) -> bool:
    """Whether ``server`` answers a DNS query on UDP 53 (any answer, even an error, counts)."""
    query_id = int.from_bytes(os.urandom(2), "big")
    # A query for the root's NS records: every resolver can answer it (or refuse it) at once.
    query = struct.pack("!6H", query_id, 0x0100, 1, 0, 0, 0) + b"\0" + struct.pack("!HH", 2, 1)
    family = trio.socket.AF_INET6 if ":" in server else trio.socket.AF_INET
    with trio.socket.socket(family, trio.socket.SOCK_DGRAM) as sock:
        with trio.move_on_after(DNS_PROBE_TIMEOUT_S):
            try:
                await sock.sendto(query, (server, 53))
                while True:
                    data = await sock.recv(4096)
                    if len(data) >= 2 and int.from_bytes(data[:2], "big") == query_id:
                        return True
            except OSError:
                return False
    return False


def _enter_netns(name: str) -> None:
    from pyroute2 import netns

    try:
        netns.setns(name, flags=0)
    except PermissionError as exc:
        raise ConfigError([f"host_netns: entering network namespace '{name}' needs CAP_SYS_ADMIN "
                           f"({exc}); run as root or grant it (systemd/README.md)"]) from exc
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError([f"host_netns: network namespace '{name}' not found ({exc})"]) from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netskin-interceptor", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="host configuration (TOML)")
    parser.add_argument("--cleanup", action="store_true", help="remove netskin's netfilter rules and exit")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_host_config(args.config)
        if config.host_netns:
            _enter_netns(config.host_netns)
        if args.cleanup:
            found = rules.remove()
            print("netskin rules removed" if found else "no netskin rules were installed")
            return 0
        trio.run(Daemon(config).run)
    except UserError as exc:
        for line in exc.lines:
            print(f"netskin-interceptor: {line}", file=sys.stderr)
        return 1
    except rules.RulesError as exc:
        print(f"netskin-interceptor: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
