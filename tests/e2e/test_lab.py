"""The demo lab itself: reachability, sinks, DNS, the host config, and complete removal."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from manager import lab as labmod
from manager import measure
from manager.lab import LAB_ROOT, NETNS_CONF_DIR, LabError, lab_down, lab_up, load_lab

pytestmark = pytest.mark.e2e


def ip_netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def lab_leftovers(prefix: str) -> list[str]:
    """Everything of lab `prefix` still on the host, by what `ip netns list` and the files show."""
    left = [n for n in ip_netns_names() if n.startswith(f"{prefix}-")]
    if NETNS_CONF_DIR.is_dir():
        left += [str(d) for d in NETNS_CONF_DIR.iterdir() if d.name.startswith(f"{prefix}-")]
    if (LAB_ROOT / prefix).exists():
        left.append(str(LAB_ROOT / prefix))
    return left


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_for(predicate, timeout_s: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


# --- reachability and sinks --------------------------------------------------------------------


def test_vm_pings_inet_over_ipv4(lab_module):
    result = measure.ping(lab_module, "vm1", lab_module.inet_address, count=5, interval=0.05)
    assert result["sent"] == 5
    assert result["loss_percent"] == 0
    assert 0 < result["rtt_min_ms"] <= result["rtt_median_ms"] <= result["rtt_max_ms"] < 100


@pytest.mark.parametrize("vm", ["vm1", "vm2"])
def test_vm_pings_inet_over_ipv6(lab_module, vm):
    result = measure.ping(lab_module, vm, lab_module.inet_address6, count=5, interval=0.05)
    assert result["loss_percent"] == 0
    # No first-packet stall: the links are up before lab_up returns.
    assert result["rtt_max_ms"] < 100


def test_vms_reach_each_other_through_the_hypervisor(lab_module):
    vm2 = lab_module.vm("vm2")
    for target in (vm2.address, vm2.address6):
        assert measure.ping(lab_module, "vm1", target, count=3, interval=0.05)["loss_percent"] == 0


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_tcp_echo(lab_module, family):
    target = lab_module.inet_address if family == socket.AF_INET else lab_module.inet_address6
    payload = os.urandom(100_000)
    with lab_module.socket("vm1", family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect((target, lab_module.echo_port))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        echoed = bytearray()
        while chunk := sock.recv(65536):
            echoed += chunk
    assert echoed == payload


def test_udp_echo_probe(lab_module):
    result = measure.udp_probe(lab_module, "vm2", count=50, rate_pps=500)
    assert result["received"] == 50
    assert result["loss_percent"] == 0
    assert result["duplicates"] == 0
    assert 0 < result["rtt_median_ms"] < 100


@pytest.mark.parametrize(
    ("dig_args", "expected"),
    [
        (["www.example.test"], "192.0.2.10"),  # through /etc/netns/<vm>/resolv.conf
        (["AAAA", "www.example.test"], "2001:db8::10"),
        (["mail.example.test"], "192.0.2.20"),
        (["+tcp", "www.example.test"], "192.0.2.10"),
        (["@fd77::2", "www.example.test"], "192.0.2.10"),
        (["@10.77.0.3", "www.example.test"], "192.0.2.99"),  # the secondary server
    ],
)
def test_dns_answers(lab_module, dig_args, expected):
    done = lab_module.exec("vm1", ["dig", "+short", "+time=2", "+tries=1", *dig_args], check=True)
    assert done.stdout.split() == [expected]


def test_dns_unknown_name_is_nxdomain(lab_module):
    done = lab_module.exec("vm1", ["dig", "+time=2", "+tries=1", "nothing.invalid"], check=True)
    assert "status: NXDOMAIN" in done.stdout


def test_vm_resolver_points_at_the_lab(lab_module):
    for vm in lab_module.vms:
        done = lab_module.exec(vm.name, ["cat", "/etc/resolv.conf"], check=True)
        assert done.stdout == f"nameserver {lab_module.dns_servers[0]}\n"


def test_iperf3_two_vms_at_once(lab_module):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(measure.iperf3, lab_module, vm, port, seconds=1)
            for vm, port in zip(("vm1", "vm2"), lab_module.iperf3_ports)
        ]
        assert all(run.result() > 1e6 for run in runs)


def test_iperf3_reverse_and_udp(lab_module):
    assert measure.iperf3(lab_module, "vm1", reverse=True, seconds=1) > 1e6
    udp_bps = measure.iperf3(lab_module, "vm1", udp=True, rate="5M", seconds=1)
    assert 4e6 < udp_bps < 6e6


def test_lab_has_no_route_out(lab_module):
    """Structural safety: the hypervisor and inet namespaces cannot route beyond the lab."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    for ns in (lab_module.hv_ns, lab_module.inet_ns):
        with IPRoute(netns=ns, flags=0) as ipr:
            for dst, family in (("192.0.2.1", socket.AF_INET), ("2001:db8::1", socket.AF_INET6)):
                with pytest.raises(NetlinkError):  # route lookups only: nothing is sent
                    ipr.route("get", dst=dst, family=family)


def test_host_config(lab_module):
    config = tomllib.loads(lab_module.config_path.read_text())
    workdir = lab_module.workdir
    assert config["state_dir"] == str(workdir / "state")
    assert config["skins_dir"] == str(workdir / "skins.d")
    assert (workdir / "skins.d").is_dir()
    assert config["control_socket"] == str(workdir / "control.sock")
    assert config["fail_mode"] == "open"
    assert config["host_netns"] == lab_module.hv_ns
    assert config["queue_base"] == 7700
    assert config["vms"] == {
        "vm1": {"interface": "tap-vm1", "address": "10.77.1.2", "address6": "fd77:1::2",
                "netns": f"{lab_module.prefix}-vm1"},
        "vm2": {"interface": "tap-vm2", "address": "10.77.2.2", "address6": "fd77:2::2",
                "netns": f"{lab_module.prefix}-vm2"},
    }


def test_load_lab_matches_the_running_lab(lab_module):
    loaded = load_lab(lab_module.prefix)
    assert loaded.vms == lab_module.vms
    assert loaded.config_path == lab_module.config_path
    assert loaded.pids == lab_module.pids


def test_sinks_stop_cleanly_on_sigterm(lab_module):
    argv = [sys.executable, "-m", "manager.sinks", "--echo", f"{lab_module.inet_address}:9100"]
    with lab_module.popen("inet", argv, stderr=subprocess.PIPE, text=True) as proc:
        try:
            wait_for(lambda: labmod._is_listening(proc.pid, {("udp", lab_module.inet_address, 9100)}),
                     what="the extra sink to listen")
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
    assert "stopping on SIGTERM" in stderr


# --- building and removing ---------------------------------------------------------------------


def test_lab_down_removes_everything(lab, lab_module):
    pids = list(lab.pids.values())
    assert all(pid_alive(pid) for pid in pids)
    assert set(lab.namespaces) <= ip_netns_names()

    lab_down(lab.prefix)

    assert lab_leftovers(lab.prefix) == []
    for vm in lab.vms:
        assert not (NETNS_CONF_DIR / vm.netns).exists()
    assert not any(pid_alive(pid) for pid in pids)
    assert set(lab_module.namespaces) <= ip_netns_names(), "another lab must be left alone"
    lab_down(lab.prefix)  # idempotent


def test_lab_down_from_a_fresh_process(lab):
    code = f"from manager.lab import lab_down; lab_down({lab.prefix!r})"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert lab_leftovers(lab.prefix) == []
    assert not any(pid_alive(pid) for pid in lab.pids.values())


def test_failed_build_leaves_nothing(lab_prefix, monkeypatch):
    started = {}

    def start_then_fail(lab, state):
        real_start_sinks(lab, state)
        started.update(lab.pids)
        raise RuntimeError("injected failure after the sinks started")

    real_start_sinks = labmod._start_sinks
    monkeypatch.setattr(labmod, "_start_sinks", start_then_fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        lab_up(lab_prefix, vms=2)
    assert started, "the failure was meant to come after the sinks started"
    assert lab_leftovers(lab_prefix) == []
    assert not any(pid_alive(pid) for pid in started.values())


def test_lab_down_half_built_without_state_file(lab_prefix):
    """A crash before the state file was written: lab_down finds the lab by its names."""
    from pyroute2 import netns

    for name in (f"{lab_prefix}-hv", f"{lab_prefix}-vm1"):
        netns.create(name)
    conf_dir = NETNS_CONF_DIR / f"{lab_prefix}-vm1"
    conf_dir.mkdir(parents=True)
    (conf_dir / "resolv.conf").write_text("nameserver 10.77.0.2\n")
    stray = subprocess.Popen(["ip", "netns", "exec", f"{lab_prefix}-hv", "sleep", "60"])
    try:
        wait_for(lambda: os.readlink(f"/proc/{stray.pid}/exe").endswith("sleep"), what="sleep to start")

        lab_down(lab_prefix)

        assert lab_leftovers(lab_prefix) == []
        assert stray.wait(timeout=5) == -signal.SIGTERM
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()


def test_lab_up_refuses_an_existing_prefix(lab):
    with pytest.raises(LabError, match="already exists"):
        lab_up(lab.prefix)
    assert set(lab.namespaces) <= ip_netns_names(), "the refused lab_up must not touch the existing lab"
    assert measure.ping(lab, "vm1", lab.inet_address, count=1)["loss_percent"] == 0


def test_lab_up_in_a_given_workdir(lab_prefix, tmp_path):
    workdir = tmp_path / "lab"
    lab = lab_up(lab_prefix, vms=1, workdir=workdir)
    assert lab.config_path == workdir / "netskin.toml"
    assert (workdir / "lab.json").exists() and (LAB_ROOT / lab_prefix / "lab.json").exists()
    assert [vm.name for vm in lab.vms] == ["vm1"]
    lab_down(lab_prefix)
    assert lab_leftovers(lab_prefix) == []
    assert not (workdir / "lab.json").exists()
    assert (workdir / "logs").is_dir(), "a caller's workdir keeps the sink logs"
