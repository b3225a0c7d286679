"""A helper process for the daemon's blocking work: identity reconciliation and library scans.

Threads would share the data path's GIL, and pyroute2 forks to reach a VM's network namespace:
a fork copies the page tables of the whole daemon and stalls its data path for milliseconds. So
that work runs here, in a small child process started once (``python -m interceptor.worker``),
that reads one pickled call from stdin and writes one pickled reply to stdout at a time. Only
the functions in ``CALLS`` can be called. The daemon's side (``Worker``) waits for a reply in a
trio worker thread, which holds no GIL while it waits.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import trio


def _scan_library(skins_dir: str, presets: str | None) -> list:
    from interceptor.library import SkinLibrary

    return SkinLibrary(Path(skins_dir), Path(presets) if presets else None).entries()


def _reconcile(job):
    from interceptor import reconcile

    return reconcile.reconcile(job)


CALLS = {"scan_library": _scan_library, "reconcile": _reconcile}


class WorkerError(RuntimeError):
    """The helper process died or answered nonsense."""


class Worker:
    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        # The child inherits the daemon's network namespace (host_netns is entered before).
        return subprocess.Popen([sys.executable, "-m", "interceptor.worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)

    def call(self, name: str, *args):
        """Blocking: run ``CALLS[name](*args)`` in the helper; its exception is raised here."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            data = pickle.dumps((name, args))
            try:
                self._proc.stdin.write(len(data).to_bytes(4, "big") + data)
                self._proc.stdin.flush()
                header = self._proc.stdout.read(4)
                if len(header) < 4:
                    raise WorkerError(f"the helper process exited ({self._proc.wait()}) during {name}")
                kind, value = pickle.loads(self._proc.stdout.read(int.from_bytes(header, "big")))
            except (OSError, pickle.PickleError, EOFError) as exc:
                self._proc.kill()
                raise WorkerError(f"the helper process failed during {name}: {exc}") from exc
        if kind == "error":
            raise value
        return value

    async def run(self, name: str, *args):
        return await trio.to_thread.run_sync(self.call, name, *args)

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()


def serve() -> None:
    try:  # started from the data path's thread: not its priority (raising niceness needs no privilege)
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = requests.read(4)
        if len(header) < 4:
            return  # the daemon closed the pipe: stop
        name, args = pickle.loads(requests.read(int.from_bytes(header, "big")))
        try:
            reply = ("ok", CALLS[name](*args))
        except Exception as exc:  # noqa: BLE001 - handed back to the caller as is
            reply = ("error", exc)
        try:
            data = pickle.dumps(reply)
        except Exception as exc:  # noqa: BLE001
            data = pickle.dumps(("error", WorkerError(f"{name} returned something unpicklable: {exc!r}")))
        replies.write(len(data).to_bytes(4, "big") + data)
        replies.flush()


if __name__ == "__main__":
    serve()
