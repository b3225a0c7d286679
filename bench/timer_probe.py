"""How late a plain 1 kHz timerfd loop wakes on this machine: the platform's share of delay error.

Runs as its own process beside the RTT runs (``python -m bench.timer_probe --seconds 30``) and
prints one JSON object: lateness percentiles in ms and the count of wake-ups over 1 ms late. The
daemon releases held packets from the same kind of timer (``interceptor.timer.TimerFd``), so
stalls of the machine itself (vCPU descheduled, a noisy neighbour) show up here too.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time

from bench.stats import percentile
from interceptor.timer import TimerFd


def probe(seconds: float, period_ns: int) -> dict:
    timer = TimerFd()
    poller = select.epoll()
    poller.register(timer.fd, select.EPOLLIN)
    late_ms: list[float] = []
    stopping = False

    def stop(*_) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    start = time.monotonic_ns() + period_ns
    end = start + int(seconds * 1e9)
    deadline = start
    while deadline < end and not stopping:
        timer.arm(deadline)
        poller.poll(1.0)
        now = time.monotonic_ns()
        try:
            os.read(timer.fd, 8)
        except BlockingIOError:
            pass
        late_ms.append((now - deadline) / 1e6)
        deadline += period_ns
        if deadline < now:  # do not count one stall once per missed period
            deadline = now + period_ns
    os.close(timer.fd)  # not timer.close(): that tells trio, and no trio loop runs here
    if not late_ms:
        return {"wakeups": 0}
    return {
        "wakeups": len(late_ms),
        "p50_ms": percentile(late_ms, 50),
        "p99_ms": percentile(late_ms, 99),
        "p999_ms": percentile(late_ms, 99.9),
        "max_ms": max(late_ms),
        "over_1ms": sum(1 for v in late_ms if v > 1.0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.timer_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--period-us", type=int, default=1000)
    args = parser.parse_args(argv)
    print("ready", flush=True)
    json.dump(probe(args.seconds, args.period_us * 1000), sys.stdout)
    print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
