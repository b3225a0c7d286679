"""Netfilter rules netskin owns: steering into NFQUEUE (mangle) and the VMs' firewalls (filter).

Steering, in the mangle table: chain ``NETSKIN-UP``, appended to PREROUTING, sends what enters
from a VM (its interface, or its bridge port: physdev) to the VM's uplink queue; chain
``NETSKIN-DOWN``, appended to POSTROUTING, sends what leaves towards a VM to its downlink queue:
out of its interface, bridged out of its port (physdev), or routed by the host onto the VM's
bridge for the VM's address (a routed packet's bridge port is not known yet in POSTROUTING).
So every layout is seen, in both directions, and a packet between two VMs meets the sender's
uplink and then the receiver's downlink. Uplink steering runs before the filter table and
downlink steering after it; either way a packet the daemon accepts goes on through the rest of
the host's rules (libvirt's, Docker's, the admin's) as if netskin were not there.

One packet-mark bit (the host config's ``steering_mark``) lives only between mangle PREROUTING
and the routing decision, and only on packets from a VM's bridge port: the kernel runs IPv4/IPv6
PREROUTING once at the bridge (where netskin queues) and, for the segments the queue cut out of
a GSO packet bound for the host or routed by it, once more on the way up the IP stack. The bit,
set as the packet is queued, makes ``NETSKIN-UP`` let that second pass by (queued twice, a
segment took the rate twice and arrived after its successors: TCP from a guest through a
bridge the host routes got a third less than asked). Chain ``NETSKIN-SEEN``, first in mangle
FORWARD and INPUT, clears it again.

Firewall: chain ``NETSKIN`` in the filter table, inserted at position 1 of FORWARD, INPUT and
OUTPUT, holds only jumps to the per-VM chains of VMs that wear a profile (``interceptor.firewall``
renders them). They RETURN what the profile allows, so the host's rules still apply after them.

Every change is one ``iptables-restore --noflush`` transaction per address family, computed from
the current ``iptables-save`` output: it removes whatever netskin had there (a killed run's
leftovers, the old single-chain layout) and writes the new state, so there is never a moment
with two copies or with none. Every call is bounded by a timeout. Rules go through the iptables
CLI because this kernel's nftables has no native ``queue`` statement (iptables-nft reaches
NFQUEUE through nft_compat).
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field

from interceptor import firewall
from interceptor.profiles import CompiledProfile

CHAIN = "NETSKIN"  # filter: the jumps to the VMs' firewalls (and, in mangle, an earlier layout)
UP_CHAIN = "NETSKIN-UP"  # mangle PREROUTING: what enters from a VM → its uplink queue
DOWN_CHAIN = "NETSKIN-DOWN"  # mangle POSTROUTING: what leaves towards a VM → its downlink queue
SEEN_CHAIN = "NETSKIN-SEEN"  # mangle FORWARD and INPUT: clear the steering mark bit
SEEN_HOOKS = ("FORWARD", "INPUT")
DEFAULT_MARK = 0x0010_0000
TAG = "netskin"
HOOKS = ("FORWARD", "INPUT", "OUTPUT")  # filter hooks jumping to CHAIN
DEFAULT_TIMEOUT_S = 10.0

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_INTERFACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,14}")


class RulesError(RuntimeError):
    pass


@dataclass(frozen=True)
class VmRules:
    """One VM as the rules see it: its name, host-side device, queues and firewall profile."""

    name: str
    interface: str
    uplink_queue: int
    downlink_queue: int
    profile: CompiledProfile | None = None
    # When the interface is a port of a Linux bridge: the bridge, and the VM's addresses, so that
    # traffic the host routes onto the bridge for the VM is seen too.
    bridge: str | None = None
    address: str | None = None
    address6: str | None = None

    def address_for(self, version: int) -> str | None:
        return self.address if version == 4 else self.address6


# --- the module API ---------------------------------------------------------------------------


def install(vms: list[VmRules], fail_open: bool, mark: int = DEFAULT_MARK, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Steering and every VM's firewall chains, replacing whatever netskin had installed."""
    _check(vms)
    deadline = _Deadline(timeout_s)
    for save, restore, version in _family_tools():
        saved = _run([save], timeout_s=deadline.left())
        _restore(restore, render_install(saved, vms, fail_open, version, mark), deadline)


def set_profile(vm: VmRules, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Give one VM this firewall (``vm.profile``; None removes it); other VMs are untouched."""
    _check([vm])
    deadline = _Deadline(timeout_s)
    for save, restore, version in _family_tools():
        saved = _run([save], timeout_s=deadline.left())
        _restore(restore, render_set_profile(saved, vm, version), deadline)


def remove_steering(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Remove the mangle steering only; the firewalls stay. Whether there was any."""
    deadline = _Deadline(timeout_s)
    found = False
    for save, restore, _ in _family_tools():
        text = render_remove_steering(_run([save], timeout_s=deadline.left()))
        found |= bool(text)
        _restore(restore, text, deadline)
    return found


def remove(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Remove everything netskin owns in mangle and filter. Whether there was anything."""
    deadline = _Deadline(timeout_s)
    found = False
    for save, restore, _ in _family_tools():
        text = render_remove(_run([save], timeout_s=deadline.left()))
        found |= bool(text)
        _restore(restore, text, deadline)
    return found


def firewall_counters(timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, dict]:
    """Per VM with a profile in force: {"profile", "rules": [{"rule", "hits"}], "default_hits"}."""
    deadline = _Deadline(timeout_s)
    saves = [_run([save, "-c"], timeout_s=deadline.left()) for save, _, _ in _family_tools()]
    return firewall.parse_counters(saves)


# --- rendering: iptables-save text in, iptables-restore text out --------------------------------


@dataclass
class SavedTable:
    """One table of an ``iptables-save`` output: its chains and rules (without counters)."""

    chains: list[str] = field(default_factory=list)
    rules: list[tuple[str, str]] = field(default_factory=list)  # (chain, spec after "-A CHAIN ")


def parse_save(saved: str) -> dict[str, SavedTable]:
    tables: dict[str, SavedTable] = {}
    table: SavedTable | None = None
    for raw in saved.splitlines():
        line = raw.strip()
        if line.startswith("["):  # -c counters
            line = line[line.find("]") + 1 :].strip()
        if line.startswith("*"):
            table = tables.setdefault(line[1:], SavedTable())
        elif table is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            table.chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            parts = line.split(None, 2)
            table.rules.append((parts[1], parts[2] if len(parts) > 2 else ""))
    return tables


def render_install(saved: str, vms: list[VmRules], fail_open: bool, version: int, mark: int = DEFAULT_MARK) -> str:
    """Restore input that replaces netskin's rules with steering and firewalls for ``vms``."""
    tables = parse_save(saved)
    return _transaction(
        _mangle_lines(tables.get("mangle"), vms, fail_open, version, mark),
        _filter_lines(tables.get("filter"), {vm.name: vm for vm in vms}, False, version),
    )


def render_set_profile(saved: str, vm: VmRules, version: int) -> str:
    """Restore input that swaps one VM's firewall chains and keeps everything else."""
    tables = parse_save(saved)
    return _transaction([], _filter_lines(tables.get("filter"), {vm.name: vm}, True, version))


def render_remove_steering(saved: str) -> str:
    """Restore input that removes the mangle steering; "" if there is none."""
    return _transaction(_mangle_lines(parse_save(saved).get("mangle"), None, False, 4), [])


def render_remove(saved: str) -> str:
    """Restore input that removes everything netskin owns; "" if there is nothing."""
    tables = parse_save(saved)
    return _transaction(
        _mangle_lines(tables.get("mangle"), None, False, 4),
        _filter_lines(tables.get("filter"), {}, False, 4),
    )


def _transaction(mangle: list[str], filter_: list[str]) -> str:
    text = ""
    for name, lines in (("mangle", mangle), ("filter", filter_)):
        if lines:
            text += "\n".join([f"*{name}", *lines, "COMMIT"]) + "\n"
    return text


def _is_ours(table: str, chain: str) -> bool:
    if table == "mangle":
        return chain in (CHAIN, UP_CHAIN, DOWN_CHAIN, SEEN_CHAIN)
    return chain == CHAIN or (table == "filter" and firewall.is_firewall_chain(chain))


def _jumps_into_ours(table_name: str, table: SavedTable) -> list[str]:
    """Delete lines for every rule of a chain not ours that jumps into one of ours."""
    lines = []
    for chain, spec in table.rules:
        target = firewall.target_of(shlex.split(spec))
        if not _is_ours(table_name, chain) and target is not None and _is_ours(table_name, target):
            lines.append(f"-D {chain} {spec}")
    return lines


def _mangle_lines(table: SavedTable | None, vms: list[VmRules] | None, fail_open: bool, version: int,
                  mark: int = DEFAULT_MARK) -> list[str]:
    """Steering for ``vms``, or none (``None`` or no VMs), in place of what is there."""
    table = table or SavedTable()
    lines = _jumps_into_ours("mangle", table)
    existing = [chain for chain in table.chains if _is_ours("mangle", chain)]
    wanted = (UP_CHAIN, DOWN_CHAIN, SEEN_CHAIN) if vms else ()
    stale = [chain for chain in existing if chain not in wanted]
    lines += [f":{chain} - [0:0]" for chain in stale]  # declaring a chain flushes it
    lines += [f"-X {chain}" for chain in stale]
    if not vms:
        return lines
    bypass = " --queue-bypass" if fail_open else ""
    bit = f"{mark:#x}/{mark:#x}"
    lines += [f":{UP_CHAIN} - [0:0]", f":{DOWN_CHAIN} - [0:0]", f":{SEEN_CHAIN} - [0:0]"]
    lines.append(f'-A {UP_CHAIN} -m mark --mark {bit} -m comment --comment "{TAG} queued already" -j RETURN')
    lines.append(f'-A {SEEN_CHAIN} -m mark --mark {bit} -j MARK --set-xmark 0x0/{mark:#x}')
    for vm in vms:
        up = f'-m comment --comment "{TAG} vm={vm.name} uplink" -j NFQUEUE --queue-num {vm.uplink_queue}{bypass}'
        down = f'-m comment --comment "{TAG} vm={vm.name} downlink" -j NFQUEUE --queue-num {vm.downlink_queue}{bypass}'
        # Routed taps/veths match by device, bridge ports by physdev; both are installed. In
        # PREROUTING a bridge port is known for bridged and for routed packets alike.
        lines.append(f"-A {UP_CHAIN} -i {vm.interface} {up}")
        lines.append(f"-A {UP_CHAIN} -m physdev --physdev-in {vm.interface} -j MARK --set-xmark {bit}")
        lines.append(f"-A {UP_CHAIN} -m physdev --physdev-in {vm.interface} {up}")
        lines.append(f"-A {DOWN_CHAIN} -o {vm.interface} {down}")
        lines.append(f"-A {DOWN_CHAIN} -m physdev --physdev-out {vm.interface} --physdev-is-bridged {down}")
        address = vm.address_for(version)
        if vm.bridge and address:
            # Routed onto the bridge: the port is chosen after POSTROUTING, so match the address.
            prefix = 32 if version == 4 else 128
            lines.append(f"-A {DOWN_CHAIN} -o {vm.bridge} -d {address}/{prefix} {down}")
    # Appended: the host's mangle rules in these chains (TCPMSS clamping, marks) run first, since
    # a packet the daemon accepts leaves mangle's chain at the queue.
    lines.append(f'-A PREROUTING -m comment --comment "{TAG}" -j {UP_CHAIN}')
    lines.append(f'-A POSTROUTING -m comment --comment "{TAG}" -j {DOWN_CHAIN}')
    lines += [f'-I {hook} 1 -m comment --comment "{TAG}" -j {SEEN_CHAIN}' for hook in SEEN_HOOKS]
    return lines


def _filter_lines(table: SavedTable | None, wanted: dict[str, VmRules], keep_others: bool, version: int) -> list[str]:
    """Firewalls for the VMs in ``wanted`` (those with a profile), replacing theirs.

    ``keep_others``: the jumps and chains of VMs not in ``wanted`` stay (set_profile); otherwise
    they go (install, remove). Old-layout rules in ``NETSKIN`` (NFQUEUE, mark/REJECT) always go.
    """
    table = table or SavedTable()
    lines = _jumps_into_ours("filter", table)
    existing = [chain for chain in table.chains if _is_ours("filter", chain)]

    kept: list[str] = []  # other VMs' jump specs in NETSKIN, replayed as saved
    kept_chains: set[str] = set()
    if keep_others:
        for chain, spec in table.rules:
            tokens = shlex.split(spec)
            comment, target = firewall.comment_of(tokens), firewall.target_of(tokens)
            jump = firewall.parse_jump_comment(comment)
            if chain == CHAIN and jump and jump[0] not in wanted and target in existing:
                kept.append(spec)
                kept_chains.add(target)

    profiled = [vm for vm in wanted.values() if vm.profile is not None]
    if kept or profiled:
        lines.append(f":{CHAIN} - [0:0]")  # flushed: rebuilt below
        for vm in profiled:
            lines += [f":{chain} - [0:0]" for chain in firewall.chain_names(vm.name)]
            lines += firewall.chain_rules(vm.profile, vm.name, version)
        lines += [f"-A {CHAIN} {spec}" for spec in kept]
        for vm in profiled:
            lines += firewall.jump_rules(CHAIN, vm.name, vm.interface, vm.profile.name,
                                         bridge=vm.bridge, address=vm.address_for(version), version=version)
        # Position 1: the VM's profile judges first; allowed packets RETURN to the host's rules.
        lines += [f'-I {hook} 1 -m comment --comment "{TAG}" -j {CHAIN}' for hook in HOOKS]
        live = {CHAIN} | kept_chains | {c for vm in profiled for c in firewall.chain_names(vm.name)}
    else:
        live = set()
    # Chains to delete must be empty and unreferenced: NETSKIN first (it holds the references).
    stale = sorted((chain for chain in existing if chain not in live), key=lambda c: c != CHAIN)
    for chain in stale:
        lines += [f":{chain} - [0:0]"]
    lines += [f"-X {chain}" for chain in stale]
    return lines


# --- running the tools ----------------------------------------------------------------------


def _check(vms: list[VmRules]) -> None:
    chains: dict[str, str] = {}
    for vm in vms:
        if not _NAME_RE.fullmatch(vm.name):
            raise RulesError(f"VM name {vm.name!r} cannot name netfilter rules (use letters, digits, '.', '_', '-')")
        if not _INTERFACE_RE.fullmatch(vm.interface):
            raise RulesError(f"VM {vm.name}: {vm.interface!r} is not an interface name")
        for queue in (vm.uplink_queue, vm.downlink_queue):
            if not 0 <= queue <= 65_535:
                raise RulesError(f"VM {vm.name}: queue {queue} is out of range (0–65535)")
        chain = firewall.chain_names(vm.name)[0]
        if chains.setdefault(chain, vm.name) != vm.name:
            raise RulesError(f"VMs {chains[chain]} and {vm.name} hash to the same firewall chain {chain}; rename one")


class _Deadline:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.end = time.monotonic() + timeout_s

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise RulesError(f"netfilter rules not changed within {self.timeout_s:g} s")
        return left


def _families() -> list[tuple[str, str]]:
    """(save, restore) command pairs for the address families this host has tools for."""
    pairs = []
    for save, restore in (("iptables-save", "iptables-restore"), ("ip6tables-save", "ip6tables-restore")):
        if shutil.which(save) and shutil.which(restore):
            pairs.append((save, restore))
    if not pairs:
        raise RulesError("iptables-restore not found: install the iptables package")
    return pairs


def _family_tools() -> list[tuple[str, str, int]]:
    return [(save, restore, 6 if save.startswith("ip6") else 4) for save, restore in _families()]


def _restore(restore: str, text: str, deadline: _Deadline) -> None:
    if not text:
        return
    left = deadline.left()
    # -w: wait for the xtables lock (legacy backend) at most a bounded time, inside our timeout.
    wait_s = max(1, math.floor(left) - 1)
    _run([restore, "-w", str(wait_s), "--noflush"], text, timeout_s=left)


def _run(argv: list[str], stdin: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RulesError(
            f"{' '.join(argv)} did not finish within {timeout_s:.1f} s "
            f"(another program may hold the xtables lock); netfilter rules may be unchanged"
        ) from None
    except OSError as exc:
        raise RulesError(f"{argv[0]} could not run: {exc}") from exc
    if proc.returncode != 0:
        raise RulesError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout
