"""The daemon as a child process: started, waited for on its control socket, stopped (demo, tests)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from interceptor import control
from interceptor.schema import load_host_config


class DaemonProcess:
    def __init__(self, config_path: Path, log_path: Path | None = None, *, detach: bool = False) -> None:
        self.config_path = Path(config_path)
        self.config = load_host_config(self.config_path)
        self.socket = Path(self.config.control_socket)
        self.log_path = log_path or self.config_path.with_name("interceptor.log")
        self.detach = detach  # a session of its own: it outlives the caller's terminal (the fleet lab)
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def command(config_path: Path) -> list[str]:
        return [sys.executable, "-m", "interceptor", "--config", str(config_path)]

    def start(self, timeout: float = 15.0) -> "DaemonProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(self.config_path),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=self.detach,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.request("status")
                return self
            except control.DaemonUnreachable:
                time.sleep(0.05)
        raise TimeoutError(f"daemon did not answer within {timeout}s:\n{self.log()}")

    def request(self, cmd: str, **args) -> dict:
        return control.request(self.socket, cmd, **args)

    def status(self, vm: str | None = None) -> dict:
        return self.request("status", vm=vm)["vms"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "DaemonProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

