"""Security profiles and DNS against the real daemon in the lab.

Firewall: TCP listeners in the VM on 22, 80, 443 and 8080; the internet namespace connects to
each under every shipped profile, while the VM's own TCP, UDP and ping to the internet keep
working. DNS: dig in the VM against the lab's resolver (10.77.0.2, answering www.example.test
as 192.0.2.10) under rewrite, block, redirection to the secondary server (192.0.2.99) and delay.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from interceptor.profiles import load_profile, profile_dirs
from manager import measure
from manager.process import DaemonProcess
from tests.e2e.netns_helpers import ready_script
from tests.e2e.test_manager_e2e import netskin, write_skin

pytestmark = pytest.mark.e2e

PORTS = (22, 80, 443, 8080)
REPO = Path(__file__).resolve().parents[2]

LISTENER = r"""
import socket, sys, time
socks = []
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    socks.append(s)
print("ready", flush=True)
time.sleep(600)
"""

CONNECT = r"""
import json, socket, sys, time
results = {}
for port in map(int, sys.argv[2:]):
    s = socket.socket()
    s.settimeout(1.5)
    start = time.monotonic()
    try:
        s.connect((sys.argv[1], port))
        outcome = "open"
    except ConnectionRefusedError:
        outcome = "refused"
    except (socket.timeout, TimeoutError):
        outcome = "timeout"
    except OSError as exc:
        outcome = f"error {exc.errno}"
    results[port] = {"outcome": outcome, "seconds": time.monotonic() - start}
    s.close()
print(json.dumps(results))
"""


@pytest.fixture
def listeners(lab):
    with ready_script(lab, "vm1", LISTENER, *PORTS):
        yield


def connect_from_inet(lab, ports=PORTS) -> dict[int, dict]:
    out = lab.exec("inet", [sys.executable, "-c", CONNECT, lab.vm("vm1").address, *ports], check=True)
    return {int(port): value for port, value in json.loads(out.stdout).items()}


def vm_reaches_the_internet(lab) -> None:
    """VM-initiated TCP, UDP and ping to the internet all work (replies are let back in)."""
    ping = measure.ping(lab, "vm1", lab.inet_address, count=3, interval=0.05)
    assert ping["received"] == 3, ping
    udp = measure.udp_probe(lab, "vm1", count=20, rate_pps=200)
    assert udp["received"] == 20, udp
    tcp = lab.exec("vm1", [sys.executable, "-c", CONNECT, lab.inet_address, lab.echo_port], check=True)
    assert json.loads(tcp.stdout)[str(lab.echo_port)]["outcome"] == "open"


def test_each_shipped_profile_lets_in_exactly_its_ports(lab, listeners):
    expected_open = {"restricted": {22}, "standard": {22, 80, 443}, "open": set(PORTS)}
    with DaemonProcess(lab.config_path) as daemon:
        for profile, allowed in expected_open.items():
            write_skin(lab, f"fw-{profile}", security_profile=profile)
            applied = netskin(lab.config_path, "apply", "vm1", f"fw-{profile}")
            assert applied.returncode == 0, applied.stderr
            compiled = load_profile(profile, profile_dirs(None))
            refused_kind = {"reject": "refused", "drop": "timeout"}.get(str(compiled.default_in).lower())
            results = connect_from_inet(lab)
            for port in PORTS:
                outcome = results[port]["outcome"]
                if port in allowed:
                    assert outcome == "open", (profile, port, results)
                else:
                    assert outcome == (refused_kind or outcome) and outcome != "open", (profile, port, results)
            vm_reaches_the_internet(lab)
            firewall = daemon.status("vm1")["vm1"]["firewall"]
            # Every incoming connection attempt was decided by a rule or by the default.
            judged = sum(rule["hits"] for rule in firewall["rules"]) + firewall["default_hits"]["in"]
            assert judged >= len(PORTS), firewall


def test_reject_refuses_fast_and_drop_times_out(lab, listeners, tmp_path):
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir()
    (rules_dir / "web-only.toml").write_text(
        'description = "test: 80 open, 8080 rejected, the rest dropped"\n'
        'default_in = "drop"\ndefault_out = "allow"\n'
        '[[rules]]\ndirection = "in"\nproto = "tcp"\nports = [80]\naction = "allow"\n'
        '[[rules]]\ndirection = "in"\nproto = "tcp"\nports = ["8000-8100"]\naction = "reject"\n'
    )
    config = lab.config_path.read_text()
    lab.config_path.write_text(f'rules_dir = "{rules_dir}"\n' + config)
    write_skin(lab, "web-only", security_profile="web-only", latency_ms=10)
    with DaemonProcess(lab.config_path) as daemon:
        assert netskin(lab.config_path, "apply", "vm1", "web-only").returncode == 0
        results = connect_from_inet(lab, (80, 8080, 443))
        assert results[80]["outcome"] == "open", results
        assert results[8080]["outcome"] == "refused" and results[8080]["seconds"] < 0.5, results
        assert results[443]["outcome"] == "timeout" and results[443]["seconds"] >= 1.4, results
        vm_reaches_the_internet(lab)
        status = daemon.status("vm1")["vm1"]
        hits = {rule["rule"]: rule["hits"] for rule in status["firewall"]["rules"]}
        assert list(hits.values())[:2] == [1, 1], status["firewall"]
        assert status["firewall"]["default_hits"]["in"] >= 1, status["firewall"]  # 443, dropped by default


# -- DNS ----------------------------------------------------------------------------------------


def dig(lab, name: str, *options: str) -> dict:
    """dig in vm1 against its configured resolver: the answer, status, server and query time."""
    out = lab.exec("vm1", ["dig", "+tries=1", "+time=2", *options, name], check=False).stdout
    status = re.search(r"status: (\w+)", out)
    server = re.search(r"SERVER: ([^#\s]+)#", out)
    query_ms = re.search(r"Query time: (\d+) msec", out)
    answers = re.findall(r"^\S+\s+(\d+)\s+IN\s+(?:A|AAAA)\s+(\S+)$", out, re.M)
    return {
        "status": status.group(1) if status else None,
        "server": server.group(1) if server else None,
        "ms": int(query_ms.group(1)) if query_ms else None,
        "answers": [address for _, address in answers],
        "ttls": [int(ttl) for ttl, _ in answers],
        "raw": out,
    }


def test_rewrite_block_and_redirect(lab):
    vm_resolver = lab.dns_servers[0]
    write_skin(lab, "rewrite", dns={"rewrite": {"*.example.test": "198.51.100.7"}, "ttl": 42})
    write_skin(lab, "block", dns={"block": ["WWW.Example.Test."]})
    write_skin(lab, "redirect", dns_servers=[lab.dns_servers[1]])
    write_skin(lab, "failover", dns_servers=["10.77.0.9", lab.dns_servers[1]])
    with DaemonProcess(lab.config_path) as daemon:
        plain = dig(lab, "www.example.test")
        assert plain["answers"] == ["192.0.2.10"] and plain["server"] == vm_resolver, plain["raw"]

        assert netskin(lab.config_path, "apply", "vm1", "rewrite").returncode == 0
        got = dig(lab, "www.example.test")
        assert got["answers"] == ["198.51.100.7"] and got["ttls"] == [42], got["raw"]
        assert got["server"] == vm_resolver
        assert dig(lab, "www.example.test", "AAAA")["answers"] == []  # no real address leaks
        assert dig(lab, "example.org")["status"] in ("NXDOMAIN", "REFUSED", "NOERROR")  # untouched
        assert daemon.status("vm1")["vm1"]["dns"].get("rewritten", 0) >= 2

        assert netskin(lab.config_path, "apply", "vm1", "block").returncode == 0
        blocked = dig(lab, "www.example.test")
        assert blocked["status"] == "NXDOMAIN" and blocked["answers"] == [], blocked["raw"]
        assert dig(lab, "mail.example.test")["answers"] == ["192.0.2.20"]

        assert netskin(lab.config_path, "apply", "vm1", "redirect").returncode == 0
        for transport in ("+notcp", "+tcp"):
            moved = dig(lab, "www.example.test", transport)
            assert moved["answers"] == ["192.0.2.99"], (transport, moved["raw"])
            assert moved["server"] == vm_resolver  # the answer appears to come from its own resolver

        # The first server never answers: the daemon's probes move the redirection to the next.
        assert netskin(lab.config_path, "apply", "vm1", "failover").returncode == 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            if dig(lab, "www.example.test")["answers"] == ["192.0.2.99"]:
                break
        else:
            pytest.fail(f"no failover to the second DNS server: {daemon.status('vm1')['vm1']['identity']}")

        assert netskin(lab.config_path, "revert", "vm1").returncode == 0
        assert dig(lab, "www.example.test")["answers"] == ["192.0.2.10"]


def test_dns_delay_adds_to_query_time(lab):
    write_skin(lab, "slow-dns", dns={"delay_ms": 300})
    with DaemonProcess(lab.config_path):
        before = statistics.median(dig(lab, "www.example.test")["ms"] for _ in range(5))
        assert netskin(lab.config_path, "apply", "vm1", "slow-dns").returncode == 0
        after = [dig(lab, "www.example.test") for _ in range(5)]
        assert all(answer["answers"] == ["192.0.2.10"] for answer in after)
        added = statistics.median(answer["ms"] for answer in after) - before
        assert 270 <= added <= 400, (before, [answer["ms"] for answer in after])


def test_answers_from_the_host_itself_are_rewritten(lab):
    """A resolver on the host (libvirt's dnsmasq): answers cross OUTPUT, not FORWARD."""
    host_address = lab.vm("vm1").gateway
    sink = lab.popen("hv", [sys.executable, "-m", "manager.sinks", "--dns", f"primary@{host_address}:53"],
                     cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        write_skin(lab, "rewrite", dns={"rewrite": {"www.example.test": "198.51.100.8"}})
        with DaemonProcess(lab.config_path):
            deadline = time.monotonic() + 5
            while dig(lab, "www.example.test", f"@{host_address}")["answers"] != ["192.0.2.10"]:
                assert time.monotonic() < deadline, "the host's DNS server did not start"
            assert netskin(lab.config_path, "apply", "vm1", "rewrite").returncode == 0
            got = dig(lab, "www.example.test", f"@{host_address}")
            assert got["answers"] == ["198.51.100.8"] and got["server"] == host_address, got["raw"]
    finally:
        sink.terminate()
        sink.wait()

