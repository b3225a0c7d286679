"""DNS block and rewrite cannot be sidestepped by an alias: dig in the VM against a server whose
answers are CNAME chains (www.alias-blocked.test → hop.example.test → tracker.blocked.test, and
www.alias-rewritten.test → www.rewritten.test), with the real daemon in the lab.

The server is this module's own, on an extra address of the lab's internet namespace, so the
lab's sinks keep their plain answers; the address goes away with the namespace.
"""

from __future__ import annotations

import pytest

from manager.process import DaemonProcess
from tests.e2e.netns_helpers import ready_script
from tests.e2e.test_firewall_dns_e2e import dig
from tests.e2e.test_manager_e2e import netskin, write_skin

pytestmark = pytest.mark.e2e

CHAIN_SERVER = "10.77.0.53"

CHAIN_DNS = r"""
import socket, sys
from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, A, DNSRecord

CHAINS = {
    "www.alias-blocked.test.": ["hop.example.test.", "tracker.blocked.test."],
    "www.alias-rewritten.test.": ["www.rewritten.test."],
}
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    query, peer = sock.recvfrom(4096)
    request = DNSRecord.parse(query)
    reply = request.reply(ra=1, aa=1)
    qname = str(request.q.qname).lower()
    if qname not in CHAINS:
        reply.header.rcode = RCODE.NXDOMAIN
    else:
        owner = qname
        for target in CHAINS[qname]:
            reply.add_answer(RR(owner, QTYPE.CNAME, rdata=CNAME(target), ttl=300))
            owner = target
        if request.q.qtype == QTYPE.A:
            reply.add_answer(RR(owner, QTYPE.A, rdata=A("203.0.113.5"), ttl=300))
        elif request.q.qtype == QTYPE.AAAA:
            reply.add_answer(RR(owner, QTYPE.AAAA, rdata=AAAA("2001:db8::5"), ttl=300))
    sock.sendto(reply.pack(), peer)
"""


@pytest.fixture
def chain_server(lab):
    lab.exec("inet", ["ip", "addr", "add", f"{CHAIN_SERVER}/24", "dev", "eth0"], check=True)
    with ready_script(lab, "inet", CHAIN_DNS, CHAIN_SERVER):
        yield CHAIN_SERVER


def test_aliases_to_blocked_and_rewritten_names_are_caught(lab, chain_server):
    at = f"@{chain_server}"
    write_skin(lab, "no-aliases", dns={"block": ["*.blocked.test"], "rewrite": {"www.rewritten.test": "198.51.100.9"}})
    with DaemonProcess(lab.config_path) as daemon:
        plain = dig(lab, "www.alias-blocked.test", at)
        assert plain["status"] == "NOERROR" and plain["answers"] == ["203.0.113.5"], plain["raw"]
        assert "tracker.blocked.test." in plain["raw"]  # the chain the server sends

        assert netskin(lab.config_path, "apply", "vm1", "no-aliases").returncode == 0
        blocked = dig(lab, "www.alias-blocked.test", at)
        assert blocked["status"] == "NXDOMAIN" and blocked["answers"] == [], blocked["raw"]
        assert "www.alias-blocked.test." in blocked["raw"]  # the question is echoed

        rewritten = dig(lab, "www.alias-rewritten.test", at)
        assert rewritten["status"] == "NOERROR", rewritten["raw"]
        assert rewritten["answers"] == ["198.51.100.9"], rewritten["raw"]
        assert "203.0.113.5" not in rewritten["raw"] and "CNAME" not in rewritten["raw"]
        aaaa = dig(lab, "www.alias-rewritten.test", "AAAA", at)
        assert aaaa["status"] == "NOERROR" and aaaa["answers"] == [], aaaa["raw"]  # NODATA: nothing leaks

        assert dig(lab, "other.test", at)["status"] == "NXDOMAIN"  # unmatched, passed as sent
        counters = daemon.status("vm1")["vm1"]["dns"]
        assert counters.get("blocked", 0) >= 1 and counters.get("rewritten", 0) >= 2, counters
