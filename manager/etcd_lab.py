"""etcd for the labs and the fleet tests: its own processes, data dir and network namespace.

Never the packaged service: the ``etcd`` binary (Debian's etcd-server) runs with a data dir, ports
and namespace of its own. One member on loopback, optionally with a veth to one other namespace
(a lab's hypervisor) so an agent there reaches etcd over a link that can be cut; or, for the fleet
lab, one member per address the caller already configured in the namespace (``members``; three
make a cluster that keeps quorum with one member down). Code talks to etcd from a thread that has
entered the namespace (``in_netns``): setns(2) moves only the calling thread.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import trio

from manager.fleet_security import LabPki, make_lab_pki, secure_etcd, store_for
from manager.store import Store

CLONE_NEWNET = 0x40000000
CLIENT_PORT = 23790
PEER_PORT = 23800
_libc = ctypes.CDLL(None, use_errno=True)


def etcd_skip_reason() -> str | None:
    missing = [tool for tool in ("etcd", "etcdctl", "ip") if shutil.which(tool) is None]
    if missing:
        return f"the fleet tests need {', '.join(missing)} (apt-get install etcd-server etcd-client iproute2)"
    if os.geteuid() != 0:
        return "the fleet tests need root (network namespaces)"
    return None


def _run(*argv: str) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def in_netns(ns: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a thread that has entered network namespace ``ns``; return its result."""
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {ns}")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def trio_in_netns(ns: str, async_fn: Callable[..., Any], *args: Any) -> Any:
    return in_netns(ns, lambda: trio.run(async_fn, *args))


class Etcd:
    """etcd in namespace ``ns``, with auto-compaction on.

    ``peer_ns``: a namespace to join with a veth (etcd at 10.99.0.1, the peer at 10.99.0.2).
    ``members``: instead, one member per address (already configured in ``ns``), each listening
    for clients and peers on its own address; ``own_netns=False`` when the caller made ``ns``.
    ``tls``: clients must speak TLS and show a certificate from the lab CA (``self.pki``).
    ``auth_hosts``: with TLS, etcd's auth on, with the users and roles of
    ``manager.fleet_security`` for these hosts (their passwords in ``self.pki``);
    ``auth_token_ttl_s``: how long etcd's tokens last (its default: 300 s).
    ``workdir``: data, logs and PKI (default: a temporary directory, removed with the namespace);
    ``detach``: the members run in a session of their own, so they outlive the caller's terminal.
    """

    ADDRESS = "10.99.0.1"
    PEER_ADDRESS = "10.99.0.2"

    def __init__(self, ns: str, peer_ns: str | None = None, *, compaction_retention: int = 1000,
                 tls: bool = False, auth_hosts: Iterable[str] | None = None,
                 auth_token_ttl_s: int | None = None, members: Iterable[str] | None = None,
                 own_netns: bool = True, workdir: Path | None = None, detach: bool = False) -> None:
        if auth_hosts is not None and not tls:
            raise ValueError("etcd auth in the lab comes with TLS: pass tls=True")
        self.ns = ns
        self.peer_ns = peer_ns
        self.members = list(members or ())
        if self.members and peer_ns:
            raise ValueError("give members (addresses in the namespace) or peer_ns, not both")
        self.own_netns = own_netns
        self.retention = compaction_retention
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"netskin-{ns}-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.auth_hosts = None if auth_hosts is None else list(auth_hosts)
        self.auth_token_ttl_s = auth_token_ttl_s
        self.detach = detach
        self.scheme = "https" if tls else "http"
        self.pki: LabPki | None = None
        self.secured = False  # auth is on
        self.procs: list[subprocess.Popen] = []
        self._veth = f"{ns[:10]}e"

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.procs[0] if self.procs else None

    @property
    def endpoint(self) -> str:
        """The client URL for the peer namespace (or loopback inside ``ns``; the first member)."""
        if self.members:
            return self.endpoints[0]
        host = self.ADDRESS if self.peer_ns else "127.0.0.1"
        return f"{self.scheme}://{host}:{CLIENT_PORT}"

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL, as reached inside ``ns``."""
        if self.members:
            return [f"{self.scheme}://{address}:{CLIENT_PORT}" for address in self.members]
        return [self.local_endpoint]

    @property
    def local_endpoint(self) -> str:
        if self.members:
            return self.endpoints[0]
        return f"{self.scheme}://127.0.0.1:{CLIENT_PORT}"

    def __enter__(self) -> "Etcd":
        try:
            if self.own_netns:
                self.create_netns()
            self.start()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def create_netns(self) -> None:
        _run("ip", "netns", "add", self.ns)
        _run("ip", "-n", self.ns, "link", "set", "lo", "up")
        if self.peer_ns:
            _run("ip", "-n", self.ns, "link", "add", self._veth, "type", "veth", "peer", "name", "mgmt0",
                 "netns", self.peer_ns)
            _run("ip", "-n", self.ns, "addr", "add", f"{self.ADDRESS}/30", "dev", self._veth)
            _run("ip", "-n", self.ns, "link", "set", self._veth, "up")
            _run("ip", "-n", self.peer_ns, "addr", "add", f"{self.PEER_ADDRESS}/30", "dev", "mgmt0")
            _run("ip", "-n", self.peer_ns, "link", "set", "mgmt0", "up")

    def member_argv(self, index: int) -> list[str]:
        """The etcd command line of member ``index`` (what runs in the namespace)."""
        if self.members:
            names = [f"nsk{i + 1}" for i in range(len(self.members))]
            address = self.members[index]
            client_urls = [f"{self.scheme}://{address}:{CLIENT_PORT}"]
            peer_url = f"http://{address}:{PEER_PORT}"
            cluster = ",".join(f"{n}=http://{a}:{PEER_PORT}" for n, a in zip(names, self.members))
            name = names[index]
        else:
            client_urls = [self.local_endpoint] + ([f"{self.scheme}://{self.ADDRESS}:{CLIENT_PORT}"]
                                                   if self.peer_ns else [])
            peer_url = f"http://127.0.0.1:{PEER_PORT}"
            cluster = f"nsk={peer_url}"
            name = "nsk"
        argv = [
            "etcd", "--name", name, "--data-dir", str(self.workdir / f"data-{name}"),
            "--listen-client-urls", ",".join(client_urls), "--advertise-client-urls", client_urls[-1],
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", cluster, "--initial-cluster-token", f"netskin-{self.ns}",
            "--auto-compaction-mode", "revision", "--auto-compaction-retention", str(self.retention),
            "--experimental-watch-progress-notify-interval", "5s",
        ]
        if self.tls:
            assert self.pki is not None
            argv += ["--cert-file", str(self.pki.server_cert_file), "--key-file", str(self.pki.server_key_file),
                     "--client-cert-auth", "--trusted-ca-file", str(self.pki.ca_file)]
        if self.auth_token_ttl_s is not None:
            argv += ["--auth-token-ttl", str(self.auth_token_ttl_s)]
        return argv

    def start(self, timeout: float = 20.0) -> None:
        """Start every member (again, after ``stop``: same data) and wait until etcd answers."""
        if self.tls and self.pki is None:
            addresses = self.members or ["127.0.0.1", self.ADDRESS]
            self.pki = make_lab_pki(self.workdir / "pki", self.auth_hosts or (), server_addresses=addresses)
        self.procs = []
        for index in range(max(len(self.members), 1)):
            with open(self.workdir / f"etcd-{index + 1}.log", "ab") as log:
                self.procs.append(subprocess.Popen(["ip", "netns", "exec", self.ns, *self.member_argv(index)],
                                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=self.detach))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"etcd exited with {proc.returncode}:\n{self.log()}")
            if self.ctl("endpoint", "health", check=False).returncode == 0:
                if self.auth_hosts is not None and not self.secured:
                    trio_in_netns(self.ns, self._secure)
                    self.secured = True
                return
            time.sleep(0.1)
        raise TimeoutError(f"etcd did not become healthy within {timeout} s:\n{self.log()}")

    async def _secure(self) -> None:
        assert self.pki is not None and self.auth_hosts is not None
        async with store_for([self.local_endpoint], self.pki, None) as admin:
            await secure_etcd(admin, self.auth_hosts, self.pki.passwords())

    def store(self, user: str | None = None, endpoint: str | None = None) -> Store:
        """A client with ``user``'s certificate and password (``None``: root's certificate alone)."""
        endpoints = [endpoint] if endpoint else self.endpoints
        if not self.tls:
            return Store(endpoints)
        assert self.pki is not None
        return store_for(endpoints, self.pki, user)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        tls = []
        if self.pki is not None:  # as root: its certificate, and its password once auth is on
            root = self.pki.users["root"]
            tls = ["--cacert", str(self.pki.ca_file), "--cert", str(root.cert_file), "--key", str(root.key_file)]
            if self.secured:
                tls.append(f"--user=root:{root.password}")
        done = subprocess.run(["ip", "netns", "exec", self.ns, "etcdctl", "--endpoints", ",".join(self.endpoints),
                               *tls, *args], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "ETCDCTL_API": "3"})
        if check and done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {done.stderr.strip()}")
        return done

    def stop(self, sig: int = signal.SIGKILL) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(sig)
                proc.wait(10)

    def log(self) -> str:
        return "\n".join((path.read_text(errors="replace")[-3000:])
                         for path in sorted(self.workdir.glob("etcd-*.log")))

    def remove(self) -> None:
        self.stop()
        if self.own_netns:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
