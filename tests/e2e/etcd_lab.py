"""etcd for the fleet tests: its own process, data dir and network namespace, removed afterwards.

The namespace gets loopback and, when asked, a veth to one other namespace (a lab's hypervisor),
so an agent there reaches etcd over a link that can be cut. Test code talks to etcd from a thread
that has entered the namespace (``in_netns``): setns(2) moves only the calling thread.
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
    """One etcd member in namespace ``ns`` (created here), with auto-compaction on.

    ``peer_ns``: a namespace to join with a veth (etcd at 10.99.0.1, the peer at 10.99.0.2).
    ``tls``: clients must speak TLS and show a certificate from the lab CA (``self.pki``).
    ``auth_hosts``: with TLS, etcd's auth on, with the users and roles of
    ``manager.fleet_security`` for these hosts (their passwords in ``self.pki``);
    ``auth_token_ttl_s``: how long etcd's tokens last (its default: 300 s).
    """

    ADDRESS = "10.99.0.1"
    PEER_ADDRESS = "10.99.0.2"

    def __init__(self, ns: str, peer_ns: str | None = None, *, compaction_retention: int = 1000,
                 tls: bool = False, auth_hosts: Iterable[str] | None = None,
                 auth_token_ttl_s: int | None = None) -> None:
        if auth_hosts is not None and not tls:
            raise ValueError("etcd auth in the lab comes with TLS: pass tls=True")
        self.ns = ns
        self.peer_ns = peer_ns
        self.retention = compaction_retention
        self.workdir = Path(tempfile.mkdtemp(prefix=f"netskin-{ns}-"))
        self.tls = tls
        self.auth_hosts = None if auth_hosts is None else list(auth_hosts)
        self.auth_token_ttl_s = auth_token_ttl_s
        self.scheme = "https" if tls else "http"
        self.pki: LabPki | None = None
        self.secured = False  # auth is on
        self.proc: subprocess.Popen | None = None
        self._veth = f"{ns[:10]}e"

    @property
    def endpoint(self) -> str:
        """The client URL for the peer namespace (or loopback inside ``ns``)."""
        host = self.ADDRESS if self.peer_ns else "127.0.0.1"
        return f"{self.scheme}://{host}:{CLIENT_PORT}"

    @property
    def local_endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{CLIENT_PORT}"

    def __enter__(self) -> "Etcd":
        try:
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

    def start(self, timeout: float = 20.0) -> None:
        urls = [self.local_endpoint] + ([f"{self.scheme}://{self.ADDRESS}:{CLIENT_PORT}"] if self.peer_ns else [])
        argv = [
            "ip", "netns", "exec", self.ns, "etcd",
            "--name", "nsk", "--data-dir", str(self.workdir / "data"),
            "--listen-client-urls", ",".join(urls), "--advertise-client-urls", urls[-1],
            "--listen-peer-urls", f"http://127.0.0.1:{PEER_PORT}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{PEER_PORT}",
            "--initial-cluster", f"nsk=http://127.0.0.1:{PEER_PORT}",
            "--auto-compaction-mode", "revision", "--auto-compaction-retention", str(self.retention),
            "--experimental-watch-progress-notify-interval", "5s",
        ]
        if self.tls:
            if self.pki is None:
                self.pki = make_lab_pki(self.workdir / "pki", self.auth_hosts or (),
                                        server_addresses=["127.0.0.1", self.ADDRESS])
            argv += ["--cert-file", str(self.pki.server_cert_file), "--key-file", str(self.pki.server_key_file),
                     "--client-cert-auth", "--trusted-ca-file", str(self.pki.ca_file)]
        if self.auth_token_ttl_s is not None:
            argv += ["--auth-token-ttl", str(self.auth_token_ttl_s)]
        log = open(self.workdir / "etcd.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log()}")
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
        endpoint = endpoint or self.local_endpoint
        if not self.tls:
            return Store([endpoint])
        assert self.pki is not None
        return store_for([endpoint], self.pki, user)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        tls = []
        if self.pki is not None:  # as root: its certificate, and its password once auth is on
            root = self.pki.users["root"]
            tls = ["--cacert", str(self.pki.ca_file), "--cert", str(root.cert_file), "--key", str(root.key_file)]
            if self.secured:
                tls.append(f"--user=root:{root.password}")
        done = subprocess.run(["ip", "netns", "exec", self.ns, "etcdctl", "--endpoints", self.local_endpoint,
                               *tls, *args], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "ETCDCTL_API": "3"})
        if check and done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {done.stderr.strip()}")
        return done

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def log(self) -> str:
        try:
            return (self.workdir / "etcd.log").read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""

    def remove(self) -> None:
        self.stop()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
