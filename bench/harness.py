"""The benchmark's I/O: the processes it starts in the lab and the counters it reads.

Everything here runs traffic only inside the lab's namespaces: the queue-serving process (the
bare loop or the daemon) in the hv namespace, senders and receivers in a VM or the inet
namespace. Every process started here is recorded and stopped by ``Harness.close``.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from interceptor import control
from manager.lab import Lab

REPO_ROOT = Path(__file__).resolve().parents[1]
REFLECT_PORT = 9100  # the benchmark's own UDP reflector in inet (the lab's echo is a trio server)
COUNT_PORT = 9101
ONE_OFF_IPERF3_PORT = 5301  # a per-test iperf3 server with JSON output (the lab's run on 5201/5202)
BACKLOG_SAMPLE_S = 0.05
IPERF3_GRACE_S = 10.0  # how long past its -t an iperf3 client may take before it counts as hung
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
VM = "vm1"


class BenchError(RuntimeError):
    """A measurement could not be made; the message says which and why."""


@dataclass(frozen=True)
class QueueCounters:
    """One NFQUEUE queue's line of /proc/net/netfilter/nfnetlink_queue."""

    queued: int  # id_sequence: packets handed to user space so far
    dropped: int  # queue full
    user_dropped: int  # netlink socket full
    backlog: int  # queue_total: handed over (or waiting to be) and not verdicted yet


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (all cores, all processes, softirqs included):
    the monotonic clock times the online cores, less their idle and iowait time.

    Not the sum of /proc/stat's busy fields: those are tick samples, and under a packet flood on
    this kind of VM they were seen to read below the daemon's own CPU time (which the kernel
    scales to the precise run time), while the idle time is kept exactly with NO_HZ."""
    lines = Path("/proc/stat").read_text().splitlines()
    now = time.monotonic()
    cores = sum(1 for line in lines if re.match(r"cpu\d+ ", line))
    fields = [int(v) for v in lines[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return now * cores - idle / CLOCK_TICKS_PER_S


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children.extend(int(c) for c in (task / "children").read_text().split())
        except FileNotFoundError:
            pass
    return children


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of the process, every thread, its live descendants (the daemon's helper worker)
    and the descendants it has reaped (cutime + cstime), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    total = sum(int(v) for v in fields[11:15]) / CLOCK_TICKS_PER_S
    pending = _children(pid)
    while pending:
        child = pending.pop()
        try:
            total += cpu_seconds(child)
            pending.extend(_children(child))
        except (FileNotFoundError, ProcessLookupError):
            pass  # ended between the listing and the read
    return total


def wakeups(pid: int) -> int:
    """Voluntary context switches of every thread of the process and its live descendants: how
    often they went to sleep waiting (for a packet, a timer), so about how often they woke."""
    total, pending = 0, [pid]
    while pending:
        proc = pending.pop()
        try:
            for task in Path(f"/proc/{proc}/task").iterdir():
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
            pending.extend(_children(proc))
        except (FileNotFoundError, ProcessLookupError):
            pass  # ended between the listing and the read
    return total


class Harness:
    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        self._procs: list[subprocess.Popen] = []
        self.vm = lab.vm(VM)
        self.daemon_config = self._closed_config()
        self.reflector: subprocess.Popen | None = None
        self.hv_pid: int | None = None  # the queue-serving process in the hv namespace, if any

    def _closed_config(self) -> Path:
        """The lab's host config with fail_mode = closed: an overloaded queue then drops (and the
        drop is seen) instead of letting packets bypass the engine unmeasured."""
        text = self.lab.config_path.read_text()
        if 'fail_mode = "open"' not in text:
            raise BenchError(f"{self.lab.config_path}: no 'fail_mode = \"open\"' line to switch to closed")
        path = self.workdir / "bench.toml"
        path.write_text(text.replace('fail_mode = "open"', 'fail_mode = "closed"'))
        return path

    # -- processes ----------------------------------------------------------------------------

    def popen(self, where: str, argv: list, **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = self.lab.popen(where, argv, cwd=REPO_ROOT, env=self.env, text=True, **kw)
        self._procs.append(proc)
        return proc

    def python(self, where: str, module: str, *args) -> subprocess.Popen:
        return self.popen(where, [sys.executable, "-m", module, *map(str, args)])

    @staticmethod
    def wait_ready(proc: subprocess.Popen, what: str, timeout_s: float = 10.0) -> None:
        """Wait for the process's "ready" line."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            readable, _, _ = select.select([proc.stdout], [], [], 0.05)
            if readable:
                line = proc.stdout.readline()
                if line.strip() == "ready":
                    return
                if not line and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
        err = proc.stderr.read() if proc.poll() is not None else ""
        raise BenchError(f"{what} did not get ready within {timeout_s:.0f} s (exit {proc.poll()}): {err.strip()[-800:]}")

    def finish(self, proc: subprocess.Popen, what: str, timeout_s: float) -> dict:
        """The JSON object a tool printed when it ended."""
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise BenchError(f"{what} did not finish within {timeout_s:.0f} s") from None
        if proc.returncode != 0:
            raise BenchError(f"{what} failed with {proc.returncode}: {err.strip()[-800:]}")
        return json.loads(out)

    def stop(self, proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
        if proc.pid == self.hv_pid:
            self.hv_pid = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        for proc in list(self._procs):
            self.stop(proc)

    # -- the queue-serving processes ----------------------------------------------------------

    def start_bare_loop(self, gso: bool = False) -> subprocess.Popen:
        proc = self.python("hv", "bench.bare_loop", "--interface", self.vm.interface, "--queue-base", 7700,
                           *(["--gso"] if gso else []))
        self.wait_ready(proc, "the bare netfilterqueue loop")
        self.hv_pid = proc.pid
        return proc

    def start_daemon(self, timeout_s: float = 15.0) -> subprocess.Popen:
        log = open(self.workdir / "interceptor.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "interceptor", "--config", str(self.daemon_config)],
                                cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        self._procs.append(proc)
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise BenchError(f"the daemon exited with {proc.returncode}: {self.daemon_log()}")
            try:
                self.request("status")
                self.hv_pid = proc.pid
                return proc
            except control.DaemonUnreachable:
                if time.monotonic() > deadline:
                    raise BenchError(f"the daemon did not answer within {timeout_s:.0f} s: "
                                     f"{self.daemon_log()}") from None
                time.sleep(0.05)

    def stop_daemon(self, proc: subprocess.Popen) -> None:
        self.stop(proc, timeout_s=10.0)
        # Belt and braces: the daemon removes its rules on SIGTERM; if it was killed, do it here
        # (inside the lab's hv namespace: the config's host_netns).
        subprocess.run([sys.executable, "-m", "interceptor", "--config", str(self.daemon_config), "--cleanup"],
                       cwd=REPO_ROOT, env=self.env, capture_output=True, timeout=30)

    def daemon_log(self) -> str:
        try:
            return (self.workdir / "interceptor.log").read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""

    def request(self, cmd: str, **args) -> dict:
        return control.request(Path(self.workdir / "control.sock"), cmd, **args)

    def revert(self) -> None:
        """Back to no skin at all."""
        self.request("revert", vm=VM)

    def add_skins(self, skins: list[dict]) -> None:
        """Drop skins into the lab's skins_dir. Done before the daemon starts: a changed skins_dir
        makes the daemon rescan its library, a pause that would land in a measurement."""
        for skin in skins:
            path = self.workdir / "skins.d" / f"{skin['name']}.json"
            text = json.dumps(skin)
            if not path.exists() or path.read_text() != text:
                path.write_text(text)

    def apply(self, skin: dict) -> None:
        """Apply the skin to the VM (dropping it into skins_dir first if it is not there)."""
        self.add_skins([skin])
        self.request("apply", vm=VM, skin=skin["name"])

    def queue_counters(self) -> dict[int, QueueCounters]:
        """The hv namespace's NFQUEUE queues, read through the queue process's own /proc view
        (no process to fork, so sampling it often costs nothing measurable)."""
        if not self.hv_pid:
            return {}
        try:
            text = Path(f"/proc/{self.hv_pid}/net/netfilter/nfnetlink_queue").read_text()
        except FileNotFoundError:
            return {}
        counters = {}
        for line in text.splitlines():
            fields = line.split()
            if len(fields) >= 8:
                counters[int(fields[0])] = QueueCounters(int(fields[7]), int(fields[5]), int(fields[6]), int(fields[2]))
        return counters

    # -- traffic ------------------------------------------------------------------------------

    def iperf3(self, argv: list, seconds: float, port: int | None = None, attempts: int = 3) -> dict:
        """One iperf3 client run from the VM to the inet server (retried on a busy server)."""
        ports = [port] if port else list(self.lab.iperf3_ports)
        last = ""
        for attempt in range(attempts):
            p = ports[attempt % len(ports)]
            full = ["iperf3", "--json", "-c", self.lab.inet_address, "-p", p, "--connect-timeout", 3000, *argv]
            proc = self.popen(VM, full)
            try:
                stdout, stderr = proc.communicate(timeout=seconds + IPERF3_GRACE_S)
            except subprocess.TimeoutExpired:
                # iperf3 3.12 never resends the datagram that opens a UDP test: under a lossy
                # skin that hangs a run now and then. Stop it and try again (on the other port).
                self.stop(proc)
                last = f"no result after {seconds + IPERF3_GRACE_S:.0f} s"
                continue
            self.stop(proc)
            try:
                report = json.loads(stdout)
            except json.JSONDecodeError:
                last = stderr.strip() or stdout[-300:]
                if attempt + 1 < attempts:
                    time.sleep(0.5)
                continue
            if "error" in report:
                last = report["error"]
                if attempt + 1 < attempts:
                    time.sleep(0.5)
                continue
            return report
        raise BenchError(f"iperf3 {' '.join(map(str, argv))}: {last}")

    def queue_backlog(self) -> int:
        """Packets queued to user space and not yet verdicted, over all queues (held ones too)."""
        return sum(c.backlog for c in self.queue_counters().values())

    def udp_flood(self, pps: float, seconds: float, payload_bytes: int = 64) -> dict:
        """64-byte UDP at pps from the VM to inet: what was sent, what arrived, what was late.

        A queue process slightly slower than the offered rate loses nothing in a short run: the
        excess waits in the kernel queue (up to 16384 packets) and drains before iperf3's end
        message, which queues behind it. So the queue's backlog is sampled while iperf3 sends;
        the median over the second half of the run counts as lost, since at that rate those
        packets would be (a process that keeps up shows a few pacing bursts' worth, tens).
        """
        samples: list[tuple[float, int]] = []
        done = threading.Event()

        def sample() -> None:
            start = time.monotonic()
            while not done.wait(BACKLOG_SAMPLE_S):
                samples.append((time.monotonic() - start, self.queue_backlog()))

        sampler = threading.Thread(target=sample, daemon=True) if self.hv_pid else None
        if sampler:
            sampler.start()
        try:
            report = self.iperf3(["-u", "-l", payload_bytes, "-b", int(pps * payload_bytes * 8), "-t", seconds,
                                  "-w", "4M"], seconds)
        finally:
            done.set()
            if sampler:
                sampler.join()
        late_samples = [b for t, b in samples if seconds / 2 <= t <= 0.95 * seconds]
        backlog = sorted(late_samples)[len(late_samples) // 2] if late_samples else 0
        sent, received = report["end"]["sum_sent"], report["end"]["sum_received"]
        arrived = received["packets"] - received["lost_packets"]
        cpu = report["end"].get("cpu_utilization_percent", {})
        return {
            # The sender's own CPU in the kernel (% of the run): a packet's PREROUTING, including
            # netskin's steering rules, runs in the softirq of the sender's send call.
            "sender_system_percent": cpu.get("host_system"),
            "offered_pps": pps,
            "sent": sent["packets"],
            "received": arrived,
            "backlog": backlog,
            "backlog_max": max((b for _, b in samples), default=0),
            "seconds": sent["seconds"],
            "sent_pps": sent["packets"] / sent["seconds"],
            "received_pps": arrived / sent["seconds"],
            "loss": (sent["packets"] - arrived + backlog) / sent["packets"] if sent["packets"] else 1.0,
        }

    def tcp_goodput(self, seconds: float, skip_s: float, reverse: bool = False) -> dict:
        """TCP goodput in bit/s as the receiving end saw it, over ``seconds`` after ``skip_s``.

        iperf3's end-of-test sum for the receiver divides by the sender's duration and counts
        bytes that were still queued behind a rate limit when the sender stopped, which reads
        high; and an iperf3 server's -O omits on its own clock, which leaves part of slow start
        in. So the run is ``skip_s + seconds`` long with no -O, and the receiver's own
        per-interval byte counts are summed here: the uplink test runs against a one-off iperf3
        server of ours that reports in JSON, the downlink (-R) test reads the client's intervals.
        """
        argv = ["-t", skip_s + seconds]
        if reverse:
            return _goodput(self.iperf3(argv + ["-R"], skip_s + seconds)["intervals"], skip_s)
        server = self.popen("inet", ["iperf3", "-s", "-1", "-J", "-p", ONE_OFF_IPERF3_PORT])
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    client = self.iperf3(argv, skip_s + seconds, port=ONE_OFF_IPERF3_PORT, attempts=1)
                    break
                except BenchError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.1)  # the server is not listening yet
            report = self.finish(server, "the one-off iperf3 server", 15)
        finally:
            self.stop(server)
        return {**_goodput(report["intervals"], skip_s),
                "retransmits": client["end"].get("sum_sent", {}).get("retransmits")}

    def start_reflector(self) -> None:
        self.reflector = self.python("inet", "bench.udp_tool", "reflect", f"{self.lab.inet_address}:{REFLECT_PORT}")
        self.wait_ready(self.reflector, "the UDP reflector")

    def start_timer_probe(self, seconds: float) -> subprocess.Popen:
        proc = self.python("hv", "bench.timer_probe", "--seconds", seconds)
        self.wait_ready(proc, "the timer probe")
        return proc

    def stop_timer_probe(self, proc: subprocess.Popen) -> dict:
        """End the probe now (it reports what it saw so far) or collect it if it ended."""
        proc.send_signal(signal.SIGTERM)
        return self.finish(proc, "the timer probe", 10)

    def rtt(self, rate_pps: float, seconds: float, warmup_s: float = 0.3, grace_s: float = 0.5) -> list[float]:
        """Per-probe RTTs in µs from the VM to the reflector (lost probes left out). The first
        warmup_s of probes are sent but not counted (process start-up, cold caches)."""
        proc = self.python(VM, "bench.udp_tool", "rtt", f"{self.lab.inet_address}:{REFLECT_PORT}",
                           "--rate", rate_pps, "--seconds", seconds + warmup_s, "--grace", grace_s)
        result = self.finish(proc, "the RTT prober", seconds + warmup_s + grace_s + 20)
        return [v for v in result["rtt_us"][int(warmup_s * rate_pps):] if v is not None]

    def one_way(self, direction: str, count: int, rate_pps: float, payload_bytes: int,
                warmup_s: float = 0.0, idle_s: float = 1.0) -> dict:
        """Send count datagrams one way (uplink: VM → inet; downlink: inet → VM) to a counter."""
        if direction == "uplink":
            sender_ns, receiver_ns, address = VM, "inet", self.lab.inet_address
        else:
            sender_ns, receiver_ns, address = "inet", VM, self.vm.address
        expected_s = count / rate_pps
        receiver = self.python(receiver_ns, "bench.udp_tool", "count", f"{address}:{COUNT_PORT}",
                               "--idle", idle_s, "--timeout", expected_s + 30, "--warmup", warmup_s)
        self.wait_ready(receiver, "the UDP counter")
        sender = self.python(sender_ns, "bench.udp_tool", "send", f"{address}:{COUNT_PORT}",
                             "--count", count, "--rate", rate_pps, "--size", payload_bytes)
        sent = self.finish(sender, "the UDP sender", expected_s + 30)
        got = self.finish(receiver, "the UDP counter", idle_s + 35)
        return {**got, "sent": sent["sent"], "send_errors": sent["send_errors"], "send_seconds": sent["seconds"],
                "send_kernel_s": sent["kernel_s"]}


def _goodput(intervals: list[dict], skip_s: float) -> dict:
    """Bytes over seconds of the receiver's intervals after the first skip_s (slow start and the
    recovery from the drops that end it), leaving out the last one (it may be partial, or hold
    the drain of the queue after the sender ends)."""
    counted, elapsed = [], 0.0
    for interval in intervals[:-1]:
        summary = interval["sum"]
        if elapsed >= skip_s - 0.01:
            counted.append(summary)
        elapsed += summary["seconds"]
    if not counted:
        raise BenchError("iperf3 reported no interval to measure goodput over")
    seconds = sum(i["seconds"] for i in counted)
    received = sum(i["bytes"] for i in counted)
    return {"bits_per_second": 8 * received / seconds, "seconds": seconds, "bytes": received,
            # the whole run, slow start and the last interval included: what the queue carried
            "run_bytes": sum(i["sum"]["bytes"] for i in intervals),
            "interval_bits_per_second": [8 * i["bytes"] / i["seconds"] for i in counted if i["seconds"] > 0]}
