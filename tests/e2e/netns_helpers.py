"""Helpers for e2e tests: run a function inside a namespace, run a script that reports ready."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def in_netns(ns: str, fn, *args, **kwargs):
    """Run fn(*args, **kwargs) in a forked child inside network namespace ns; return or raise its result."""
    from pyroute2 import netns

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(read_fd)
            try:
                netns.setns(ns, flags=0)
                outcome = ("ok", fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the parent as is
                outcome = ("error", exc)
            try:
                data = pickle.dumps(outcome)
            except Exception as exc:  # noqa: BLE001
                data = pickle.dumps(("error", RuntimeError(f"unpicklable outcome {outcome!r}: {exc}")))
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(data)
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "error":
        raise value
    return value


@contextmanager
def ready_script(lab, ns: str, script: str, *args) -> Iterator[subprocess.Popen]:
    """Run a Python ``script`` in a lab namespace until the block ends; it prints "ready" first."""
    proc = lab.popen(ns, [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


class AgentProcess:
    """`netskin agent` run in network namespace ``ns``, its output in ``log_path``."""

    def __init__(self, name: str, ns: str, config, log_path, lease_ttl_s: int) -> None:
        self.name, self.ns, self.config, self.log_path, self.lease_ttl_s = name, ns, config, log_path, lease_ttl_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, "-m", "manager.cli", "agent",
                 "--config", str(self.config), "--lease-ttl", str(self.lease_ttl_s), "--conditions-every", "1"],
                stdout=log, stderr=subprocess.STDOUT)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except FileNotFoundError:
            return ""
