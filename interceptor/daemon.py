"""netskin-interceptor: the daemon that enforces every VM's skin.

Start-up order matters: compile every VM's assigned skin, bind the queues, then install the
netfilter rules, so the first packet a VM sends already meets its skin; only then does it tell
systemd it is ready. Shutdown (SIGINT/SIGTERM) takes the steering out first (no new packets
queue), verdicts held packets and unbinds the queues; firewall chains stay, so profiles hold while
the daemon is down. All tasks live in one trio nursery; the packets themselves are served by the
shell's data-path thread, which the trio side changes only under the shell's lock. The trio
thread never blocks on files, netlink or iptables: library scans, state writes, rule changes and
identity reconciliation run in worker threads, and their results are applied on the trio thread.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import math
import os
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import trio

from interceptor import control, identity, nat, reconcile, rules, sdnotify, vmset
from interceptor.conditions import Asked, ConditionWindow
from interceptor.assignments import Assignment, AssignmentStore, SkinCopy
from interceptor.compiled import NO_SKIN, SUPER_PACKET_BYTES, SUPER_PACKETS_QUEUED, CompiledSkin
from interceptor.engine.timeline import StepClock
from interceptor.library import Entry, SkinLibrary
from interceptor.profiles import load_profile, profile_dirs
from interceptor.libvirt_source import LibvirtSource, LibvirtVm
from interceptor.schema import (ConfigError, HostConfig, SkinError, UserError, VmConfig, compile_document,
                                load_host_config)
from interceptor.shards import Shards
from interceptor.worker import Worker
from interceptor.timeline import compile_document_timeline

log = logging.getLogger("netskin.daemon")

RESCAN_INTERVAL_S = 0.5
DNS_PROBE_INTERVAL_S = 2.0
DNS_PROBE_TIMEOUT_S = 1.0
RULES_TIMEOUT_S = 10.0
FIREWALL_COUNTERS_MAX_AGE_S = 0.5
NO_TARGETS: dict[int, str] = {}  # a VM whose DNS is not redirected (read only)
CONDITIONS_BATCH = 64  # VMs ticked between two yields to the trio loop (each costs a scheduler round)
INDEXES_INTERVAL_S = 1.0  # the VM interfaces' indexes are read again at least this often...
INDEXES_MIN_INTERVAL_S = 0.05  # ...and at most this often (on packets of unknown devices)
LIBVIRT_QUEUE_ROOM_VMS = 64  # with [libvirt]: VMs the kernel queues make room for beyond [vms]
FAULT_INJECTION_ENV = "NETSKIN_FAULT_INJECTION"  # "1": the control socket takes "fault" (tests)


def set_data_path_nice(nice: int) -> None:
    """Give the calling thread this niceness; threads it starts later (the data path's among them)
    inherit it, the helper process puts itself back to 0."""
    if nice == 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:
        log.warning("data path niceness %d not set (%s); it runs at the default priority", nice, exc.strerror)


class Daemon:
    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.store = AssignmentStore(Path(config.state_dir))
        self.library = SkinLibrary.for_config(config)
        # Every engine worker's VMs in one view (interceptor.shards): child processes started at
        # ``prepare`` (worker 0 in this process with ``isolate_data_path`` false or a shared uplink).
        self.shell = Shards(workers=config.worker_count, queue_numbers=config.queue_numbers, gso=config.gso,
                            shared_uplink=bool(config.host_uplink_kbps), nice=config.data_path_nice,
                            isolate=config.isolate_data_path,
                            fail_open=config.fail_mode == "open", host_uplink_kbps=config.host_uplink_kbps,
                            max_held=config.max_held_packets, batch_verdicts=config.batch_verdicts,
                            slice_us=config.data_path_slice_us,
                            fault_injection=os.environ.get(FAULT_INJECTION_ENV) == "1")
        # The VMs the daemon steers: the host config's [vms.*], and the libvirt VMs of running
        # domains as they come and go (interceptor.vmset; ``libvirt_vms`` holds their entries).
        self.vms: dict[str, VmConfig] = dict(config.vms)
        self.libvirt_vms: dict[str, LibvirtVm] = {}
        self.libvirt_source: LibvirtSource | None = None
        self._rules_lock = trio.Lock()  # one iptables-save → iptables-restore at a time
        # Moves between the queue pairs (``_steer``): asked so far, and taken along by a finished
        # rules transaction; one transaction at a time serves every move asked before it started.
        self._steering_lock = trio.Lock()
        self._steering_asked = 0
        self._steering_done = 0
        self.assignments: dict[str, Assignment] = {}
        self.previous: dict[str, Assignment] = {}  # vm → what was in force before its generation
        self.profile_dirs = profile_dirs(config.rules_dir)
        self._library_stamp = None
        self._cancel: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._locks: dict[str, trio.Lock] = {}  # one change at a time per VM
        # Identity (MAC, MTU, ip_address, DNS redirection) is kernel state kept in line with each
        # VM's skin by the helper process, one job at a time, from a snapshot (interceptor.reconcile).
        self._identity_lock = trio.Lock()
        self._identity_pending: set[str] = set()
        self.identity_problems: dict[str, list[str]] = {}
        self.identity_state: dict[str, dict] = {}
        self._claims: dict[str, str] = {}  # vm → the skin address claimed on the host for it
        self._nat_installed: tuple | None = None
        self.dns_targets: dict[str, dict[int, str | None]] = {}  # vm → {4: server, 6: server}
        self._dns_alive: dict[str, dict[str, bool]] = {}  # vm → server → answered the last probe
        self._firewall_counters: dict = {}
        self._firewall_counters_at = 0.0
        # Asked versus measured, per VM and direction (interceptor.conditions), ticked each second.
        self.conditions: dict[tuple[str, str], tuple[int, ConditionWindow]] = {}
        # Identity reconciliation and library scans run in a helper process (interceptor.worker),
        # so they share neither the data path's GIL nor, when pyroute2 forks, its page tables.
        self.worker = Worker()
        self._stop_requested = False  # SIGINT/SIGTERM: a clean stop (anything else is a crash)

    # -- start-up (before the data path runs: blocking is fine here) ----------------------------

    def prepare(self) -> None:
        """Compile every VM's skin, bind its queues and bring its identity in line."""
        self._library_stamp = self.library.stamp()
        for name, vm in self.vms.items():
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
            self._locks[name] = trio.Lock()
            try:
                compiled = self._compile(assignment.active)
            except UserError as exc:
                log.error("vm %s: skin %r cannot be compiled (%s); running it without a skin", name,
                          assignment.active.name if assignment.active else None, "; ".join(exc.lines))
                compiled = NO_SKIN
            worker = self.shell.place(name)
            self.shell.add_vm(name, vm.interface, *self._queues_for(compiled, worker), addresses=_addresses(vm),
                              worker=worker)
            if self._stamp_timeline(assignment, compiled):
                self.store.save(assignment)
            self.shell.set_skin(name, compiled, assignment.generation, self._timeline_clock(assignment, compiled))
            self._capture_original(name)
            self._pick_dns_targets(name)
            self._apply_identity(name, reconcile.reconcile(self._identity_job(name)))
            log.info("vm %s: worker %d, queues %d/%d, skin %r generation %d", name, worker,
                     *self.shell.queues[name], compiled.name, assignment.generation)
        # The kernel's queue length is fixed at bind: leave room for the VMs libvirt will bring.
        # Each worker process gets its VMs' skins before it binds its queues.
        self.shell.set_indexes(_interface_indexes())
        self.shell.bind(vms=len(self.vms) + (LIBVIRT_QUEUE_ROOM_VMS if self.config.libvirt else 0))

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
        compiled = compile_document(copy.document, copy.name, copy.source)
        if compiled.security_profile:
            compiled = replace(compiled, firewall=load_profile(compiled.security_profile, self.profile_dirs))
        timeline = compile_document_timeline(copy.document, copy.name, compiled, copy.source)
        if timeline is not None:
            compiled = replace(compiled, timeline=timeline)
        return compiled

    @staticmethod
    def _stamp_timeline(assignment: Assignment, compiled: CompiledSkin) -> bool:
        """Fix when the active skin's timeline starts and its seed, once per apply (persisted with
        the assignment, so a restarted daemon replays the same schedule in phase). True if changed."""
        timeline = compiled.timeline
        if timeline is None or assignment.timeline is not None:
            return False
        start = timeline.start_unix_ns if timeline.start_unix_ns is not None else time.time_ns()
        seed = timeline.seed if timeline.seed is not None else int.from_bytes(os.urandom(7), "big")
        assignment.timeline = {"start_unix_ns": start, "seed": seed}
        return True

    @staticmethod
    def _timeline_clock(assignment: Assignment, compiled: CompiledSkin) -> StepClock | None:
        """The step clock of ``compiled``'s timeline, started where the assignment says and caught
        up to now (here, not on the data path's first packet)."""
        if compiled.timeline is None or assignment.timeline is None:
            return None
        # The start is wall-clock (shared by hosts); the engine runs on the monotonic clock.
        start_ns = time.monotonic_ns() + (assignment.timeline["start_unix_ns"] - time.time_ns())
        clock = StepClock(compiled.timeline, start_ns, compiled, seed=assignment.timeline["seed"])
        clock.advance(time.monotonic_ns())
        return clock

    def _capture_original(self, vm: str) -> None:
        """Before a VM's first skin: record its address, MAC, MTU and resolvers as the host sees them."""
        assignment = self.assignments[vm]
        if assignment.original is not None:
            return
        try:
            assignment.original = identity.capture(vm, self.vms[vm]).to_json()
        except identity.IdentityError as exc:
            log.error("vm %s: original configuration not captured: %s", vm, exc)
            return
        self.store.save(assignment)
        log.info("vm %s: original configuration captured: %s", vm, assignment.original)

    def _vm_rules(self, vm: str, profile=None, *, keep_profile: bool = True) -> rules.VmRules:
        """How the rules see ``vm``: its queues, its profile (the one in force, unless given) and,
        for a bridge port, the bridge and addresses (looked up now: blocking netlink)."""
        return _with_bridge(self._vm_rules_known(vm, profile, keep_profile=keep_profile))

    def _vm_rules_known(self, vm: str, profile=None, *, keep_profile: bool = True) -> rules.VmRules:
        """``_vm_rules`` without the look-up: a libvirt VM's bridge is in its domain XML, a
        ``[vms]`` VM's (None here) is looked up by ``_with_bridge``. Does not block."""
        up, down = self.shell.queues[vm]
        config = self.vms[vm]
        entry = self.libvirt_vms.get(vm)
        bridge = entry.bridge if entry is not None and entry.kind != "ethernet" else None
        address, address6 = _addresses(config)
        return rules.VmRules(
            name=vm, interface=config.interface, uplink_queue=up, downlink_queue=down,
            profile=self.shell.paths[vm].skin.firewall if keep_profile else profile,
            bridge=bridge, address=address, address6=address6)

    def install_rules(self) -> None:
        self._install([self._vm_rules_known(vm) for vm in self.shell.paths])

    def _install(self, known: list[rules.VmRules]) -> None:
        rules.install([_with_bridge(vm) for vm in known], fail_open=self.config.fail_mode == "open",
                      mark=self.config.steering_mark, timeout_s=RULES_TIMEOUT_S)

    # -- identity -----------------------------------------------------------------------------

    def _nat_plan(self, vm: str, skin: CompiledSkin) -> nat.NatPlan:
        config = self.vms[vm]
        targets = self.dns_targets.get(vm, {})
        return nat.NatPlan(vm=vm, interface=config.interface, address=config.address, address6=config.address6,
                           ip_address=skin.ip_address, dns4=targets.get(4), dns6=targets.get(6))

    def _identity_job(self, vm: str) -> reconcile.IdentityJob:
        """A snapshot of everything ``reconcile`` needs: the worker reads nothing else."""
        # A libvirt VM whose address is unknown has no NAT plan (``cannot_enforce`` says so).
        # Only VMs with something to translate get a plan (checked before one is built: a job per
        # VM at start-up would otherwise build every VM's plan, n² with many idle VMs).
        targets = self.dns_targets
        plans = tuple(self._nat_plan(name, path.skin) for name, path in self.shell.paths.items()
                      if self.vms[name].address is not None
                      and (path.skin.ip_address or any(targets.get(name, NO_TARGETS).values())))
        return reconcile.IdentityJob(
            vm=vm, config=self.vms[vm], skin=self.shell.paths[vm].skin,
            original=self.assignments[vm].original, claimed=self._claims.get(vm), nat_wanted=plans,
            nat_installed=self._nat_installed, dns_targets=dict(self.dns_targets.get(vm, {})))

    def _apply_identity(self, vm: str, result: reconcile.IdentityResult) -> None:
        if result.claimed is None:
            self._claims.pop(vm, None)
        else:
            self._claims[vm] = result.claimed
        self._nat_installed = result.nat_installed
        self.identity_state[vm] = result.state
        self.identity_problems[vm] = result.problems
        if result.problems:
            log.error("vm %s: identity: %s", vm, "; ".join(result.problems))

    async def _sync_identity(self, vm: str) -> list[str]:
        """Bring ``vm``'s identity in line with its skin in a worker thread; its problems."""
        self._identity_pending.add(vm)
        try:
            async with self._identity_lock:
                job = self._identity_job(vm)
                result = await self.worker.run("reconcile", job)
                self._apply_identity(vm, result)
                return list(result.problems)
        finally:
            self._identity_pending.discard(vm)

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

    # -- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            self.prepare()
            self.install_rules()
            # Everything allocated so far lives for the daemon's lifetime: move it out of the
            # collector's sight so full collections stay short on the hot path.
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 50, 100)
            set_data_path_nice(self.config.data_path_nice)
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                self._nursery = nursery
                await nursery.start(self.shell.run)
                await nursery.start(control.serve, Path(self.config.control_socket), self.handle)
                nursery.start_soon(self._signals)
                nursery.start_soon(self._watch_library)
                nursery.start_soon(self._watch_dns_servers)
                nursery.start_soon(self._watchdog)
                nursery.start_soon(self._measure_conditions)
                nursery.start_soon(self._watch_interfaces)
                if self.config.libvirt is not None:
                    await self._start_libvirt(nursery)
                sdnotify.notify("READY=1", f"STATUS=enforcing skins on {len(self.shell.paths)} VM(s), "
                                           f"fail_mode={self.config.fail_mode}")
                log.info("netskin-interceptor ready: %d VM(s), fail_mode=%s", len(self.shell.paths),
                         self.config.fail_mode)
        finally:
            self.shutdown(clean=self._stop_requested)

    def shutdown(self, clean: bool = True) -> None:
        """Stop: NAT and address claims released, held packets verdicted; on a clean stop
        (SIGINT/SIGTERM) the steering is taken out too.

        Firewall chains stay in the kernel, so a profile holds while the daemon is stopped or
        restarting (``--cleanup`` removes them). After a failed start or a crash (an exception)
        the steering stays as it is, so ``fail_mode`` keeps its meaning ("closed": blocked).
        """
        sdnotify.notify("STOPPING=1")
        try:
            if clean:
                rules.remove_steering(timeout_s=RULES_TIMEOUT_S)
            self._release_identity()
        except Exception:  # noqa: BLE001 - the held packets below must be verdicted regardless
            log.exception("cleaning up after the data path failed")
        finally:
            released = self.shell.release_all()
            self.shell.close()
            self.worker.close()
            log.info("netskin-interceptor stopped (%s): %d held packet(s) released", "steering removed" if clean
                     else "steering left in place, fail_mode applies", released)

    def _release_identity(self) -> None:
        """Remove the NAT rules and the address claims the daemon owns."""
        for vm, address in self._claims.items():
            try:
                identity.release_address(address, self.vms[vm], vm_name=vm)
            except identity.IdentityError as exc:
                log.error("vm %s: could not release %s: %s", vm, address, exc)
        self._claims.clear()
        nat.remove_nat()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: rescanning the skin library")
                    await self.rescan()
                else:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    self._stop_requested = True
                    self._cancel.cancel()
                    return

    async def _watchdog(self) -> None:
        """WATCHDOG=1 from the trio loop, with the data path's lock taken: if either wedges,
        systemd restarts the daemon (a data path that ends raises out of the nursery instead)."""
        interval = sdnotify.watchdog_interval_s()
        if not interval:
            return
        while True:
            with self.shell.lock:
                sdnotify.notify("WATCHDOG=1")
            await trio.sleep(interval / 2)

    async def _watch_interfaces(self) -> None:
        """Keep the shell's device index → VM map right: a VM's tap recreated (the VM restarted)
        comes back with a new index. Read every second, and soon after a packet of a device no VM
        has (the shell asks for it)."""
        while True:
            with trio.move_on_after(INDEXES_INTERVAL_S):
                await self.shell.indexes_wanted.wait()
            self.shell.indexes_wanted = trio.Event()
            before = self.shell.classifier.indexes
            if self.shell.set_indexes(await trio.to_thread.run_sync(_interface_indexes)):
                after = self.shell.classifier.indexes
                log.info("VM interface indexes changed: %s", {
                    name: (before.get(name), after.get(name)) for name in before.keys() | after.keys()
                    if before.get(name) != after.get(name)})
            await trio.sleep(INDEXES_MIN_INTERVAL_S)

    async def _measure_conditions(self) -> None:
        """Once a second: hand each pipe's counters and hold-time samples to its window. A new
        generation starts a new window, so figures never mix two skins."""
        while True:
            await trio.sleep(1.0)
            await self.shell.refresh()
            now = time.monotonic_ns()
            for done, (vm, path) in enumerate(list(self.shell.paths.items())):  # VMs come and go
                if vm not in self.shell.paths:
                    continue
                for direction, pipe in (("uplink", path.uplink), ("downlink", path.downlink)):
                    generation, window = self.conditions.get((vm, direction), (None, None))
                    if generation != path.generation:
                        window = ConditionWindow()
                        self.conditions[(vm, direction)] = (path.generation, window)
                    # An idle VM costs a tuple compare: no lock, no counters copied. The mark is
                    # read before the counters, so a packet in between shows in the next second.
                    mark = pipe.activity()
                    if window.idle(now, mark):
                        continue
                    with self.shell.lock:  # the data path appends samples and counts
                        hold, late = pipe.take_samples()
                        counters = pipe.snapshot()
                    window.tick(now, counters, hold, late, mark)
                if done % CONDITIONS_BATCH == CONDITIONS_BATCH - 1:
                    await trio.lowlevel.checkpoint()  # the control socket is served in between

    def _conditions(self, vm: str) -> tuple[dict, list[str]]:
        """Per direction {"asked", "measured"}, and the lines where measured leaves tolerance."""
        skin = self.shell.paths[vm].skin
        out, flags = {}, []
        for direction, asked_skin in (("uplink", skin.uplink), ("downlink", skin.downlink)):
            asked = Asked.of(asked_skin)
            _, window = self.conditions.get((vm, direction), (None, None))
            measured, found = window.summary(asked) if window else ({"window_s": 0, "packets": 0}, [])
            out[direction] = {"asked": asked.to_json(), "measured": measured}
            flags += [f"{direction}: {line}" for line in found]
        return out, flags

    # -- VMs from libvirt ---------------------------------------------------------------------

    async def _start_libvirt(self, nursery: trio.Nursery) -> None:
        """Follow the libvirt connection: the first listing's VMs are steered before this returns."""
        self.libvirt_source = LibvirtSource(self.config.libvirt.uri)
        send, receive = trio.open_memory_channel(math.inf)
        listed = send.clone()
        nursery.start_soon(self._follow_libvirt, receive)
        await nursery.start(self.libvirt_source.run, send)
        # The first listing's events are queued: steer those VMs before saying "ready".
        done = trio.Event()
        await listed.send(done)
        await listed.aclose()
        await done.wait()

    async def _follow_libvirt(self, receive: trio.MemoryReceiveChannel) -> None:
        """One libvirt event at a time, in order (a VM's Gone is done before its next Appeared)."""
        async for event in receive:
            if isinstance(event, trio.Event):  # _start_libvirt's marker: the listing is done
                event.set()
                continue
            for action in vmset.actions(event, self.config.vms, self.libvirt_vms):
                try:
                    await self._libvirt_action(action)
                except Exception:  # noqa: BLE001 - one VM's failure must not stop the others' skins
                    log.exception("libvirt %s: %s failed", self.config.libvirt.uri, action)

    async def _libvirt_action(self, action: vmset.Action) -> None:
        if isinstance(action, vmset.Refuse):
            log.error("%s", action.reason)
        elif isinstance(action, vmset.AddVm):
            await self._add_libvirt_vm(action.vm)
        elif isinstance(action, vmset.RemoveVm):
            await self._remove_libvirt_vm(action.name)
        elif isinstance(action, vmset.Rewire):
            await self._remove_libvirt_vm(action.vm.name)
            await self._add_libvirt_vm(action.vm, keep_assignment=True)
        elif isinstance(action, vmset.UpdateEntry):
            self.libvirt_vms[action.vm.name] = action.vm
            async with self._locks[action.vm.name]:
                assignment = self.assignments[action.vm.name]
                assignment.original = libvirt_original(action.vm, identity.Original.from_json(assignment.original)
                                                       if assignment.original else None)
                await trio.to_thread.run_sync(self.store.save, assignment)
        elif isinstance(action, vmset.MetadataSkin):
            await self._metadata_skin(action.name, action.skin)

    async def _add_libvirt_vm(self, vm: LibvirtVm, *, keep_assignment: bool = False) -> None:
        """Steer a libvirt VM with its skin in force before its guest sends: engine path and skin
        first, then the interface indexes, then the rules (so its first queued packet is known)."""
        name, started = vm.name, time.monotonic()
        config = libvirt_vm_config(vm)
        owner = next((other for other, interface in self.shell.interfaces.items() if interface == vm.tap), None)
        if owner is not None:
            log.error("libvirt VM %s (domain %s) not steered: its tap %s is VM %s's interface", name, vm.domain,
                      vm.tap, owner)
            return
        stored = self.assignments.get(name) if keep_assignment else None
        if stored is None:
            stored = await trio.to_thread.run_sync(self.store.load, name)
        assignment = stored or Assignment(vm=name)
        what, skin = vmset.skin_on_appear(stored is not None, assignment.metadata_skin, vm.skin)
        if keep_assignment:
            what = "keep"
        if what == "apply":
            try:
                copy = await trio.to_thread.run_sync(self._copy, skin)
            except UserError as exc:
                log.error("vm %s: skin %r from domain %s's metadata not applied: %s", name, skin, vm.domain,
                          "; ".join(exc.lines))
            else:
                assignment = replace(assignment, active=copy, shadow=assignment.active,
                                     generation=assignment.generation + 1, reload_error=None, timeline=None)
        elif what == "revert":
            assignment = replace(assignment, active=None, shadow=assignment.active or assignment.shadow,
                                 generation=assignment.generation + 1, reload_error=None, timeline=None)
        if not keep_assignment:
            assignment.metadata_skin = vm.skin
        try:
            compiled = await trio.to_thread.run_sync(self._compile, assignment.active)
        except UserError as exc:
            log.error("vm %s: skin %r cannot be compiled (%s); running it without a skin", name,
                      assignment.active.name if assignment.active else None, "; ".join(exc.lines))
            compiled = NO_SKIN
        self._stamp_timeline(assignment, compiled)
        clock = await trio.to_thread.run_sync(self._timeline_clock, assignment, compiled)
        self.vms[name] = config
        self.libvirt_vms[name] = vm
        self.assignments[name] = assignment
        self._locks.setdefault(name, trio.Lock())
        worker = self.shell.place(name)
        self.shell.add_vm(name, config.interface, *self._queues_for(compiled, worker),
                          addresses=_addresses(config), worker=worker)
        self.shell.set_skin(name, compiled, assignment.generation, clock)
        self._pick_dns_targets(name)
        self.shell.set_indexes(await trio.to_thread.run_sync(_interface_indexes))
        try:
            await self._install_rules()
        except rules.RulesError as exc:
            log.error("vm %s: rules not installed, its traffic is not steered: %s", name, exc)
        enforced_ms = (time.monotonic() - started) * 1000
        read = await trio.to_thread.run_sync(self._read_original, name, config)
        assignment.original = libvirt_original(vm, read)
        await trio.to_thread.run_sync(self.store.save, assignment)
        log.info("vm %s: from libvirt domain %s, tap %s, skin %r generation %d, steered in %.0f ms", name,
                 vm.domain, vm.tap, compiled.name, assignment.generation, enforced_ms)
        await self._sync_identity(name)

    @staticmethod
    def _read_original(name: str, config: VmConfig) -> identity.Original | None:
        try:
            return identity.capture(name, config)
        except identity.IdentityError as exc:
            log.error("vm %s: host side of %s not read: %s", name, config.interface, exc)
            return None

    async def _remove_libvirt_vm(self, name: str) -> None:
        """Its domain stopped: its steering goes; its assignment, shadow and original stay on disk."""
        async with self._locks[name]:
            entry = self.libvirt_vms.pop(name)
            self.shell.remove_vm(name)
            config = self.vms.pop(name)
            self.assignments.pop(name, None)
            self.previous.pop(name, None)
            for table in (self.identity_state, self.identity_problems, self.dns_targets, self._dns_alive):
                table.pop(name, None)
            for direction in ("uplink", "downlink"):
                self.conditions.pop((name, direction), None)
            claimed = self._claims.pop(name, None)
            if claimed is not None:
                try:
                    await trio.to_thread.run_sync(lambda: identity.release_address(claimed, config, vm_name=name))
                except identity.IdentityError as exc:
                    log.error("vm %s: could not release %s: %s", name, claimed, exc)
            try:
                await self._install_rules()
            except rules.RulesError as exc:
                log.error("vm %s: rules not updated after its domain stopped: %s", name, exc)
            log.info("vm %s: libvirt domain %s stopped (tap %s): steering removed, assignment kept",
                     name, entry.domain, entry.tap)

    async def _install_rules(self) -> None:
        """Every VM's rules in one transaction (the VM set is read here, on the trio thread)."""
        async with self._rules_lock:
            known = [self._vm_rules_known(vm) for vm in self.shell.paths]
            await trio.to_thread.run_sync(self._install, known)

    async def _metadata_skin(self, name: str, skin: str | None) -> None:
        """The domain's metadata names a new skin: apply it (removed: revert to no skin)."""
        try:
            if skin is None:
                await self.revert(name)
            else:
                copy = await trio.to_thread.run_sync(self._copy, skin)
                await self.apply(name, copy)
        except (UserError, control.ControlError) as exc:
            log.error("vm %s: metadata skin %r not applied: %s", name, skin, exc)
        finally:
            if name in self.assignments:
                self.assignments[name].metadata_skin = skin
                await trio.to_thread.run_sync(self.store.save, self.assignments[name])
        log.info("vm %s: domain metadata names skin %r", name, skin)

    # -- changing a VM's skin -----------------------------------------------------------------

    def _vm(self, vm: str | None) -> str:
        if vm in self.shell.paths:
            return vm
        known = ", ".join(self.shell.paths) or "none"
        if self.config.libvirt is not None:
            raise control.ControlError(
                f"unknown VM '{vm}' (VMs now: {known}); start its libvirt domain, or add it under "
                f"[vms.{vm}] in the host config")
        raise control.ControlError(
            f"unknown VM '{vm}' (configured VMs: {known}); add it under [vms.{vm}] in the host config")

    def _queues_for(self, compiled: CompiledSkin, worker: int) -> tuple[int, int]:
        """The (uplink, downlink) queues of ``worker`` a VM wearing ``compiled`` is steered to: per
        direction, the GSO pair if nothing in the skin decides per packet, else the per-segment pair."""
        segments = self.config.queue_numbers(worker)
        if not self.config.gso:
            return segments
        up_ok, down_ok = compiled.takes_super_packets()
        # A shared uplink queues every VM's uplink packets too: a super-packet must fit there.
        host_kbps = self.config.host_uplink_kbps
        if host_kbps and SUPER_PACKET_BYTES * SUPER_PACKETS_QUEUED * 8e6 / host_kbps > self.shell.uplink_queue_limit_ns:
            up_ok = False
        gso = self.config.queue_numbers(worker, gso=True)
        return (gso.uplink if up_ok else segments.uplink, gso.downlink if down_ok else segments.downlink)

    async def _steer(self, vm: str, queues: tuple[int, int]) -> None:
        """Move ``vm``'s packets to ``queues`` (one rules transaction). Both pairs are served by
        this engine, so packets already queued on the old ones are still handled: no gap.

        The transaction rewrites every VM's steering (its cost grows with the VM count), so
        moves asked together (a fleet applying to many VMs at once) share one: a move waits for
        the transaction in progress and returns at once if the next one took it along."""
        before = self.shell.queues[vm]
        self.shell.set_queues(vm, *queues)
        self._steering_asked += 1
        asked = self._steering_asked
        async with self._steering_lock:
            if self._steering_done >= asked:
                return
            covered = self._steering_asked  # every move so far is in the queues read below
            try:
                await self._install_rules()
            except rules.RulesError as exc:
                self.shell.set_queues(vm, *before)
                log.error("vm %s: not moved to queues %d/%d (%s); it stays on %d/%d", vm, *queues, exc, *before)
                return
            self._steering_done = covered

    async def _enforce(self, vm: str, assignment: Assignment, compiled: CompiledSkin) -> None:
        """Persist, then swap: a crash in between re-applies the persisted state on restart.

        A direction that stops taking super-packets is moved to the per-segment queue before the
        swap (the old skin judges segments as well as super-packets); one that starts taking them
        moves after it, so the new skin never meets a super-packet it must judge per segment."""
        await trio.to_thread.run_sync(self.store.save, assignment)
        path = self.shell.paths[vm]
        worker = self.shell.worker_of[vm]
        wanted = self._queues_for(compiled, worker)
        segments = self.config.queue_numbers(worker)
        first = tuple(new if new in segments else old for old, new in zip(self.shell.queues[vm], wanted))
        if first != self.shell.queues[vm]:
            await self._steer(vm, first)
        if compiled.firewall != path.skin.firewall:
            async with self._rules_lock:
                await trio.to_thread.run_sync(lambda: rules.set_profile(
                    self._vm_rules(vm, compiled.firewall, keep_profile=False), timeout_s=RULES_TIMEOUT_S))
            self._firewall_counters_at = 0.0
        self.assignments[vm] = assignment
        clock = await trio.to_thread.run_sync(self._timeline_clock, assignment, compiled)
        self.shell.set_skin(vm, compiled, assignment.generation, clock)
        await self.shell.settle(vm)  # in force in its worker before it takes super-packets
        if wanted != self.shell.queues[vm]:
            await self._steer(vm, wanted)
        self._pick_dns_targets(vm)
        log.info("vm %s: skin %r generation %d (shadow %r)", vm, compiled.name, assignment.generation,
                 assignment.shadow.name if assignment.shadow else None)

    async def _change(self, vm: str, make, *, undo_on_failure: bool) -> Assignment:
        """Swap ``vm`` to ``make(current assignment)`` and bring its identity in line.

        ``undo_on_failure`` (apply): refuse at once what the host knows it cannot set, and if
        identity fails later, put back the previous assignment exactly (active and shadow).
        """
        async with self._locks[vm]:
            old = self.assignments[vm]
            new = make(old)
            try:
                compiled = await trio.to_thread.run_sync(self._compile, new.active)
            except UserError as exc:
                raise control.ControlError("; ".join(exc.lines)) from None
            if undo_on_failure:
                entry = self.libvirt_vms.get(vm)
                reasons = (reconcile.cannot_enforce(self.vms[vm], compiled, domain=entry.domain if entry else None)
                           + _address_needed(vm, self.vms[vm], compiled))
                interface = self.vms[vm].interface
                if compiled is not NO_SKIN and not await trio.to_thread.run_sync(identity.has_interface, interface):
                    reasons.append(f"interface {interface} does not exist on this host, so no rule can see "
                                   f"{vm}'s traffic; start the VM or fix vms.{vm}.interface in the host config")
                if reasons:
                    raise self._refusal(vm, f"{compiled.name} cannot be applied to {vm}, nothing changed: "
                                            + "; ".join(reasons))
            self._stamp_timeline(new, compiled)
            await self._enforce(vm, new, compiled)
            problems = await self._sync_identity(vm)
            if problems and undo_on_failure:
                back = replace(new, active=old.active, shadow=old.shadow, generation=new.generation + 1,
                               reload_error=old.reload_error, timeline=old.timeline)
                await self._enforce(vm, back, await trio.to_thread.run_sync(self._compile, back.active))
                await self._sync_identity(vm)
                self.previous[vm] = old
                raise self._refusal(vm, f"{compiled.name} not enforced on {vm} ({'; '.join(problems)}); "
                                        f"put back {repr(old.active.name) if old.active else 'no skin'}")
            self.previous[vm] = old
            return new

    def _refusal(self, vm: str, message: str) -> control.ControlError:
        error = control.ControlError(message, 3)
        error.vms = self.status(vm)
        return error

    async def apply(self, vm: str, copy: SkinCopy) -> Assignment:
        def make(old: Assignment) -> Assignment:
            return Assignment(vm=vm, active=copy, shadow=old.active, generation=old.generation + 1,
                              original=old.original, identity=old.identity, metadata_skin=old.metadata_skin)

        return await self._change(vm, make, undo_on_failure=True)

    async def rollback(self, vm: str) -> Assignment:
        if self.assignments[vm].shadow is None:
            raise control.ControlError(f"VM '{vm}' has no shadow skin to roll back to; apply a skin first")

        def make(old: Assignment) -> Assignment:
            return Assignment(vm=vm, active=old.shadow, shadow=old.active, generation=old.generation + 1,
                              original=old.original, identity=old.identity, metadata_skin=old.metadata_skin)

        return await self._change(vm, make, undo_on_failure=False)

    async def revert(self, vm: str) -> Assignment:
        def make(old: Assignment) -> Assignment:
            return Assignment(vm=vm, active=None, shadow=old.active or old.shadow,
                              generation=old.generation + 1, original=old.original,
                              metadata_skin=old.metadata_skin)

        return await self._change(vm, make, undo_on_failure=False)

    async def restore(self, vm: str, generation: int) -> Assignment:
        """Put back what was in force before ``generation`` (the manager could not verify it)."""
        current = self.assignments[vm]
        before = self.previous.get(vm)
        if current.generation != generation or before is None:
            raise control.ControlError(
                f"VM '{vm}' is at generation {current.generation}, not {generation}: nothing restored")

        def make(old: Assignment) -> Assignment:
            return replace(old, active=before.active, shadow=before.shadow, generation=old.generation + 1,
                           reload_error=before.reload_error, timeline=before.timeline)

        return await self._change(vm, make, undo_on_failure=False)

    async def rescan(self) -> None:
        """Re-apply active skins whose drop-in file changed; keep the last good one on error."""
        entries: dict[str, Entry] = {
            entry.name: entry for entry in await self.worker.run(
                "scan_library", str(self.library.skins_dir), str(self.library.presets))}
        for vm, assignment in list(self.assignments.items()):
            if vm not in self.shell.paths:
                continue  # a libvirt VM gone meanwhile
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
                copy = SkinCopy(entry.name, entry.document, str(entry.path))

                def make(old: Assignment, copy: SkinCopy = copy) -> Assignment:
                    return Assignment(vm=old.vm, active=copy, shadow=old.active, generation=old.generation + 1,
                                      original=old.original, identity=old.identity,
                                      metadata_skin=old.metadata_skin)

                try:
                    await self._change(vm, make, undo_on_failure=False)
                except control.ControlError as exc:  # e.g. its security profile does not exist
                    self.assignments[vm].reload_error = str(exc)
                    log.error("vm %s: skin %r not reloaded: %s", vm, active.name, exc)
                    continue
                log.info("vm %s: skin %r reloaded from %s", vm, entry.name, entry.path)
            elif assignment.reload_error:
                assignment.reload_error = None

    async def _watch_library(self) -> None:
        # Polling the directory's stamp twice a second needs no inotify binding and also catches
        # edits made through bind mounts or network filesystems. The scan runs in a thread.
        while True:
            await trio.sleep(RESCAN_INTERVAL_S)
            stamp = await trio.to_thread.run_sync(self.library.stamp)
            if stamp != self._library_stamp:
                self._library_stamp = stamp
                await self.rescan()

    # -- control requests ---------------------------------------------------------------------

    async def handle(self, request: dict) -> dict:
        cmd = request["cmd"]
        vm = request.get("vm")
        if cmd == "status":
            if vm is not None:
                self._vm(vm)
            await self._refresh_firewall_counters(max_age_s=0.0)  # a status request reads them fresh
            await self.shell.refresh()  # and every worker's counters
            return {"vms": self.status(vm), "host": self.host_status()}
        if cmd == "reload":
            await self.rescan()
            return {"vms": self.status(vm)}
        vm = self._vm(vm)
        if cmd == "apply":
            try:
                copy = await trio.to_thread.run_sync(self._copy, request["skin"])
            except UserError as exc:
                raise control.ControlError("; ".join(exc.lines)) from None
            await self.apply(vm, copy)
        elif cmd == "rollback":
            await self.rollback(vm)
        elif cmd == "revert":
            await self.revert(vm)
        elif cmd == "restore":
            await self.restore(vm, int(request["generation"]))
        elif cmd == "fault" and self.shell.fault_injection:
            self.shell.inject_faults(vm, int(request.get("count", 1)))
        else:
            raise control.ControlError(f"unknown command '{cmd}'")
        await self._refresh_firewall_counters()
        await self.shell.refresh()
        return {"vms": self.status(vm)}

    async def _refresh_firewall_counters(self, max_age_s: float = FIREWALL_COUNTERS_MAX_AGE_S) -> None:
        if time.monotonic() - self._firewall_counters_at < max_age_s:
            return
        if not any(path.skin.firewall for path in self.shell.paths.values()):
            self._firewall_counters = {}
            return
        try:
            self._firewall_counters = await trio.to_thread.run_sync(
                lambda: rules.firewall_counters(timeout_s=RULES_TIMEOUT_S))
        except rules.RulesError as exc:
            log.error("firewall counters not read: %s", exc)
        self._firewall_counters_at = time.monotonic()

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
                if vm not in self.shell.paths:
                    continue  # a libvirt VM gone meanwhile
                if alive != self._dns_alive.get(vm):
                    self._dns_alive[vm] = alive
                    before = dict(self.dns_targets.get(vm, {}))
                    self._pick_dns_targets(vm)
                    if self.dns_targets[vm] != before:
                        log.warning("vm %s: DNS servers answering: %s; redirecting to %s", vm, alive,
                                    self.dns_targets[vm])
                        await self._sync_identity(vm)
            await trio.sleep(DNS_PROBE_INTERVAL_S)

    def host_status(self) -> dict:
        link = self.shell.link
        with self.shell.lock:  # the data path adds the link's flows
            shared = {str(k): v for k, v in link.snapshot().items()} if link else None
        return {
            "host_uplink_kbps": self.config.host_uplink_kbps,
            "shared_uplink": shared,
            "held_packets": self.shell.held_packets,
            "unclassified_packets": self.shell.unclassified,
            "errors": sum(self.shell.errors.values()),
            "workers": self.shell.workers_status(),
        }

    def _firewall_status(self, vm: str) -> dict:
        profile = self.shell.paths[vm].skin.firewall
        if profile is None:
            return {"profile": None, "rules": [], "default_hits": {}}
        counters = self._firewall_counters.get(vm) or {}
        hits = {entry["rule"]: entry["hits"] for entry in counters.get("rules", [])}
        return {
            "profile": profile.name,
            "default_in": profile.default_in,
            "default_out": profile.default_out,
            "rules": [{"rule": rule.description, "hits": hits.get(rule.description, 0)} for rule in profile.rules],
            "default_hits": dict(counters.get("default_hits", {"in": 0, "out": 0})),
            "enforced_by": "kernel",
        }

    def status(self, vm: str | None = None) -> dict:
        names = [self._vm(vm)] if vm else list(self.shell.paths)
        out = {}
        for name in names:
            path = self.shell.paths[name]
            worker = self.shell.worker_of[name]
            gso_queues = self.config.queue_numbers(worker, gso=True) if self.config.gso else ()
            a = self.assignments[name]
            up, down = self.shell.queues[name]
            conditions, out_of_tolerance = self._conditions(name)
            entry = self.libvirt_vms.get(name)
            out[name] = {
                "domain": entry.domain if entry else None,  # None: a [vms] VM
                "interface": self.shell.interfaces[name],
                "active": a.active.name if a.active else None,
                "shadow": a.shadow.name if a.shadow else None,
                "generation": a.generation,
                "enforced_generation": path.generation,
                "original": a.original,
                "reload_error": a.reload_error,
                "verify_problems": self._verify_problems(name),
                "identity": self.identity_state.get(name),
                "firewall": self._firewall_status(name),
                "dns": dict(path.dns_answers),
                "icmp_errors_sent": path.icmp_sent,
                "errors": self.shell.errors.get(name, 0),
                "worker": worker,
                "queues": {"uplink": up, "downlink": down},
                # Whether the direction takes GSO super-packets whole (its packet counts then
                # count super-packets; its bytes are the real ones).
                "super_packets": {"uplink": up in gso_queues, "downlink": down in gso_queues},
                "uplink": path.uplink.snapshot(),
                "downlink": path.downlink.snapshot(),
                "timeline": self._timeline_status(name),
                "conditions": conditions,
                "out_of_tolerance": out_of_tolerance,
            }
        return out


    def _timeline_status(self, vm: str) -> dict | None:
        """The timeline's step, cycle and time to the next step (None: the skin has none)."""
        path = self.shell.paths[vm]
        if path.timeline is None:
            return None
        now = time.monotonic_ns()
        with self.shell.lock:
            path.advance_timeline(now)  # what the next packet would do anyway
        position = path.timeline.position(now)
        started = self.assignments[vm].timeline or {}
        position["start_unix_ns"] = started.get("start_unix_ns")
        return position


def _with_bridge(vm: rules.VmRules) -> rules.VmRules:
    """``vm`` with its bridge looked up if not known yet (blocking netlink)."""
    return vm if vm.bridge else replace(vm, bridge=identity.bridge_of(vm.interface))


def _addresses(config: VmConfig) -> tuple[str | None, str | None]:
    """A VM's IPv4 and IPv6 address as text (None: not known, as for most libvirt VMs)."""
    return (str(config.address) if config.address else None, str(config.address6) if config.address6 else None)


def _address_needed(vm: str, config: VmConfig, skin: CompiledSkin) -> list[str]:
    """Why ``skin`` cannot be enforced on a VM whose address is unknown (a libvirt VM whose
    address libvirt does not know: only a libvirt network's DHCP leases tell it)."""
    if config.address is not None:
        return []
    needs = [what for what, asked in (("ip_address", skin.ip_address), ("dns_servers", skin.dns_servers)) if asked]
    if not needs:
        return []
    return [f"{' and '.join(needs)} need {vm}'s address, which libvirt does not know (it knows it only for "
            f"an interface on a libvirt network that hands out DHCP leases)"]


def libvirt_vm_config(vm: LibvirtVm) -> VmConfig:
    """A libvirt VM as the rest of the daemon sees a VM: its tap, its address if libvirt knows it,
    no netns (a guest). Built without validation: the address may be unknown (None)."""
    return VmConfig.model_construct(
        interface=vm.tap, address=ipaddress.IPv4Address(vm.address) if vm.address else None,
        address6=ipaddress.IPv6Address(vm.address6) if vm.address6 else None, netns=None, skin=None)


def libvirt_original(vm: LibvirtVm, read: identity.Original | None) -> dict:
    """A libvirt VM's original configuration: MAC, MTU and addresses from its domain XML (never
    from a neighbour table); the host side's MTU and IPv6 setup as ``read`` from its tap."""
    original = read or identity.Original(address=None)
    return replace(original, address=vm.address, address6=vm.address6, mac=vm.mac, mtu=vm.mtu,
                   readable=tuple(name for name in original.readable if name not in ("mac", "address"))).to_json()


def _interface_indexes() -> dict[str, int]:
    """The kernel's interface name → index map (of the network namespace the daemon runs in)."""
    return {name: index for index, name in socket.if_nameindex()}


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


def cleanup(config: HostConfig) -> list[str]:
    """Remove everything netskin owns on this host: steering, firewall chains, NAT chains, and
    the address claims (proxy ARP entries, /32 routes) of every VM's assigned skins."""
    done = []
    if rules.remove(timeout_s=RULES_TIMEOUT_S):
        done.append("netfilter rules and firewall chains")
    if nat.remove_nat():
        done.append("NAT chains")
    store = AssignmentStore(Path(config.state_dir))
    for name, vm in config.vms.items():
        assignment = store.load(name)
        if assignment is None:
            continue
        for copy in (assignment.active, assignment.shadow):
            address = copy.document.get("ip_address") if copy else None
            if not address:
                continue
            try:
                if identity.release_address(str(address), vm, vm_name=name):
                    done.append(f"address claim {address} of {name}")
            except (identity.IdentityError, ValueError) as exc:
                log.error("vm %s: could not release %s: %s", name, address, exc)
    return done


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
    parser.add_argument("--cleanup", action="store_true",
                        help="remove everything netskin owns (rules, firewall chains, NAT, address claims) and exit")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_host_config(args.config)
        if config.host_netns:
            _enter_netns(config.host_netns)
        if args.cleanup:
            done = cleanup(config)
            print("removed: " + ", ".join(done) if done else "nothing of netskin's was installed")
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
