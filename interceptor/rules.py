"""Netfilter rules that steer each VM's traffic into its NFQUEUE queues.

The daemon owns one chain, ``NETSKIN``, in the filter table of iptables and ip6tables, jumped to
from FORWARD (routed and bridged VM traffic), INPUT and OUTPUT (traffic between a VM and the host
itself, e.g. DNS to the host's dnsmasq). Every jump carries the comment ``netskin`` so leftovers
of a killed run can be found. Installing is one ``iptables-restore --noflush`` transaction that
removes any leftover jumps, rebuilds the chain and inserts fresh jumps, so there is never a moment
with two copies or with none. Rules go through the iptables CLI because this kernel's nftables
has no native ``queue`` statement (iptables-nft reaches NFQUEUE through nft_compat).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

CHAIN = "NETSKIN"
TAG = "netskin"
HOOKS = ("FORWARD", "INPUT", "OUTPUT")
REJECT_MARK = 0x20000000  # the mark bit the shell sets on packets it rejects (see shell.REJECT_MARK)


class RulesError(RuntimeError):
    pass


@dataclass(frozen=True)
class VmQueues:
    """Where one VM's traffic goes: its host-side device and its two queue numbers."""

    interface: str
    uplink_queue: int
    downlink_queue: int


def _families() -> list[tuple[str, str]]:
    """(save, restore) command pairs for the address families this host has tools for."""
    pairs = []
    for save, restore in (("iptables-save", "iptables-restore"), ("ip6tables-save", "ip6tables-restore")):
        if shutil.which(save) and shutil.which(restore):
            pairs.append((save, restore))
    if not pairs:
        raise RulesError("iptables-restore not found: install the iptables package")
    return pairs


def _run(argv: list[str], stdin: str | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RulesError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _our_lines(save_output: str) -> tuple[list[str], bool]:
    """Leftover jump rules (as saved) in the filter table, and whether our chain exists."""
    jumps, chain_exists, in_filter = [], False, False
    for line in save_output.splitlines():
        if line.startswith("*"):
            in_filter = line == "*filter"
        elif in_filter and line.startswith(f":{CHAIN} "):
            chain_exists = True
        elif in_filter and line.startswith("-A ") and line.rstrip().endswith(f"-j {CHAIN}"):
            if line.split()[1] in HOOKS:
                jumps.append(line)
    return jumps, chain_exists


def _queue_target(queue: int, bypass: bool) -> str:
    return f"-j NFQUEUE --queue-num {queue}" + (" --queue-bypass" if bypass else "")


def render(vms: list[VmQueues], fail_open: bool, leftover_jumps: list[str], version: int = 4) -> str:
    """The iptables-restore input that makes the ruleset ours, whatever was there before."""
    lines = ["*filter", f":{CHAIN} - [0:0]"]  # declaring the chain flushes it (with --noflush)
    lines += ["-D" + jump[2:] for jump in leftover_jumps]
    # Packets the engine rejected come back (NF_REPEAT) carrying the reject mark: the kernel
    # answers them as a firewall would. These rules come first, so they are never queued again.
    mark = f"-m mark --mark {REJECT_MARK:#x}/{REJECT_MARK:#x}"
    unreachable = "icmp-port-unreachable" if version == 4 else "icmp6-port-unreachable"
    lines.append(f"-A {CHAIN} {mark} -p tcp -j REJECT --reject-with tcp-reset")
    lines.append(f"-A {CHAIN} {mark} -j REJECT --reject-with {unreachable}")
    for vm in vms:
        up = _queue_target(vm.uplink_queue, fail_open)
        down = _queue_target(vm.downlink_queue, fail_open)
        tag = f'-m comment --comment "{TAG}"'
        # Routed taps/veths match by device; bridge ports only by physdev. Installing both is
        # harmless (each never matches the other kind) and needs no guess about the topology.
        lines.append(f"-A {CHAIN} -i {vm.interface} {tag} {up}")
        lines.append(f"-A {CHAIN} -m physdev --physdev-in {vm.interface} --physdev-is-bridged {tag} {up}")
        lines.append(f"-A {CHAIN} -o {vm.interface} {tag} {down}")
        lines.append(f"-A {CHAIN} -m physdev --physdev-out {vm.interface} --physdev-is-bridged {tag} {down}")
    for hook in HOOKS:
        lines.append(f'-I {hook} 1 -m comment --comment "{TAG}" -j {CHAIN}')
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def install(vms: list[VmQueues], fail_open: bool) -> None:
    """Atomically (per address family) replace whatever netskin rules exist with these."""
    for save, restore in _families():
        jumps, _ = _our_lines(_run([save, "-t", "filter"]))
        version = 6 if save.startswith("ip6") else 4
        _run([restore, "-w", "--noflush"], render(vms, fail_open, jumps, version))


def remove() -> bool:
    """Remove every netskin rule and the chain. Returns whether anything was there."""
    found = False
    for save, restore in _families():
        jumps, chain_exists = _our_lines(_run([save, "-t", "filter"]))
        if not jumps and not chain_exists:
            continue
        found = True
        lines = ["*filter"] + ["-D" + jump[2:] for jump in jumps]
        if chain_exists:
            lines += [f"-F {CHAIN}", f"-X {CHAIN}"]
        _run([restore, "-w", "--noflush"], "\n".join(lines + ["COMMIT"]) + "\n")
    return found

