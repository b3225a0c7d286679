"""The shipped interceptor unit under a real systemd: readiness, the watchdog, and fail_mode
"closed" across a crash.

The host's own root file system boots read-only in a systemd-nspawn container with a throw-away
overlay (``--volatile=overlay``) and a private network namespace, so the host's firewall and
/etc stay untouched and there is nothing to download or cache. Inside, this same file runs as a
oneshot service (``scenario()``): it builds the namespace lab, installs the shipped unit with a
drop-in for the lab's config and this checkout's binaries, starts it, applies a 100 ms skin,
probes a VM's path at 100 packets/s, SIGKILLs the daemon and watches systemd restart it. It
writes what it saw to /out/result.json and powers the container off; the test asserts on that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = "netskin-interceptor.service"
LAB_PREFIX = "nsk"
LAB_CONFIG = "/etc/netskin/lab.toml"
SKIN = "e2e-100ms"
LATENCY_MS = 100
SKINNED_RTT_MS = 95  # a probe answered faster than this passed (at least one way) without the skin
PROBE_INTERVAL_S = 0.01
PRE_KILL_S = 12.0  # longer than WatchdogSec: a fed watchdog does not fire
POST_READY_S = 3.0
CONTAINER_TIMEOUT_S = 150


# --- inside the container ------------------------------------------------------------------

def _run(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stdout}{done.stderr}")
    return done.stdout


def _show(*props: str) -> dict[str, str]:
    out = _run("systemctl", "show", UNIT, "-p", ",".join(props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _steering_installed() -> bool:
    saved = _run("ip", "netns", "exec", f"{LAB_PREFIX}-hv", "iptables-save")  # any table
    return bool(re.search(r"-j NFQUEUE --queue-num", saved))


PROBE = r"""
import json, os, select, socket, struct, sys, time
target, port, interval, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setblocking(False)
sent, replies, seq = [], {}, 0
stop = os.path.exists
next_send = time.monotonic()
while not stop(out + ".stop"):
    now = time.monotonic()
    if now >= next_send:
        sent.append(now)
        try:
            sock.sendto(struct.pack("!Id", seq, now), (target, port))
        except OSError:
            pass  # a blocked path may refuse: the probe still counts as sent, unanswered
        seq += 1
        next_send += interval
    ready, _, _ = select.select([sock], [], [], max(0.0, next_send - time.monotonic()))
    if ready:
        data = sock.recv(2048)
        arrived = time.monotonic()
        if len(data) >= 12:
            n, = struct.unpack("!I", data[:4])
            replies.setdefault(n, arrived)
with open(out, "w") as f:
    json.dump({"sent": sent, "replies": {str(k): v for k, v in replies.items()}}, f)
"""


def scenario(out: Path) -> None:
    result: dict = {"steps": []}

    def step(name: str, **data) -> None:
        result["steps"].append({"name": name, "t": time.monotonic(), **data})
        print(f"scenario: {name} {data if data else ''}", flush=True)

    try:
        _scenario(out, result, step)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
        result["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        journal = _run("journalctl", "-o", "short-monotonic", "--no-pager", "-u", UNIT, check=False)
        (out / "journal.txt").write_text(journal)
        (out / "result.json").write_text(json.dumps(result))


def _scenario(out: Path, result: dict, step) -> None:
    from manager.lab import ECHO_PORT, INET_ADDRESSES

    bin_dir = Path(sys.executable).parent
    lab = json.loads(_run(str(bin_dir / "netskin"), "lab", "up", "--vms", "1", "--prefix", LAB_PREFIX, "--json"))
    lab_toml = Path(lab["config"]).read_text()
    vm_ns = f"{LAB_PREFIX}-vm1"

    # The lab's config with the unit's own directories (state, skins, control socket), closed.
    lines = [line for line in lab_toml.splitlines()
             if not re.match(r"(state_dir|skins_dir|control_socket|fail_mode)\s*=", line)]
    Path(LAB_CONFIG).parent.mkdir(parents=True, exist_ok=True)
    Path(LAB_CONFIG).write_text('fail_mode = "closed"\n' + "\n".join(lines) + "\n")

    # Install the shipped unit as is; a drop-in points it at this checkout and the lab.
    units = Path("/etc/systemd/system")
    shutil.copy(REPO / "systemd" / UNIT, units / UNIT)
    dropin = units / f"{UNIT}.d"
    dropin.mkdir(exist_ok=True)
    conf = ["[Service]", "ExecStart=",
            f"ExecStart={bin_dir / 'netskin-interceptor'} --config {LAB_CONFIG}",
            # host_netns: the daemon enters the lab's hypervisor namespace (systemd/README.md).
            "CapabilityBoundingSet=CAP_SYS_ADMIN", "RestrictNamespaces=net"]
    interpreter = Path(os.path.realpath(sys.executable))
    if interpreter.is_relative_to("/root") or interpreter.is_relative_to("/home"):
        # This venv's Python lives under a home directory, which ProtectHome=yes hides.
        conf += ["ProtectHome=tmpfs", f"BindReadOnlyPaths={Path(sys.base_prefix).resolve()}"]
    (dropin / "e2e.conf").write_text("\n".join(conf) + "\n")
    _run("systemctl", "daemon-reload")
    result["unit"] = _show("Type", "NotifyAccess", "Restart", "ExecStopPost")

    # Readiness: "activating" while the daemon runs but has not sent READY=1, then "active" with
    # the STATUS= that came in the same message.
    _run("systemctl", "start", "--no-block", UNIT)
    samples = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = _show("ActiveState", "SubState", "MainPID", "StatusText")
        state["steering"] = _steering_installed() if state["ActiveState"] == "active" else None
        samples.append(state)
        if state["ActiveState"] in ("active", "failed"):
            break
        time.sleep(0.02)
    result["start_samples"] = samples
    step("started", **_show("ActiveState", "MainPID", "ExecMainStartTimestampMonotonic",
                            "ActiveEnterTimestampMonotonic"))
    if samples[-1]["ActiveState"] != "active":
        raise RuntimeError(f"{UNIT} did not become active: {samples[-1]}")

    netskin = [str(bin_dir / "netskin"), "--config", LAB_CONFIG]
    skin_file = out / f"{SKIN}.json"
    skin_file.write_text(json.dumps({"name": SKIN, "latency_ms": LATENCY_MS}))
    _run(*netskin, "skins", "create", str(skin_file))
    _run(*netskin, "apply", "vm1", SKIN)
    step("applied")

    probe_out = out / "probe.json"
    probe = subprocess.Popen(["ip", "netns", "exec", vm_ns, sys.executable, "-c", PROBE, INET_ADDRESSES[0],
                              str(ECHO_PORT), str(PROBE_INTERVAL_S), str(probe_out)])
    try:
        time.sleep(PRE_KILL_S)
        before = _show("MainPID", "NRestarts", "WatchdogTimestampMonotonic", "WatchdogUSec", "ActiveState")
        step("before_kill", **before)
        os.kill(int(before["MainPID"]), 9)
        step("killed")
        # While systemd waits to restart it, the steering stays and the new daemon is not up.
        samples = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = _show("ActiveState", "SubState", "MainPID", "NRestarts")
            state["t"] = time.monotonic()
            state["steering"] = _steering_installed()
            samples.append(state)
            if state["ActiveState"] == "active" and state["MainPID"] not in ("0", before["MainPID"]):
                break
            time.sleep(0.05)
        result["restart_samples"] = samples
        step("restarted", **_show("MainPID", "NRestarts", "ActiveState"))
        time.sleep(POST_READY_S)
        step("probe_end", **_show("WatchdogTimestampMonotonic", "NRestarts", "MainPID"))
    finally:
        Path(str(probe_out) + ".stop").touch()
        probe.wait(timeout=10)
    result["probe"] = json.loads(probe_out.read_text())
    status = _run(*netskin, "--json", "status", "vm1")
    try:
        result["status"] = json.loads(status)
    except ValueError as exc:
        raise RuntimeError(f"netskin --json status vm1 printed no JSON ({exc}):\n{status}") from None

    # A clean stop: the daemon takes its steering out itself, and the VM's traffic flows again.
    _run("systemctl", "stop", UNIT)
    step("stopped", steering=_steering_installed(), **_show("ActiveState", "Result"))
    rtts = _run("ip", "netns", "exec", vm_ns, "ping", "-c", "3", "-i", "0.2", "-W", "1", INET_ADDRESSES[0],
                check=False)
    result["ping_after_stop"] = [float(m) for m in re.findall(r"time=([\d.]+) ms", rtts)]


# --- on the host ---------------------------------------------------------------------------

def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "booting a container with systemd-nspawn needs root"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is not installed (apt-get install systemd-container)"
    if shutil.which("unshare") is None:
        return "unshare is not installed (util-linux)"
    return None


def _boot(work: Path) -> tuple[int, str]:
    """Boot the host's root read-only with a tmpfs overlay; run scenario() as a oneshot service."""
    root, out, units = work / "root", work / "out", work / "units"
    for d in (root, out, units):
        d.mkdir()
    (units / "netskin-e2e.target").write_text(
        "[Unit]\nDescription=netskin systemd e2e\nRequires=basic.target netskin-e2e.service\n"
        "After=basic.target\nAllowIsolate=yes\n")
    (units / "netskin-e2e.service").write_text(
        "[Unit]\nDescription=netskin systemd e2e scenario\nAfter=basic.target\n\n"
        "[Service]\nType=oneshot\n"
        f"ExecStart={sys.executable} {Path(__file__).resolve()} /out\n"
        "ExecStopPost=/bin/systemctl --no-block poweroff\n"
        "StandardOutput=journal+console\nStandardError=journal+console\n"
        "Environment=PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1\n")
    binds = {str(REPO), str(Path(sys.prefix).resolve()), str(Path(sys.base_prefix).resolve())}
    nspawn = [
        "systemd-nspawn", "--quiet", "-D", str(root), "--volatile=overlay", "--private-network",
        # No systemd as the host's PID 1 here: no machined to register with, no scope to create.
        "--register=no", "--keep-unit", "--link-journal=no", f"--uuid={uuid.uuid4().hex}",
        "--console=pipe", f"--bind={out}:/out",
        *(f"--bind-ro={units / name}:/etc/systemd/system/{name}" for name in ("netskin-e2e.target",
                                                                               "netskin-e2e.service")),
        *(f"--bind-ro={path}" for path in sorted(binds)),
        "--boot", "systemd.unit=netskin-e2e.target",
    ]
    # The root bind mount lives only in a private mount namespace that ends with the container.
    script = (f'mount --bind / "{root}" && mount -o remount,bind,ro "{root}" && exec "$@"')
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *nspawn],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        console, _ = proc.communicate(timeout=CONTAINER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        console, _ = proc.communicate()
        console += f"\n(container killed after {CONTAINER_TIMEOUT_S} s)"
    return proc.returncode, console


def _between(sent: list[float], replies: dict[str, float], start: float, end: float) -> tuple[int, int]:
    """(probes sent in [start, end), how many of them were answered)."""
    seqs = [i for i, t in enumerate(sent) if start <= t < end]
    return len(seqs), sum(str(i) in replies for i in seqs)


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_closed_unit_blocks_a_crashed_daemons_vms_until_systemd_restarts_it(tmp_path):
    code, console = _boot(tmp_path)
    out = tmp_path / "out"
    journal = (out / "journal.txt").read_text() if (out / "journal.txt").exists() else "(no journal)"
    context = f"container exit {code}\n--- console ---\n{console[-6000:]}\n--- journal ---\n{journal[-6000:]}"
    assert (out / "result.json").exists(), context
    result = json.loads((out / "result.json").read_text())
    assert "error" not in result, f"{result['error']}\n{context}"
    steps = {s["name"]: s for s in result["steps"]}

    # The unit as installed: notify, the daemon alone may notify, no --cleanup.
    unit = result["unit"]
    assert (unit["Type"], unit["NotifyAccess"]) == ("notify", "main"), unit
    assert "--cleanup" not in unit.get("ExecStopPost", ""), unit

    # Readiness: the daemon ran (MainPID set) while the unit was still "activating", and the
    # unit became active only with the daemon's READY=1 (its STATUS= came in the same message),
    # with the steering already installed.
    start = result["start_samples"]
    assert any(s["ActiveState"] == "activating" and s["MainPID"] != "0" and not s["StatusText"]
               for s in start), start
    assert start[-1]["ActiveState"] == "active" and start[-1]["StatusText"].startswith("enforcing"), start[-1]
    assert start[-1]["steering"] is True, start[-1]

    # The watchdog: fed (its timestamp moved on) and never fired in PRE_KILL_S > WatchdogSec.
    before, end = steps["before_kill"], steps["probe_end"]
    assert before["NRestarts"] == "0" and before["ActiveState"] == "active", before
    assert before["WatchdogUSec"] == "10s", before
    assert int(before["WatchdogTimestampMonotonic"]) > 0
    assert int(end["WatchdogTimestampMonotonic"]) > int(before["WatchdogTimestampMonotonic"])

    # The crash: systemd restarted the daemon once, and kept no cleanup between.
    restart = result["restart_samples"]
    assert steps["restarted"]["NRestarts"] == "1" and end["NRestarts"] == "1", (steps["restarted"], end)
    assert steps["restarted"]["MainPID"] != before["MainPID"]
    assert any(s["SubState"] == "auto-restart" for s in restart), restart
    new_pid_seen = next(s["t"] for s in restart if s["MainPID"] not in ("0", before["MainPID"]))

    sent, replies = result["probe"]["sent"], result["probe"]["replies"]
    rtts_ms = {int(k): (v - sent[int(k)]) * 1000 for k, v in replies.items()}
    applied, killed, ready_again = steps["applied"]["t"], steps["killed"]["t"], steps["restarted"]["t"]

    # No probe ever passed without the skin: every answer took the skin's 100 ms round trip.
    fastest = min(rtts_ms.values())
    assert fastest >= SKINNED_RTT_MS, (
        f"{sum(r < SKINNED_RTT_MS for r in rtts_ms.values())} probe(s) answered in under "
        f"{SKINNED_RTT_MS} ms (fastest {fastest:.1f} ms): traffic passed without the skin")
    # Before the kill the skin was in force and the path open.
    n, answered = _between(sent, replies, applied + 0.5, killed - 0.2)
    assert n > 900 and answered >= 0.95 * n, (n, answered)
    # From the kill until systemd had started a new daemon: nothing passed (fail_mode closed).
    n, answered = _between(sent, replies, killed, new_pid_seen)
    print(f"blocked window: {new_pid_seen - killed:.2f} s, {n} probes sent, {answered} answered")
    assert n >= 50 and answered == 0, (n, answered)
    # ... because the steering stayed in place all along.
    assert all(s["steering"] for s in restart), "steering removed while systemd restarted the daemon"
    # After the restart the skin is back in force (state survived) and the path open again.
    n, answered = _between(sent, replies, ready_again + 0.2, steps["probe_end"]["t"] - 0.3)
    assert n > 200 and answered >= 0.95 * n, (n, answered)
    after = [rtts_ms[i] for i in range(len(sent)) if i in rtts_ms and sent[i] >= ready_again]
    print(f"RTT before kill / after restart: min {fastest:.1f} ms, after restart median "
          f"{sorted(after)[len(after) // 2]:.1f} ms over {len(after)} answers")
    vm1 = result["status"]["vms"]["vm1"] if "vms" in result["status"] else result["status"]
    assert vm1["active"]["name"] == SKIN if isinstance(vm1.get("active"), dict) else vm1.get("active") == SKIN, vm1

    # A clean stop: the daemon removed its steering itself, and the VM is unimpaired again.
    stopped = steps["stopped"]
    assert stopped["steering"] is False and stopped["Result"] == "success", stopped
    assert result["ping_after_stop"] and max(result["ping_after_stop"]) < SKINNED_RTT_MS / 2, result["ping_after_stop"]


if __name__ == "__main__":
    scenario(Path(sys.argv[1]))
