"""The benchmark's baseline: the barest NFQUEUE accept loop netfilterqueue allows.

Binds the queue pair the daemon would bind (``queue_base`` uplink, ``+1`` downlink, shared by
all VMs), with the daemon's queue length and socket buffer, installs netskin's own rules for the
VMs given, and accepts every packet in the callback, served by the blocking ``run()`` (the
fastest form). The uplink queue, which carries the benchmark's traffic, is served on the main
thread; the downlink queue (a few control packets) on a thread that blocks the stop signals, so
SIGTERM always lands on the main thread, interrupts its ``recv`` and removes the rules.
``--gso`` binds the queues with the kernel's GSO flag (super-packets whole, as the daemon's GSO
pair takes them).

Run inside the namespace the daemon would run in:

    ip netns exec nskb-hv python -m bench.bare_loop --interface tap-vm1 --queue-base 7700
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from netfilterqueue import COPY_PACKET, NetfilterQueue

from interceptor import rules
from interceptor.nfqueue import GSO_COPY_BYTES, SEGMENT_COPY_BYTES, set_queue_flags

# The same binding parameters as interceptor.nfqueue.Queue uses.
MAX_LEN = 16384
SOCK_LEN = 8 << 20


def accept(packet) -> None:
    packet.accept()


def _serve_quietly(queue: NetfilterQueue) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    queue.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_loop", description=__doc__.splitlines()[0])
    parser.add_argument("--interface", action="append", required=True, help="a VM's host-side device (repeatable)")
    parser.add_argument("--queue-base", type=int, default=7700)
    parser.add_argument("--fail-open", action="store_true", help="as fail_mode = open (default: closed)")
    parser.add_argument("--gso", action="store_true", help="take GSO super-packets whole (default: segments)")
    parser.add_argument("--workers", type=int, default=1,
                        help="as the daemon's workers: VM i (in --interface order) goes to loop i mod N")
    parser.add_argument("--worker", type=int, default=0,
                        help="this loop's number: it binds queue_base + 4k and + 4k + 1; loop 0 installs "
                             "and removes the rules for every VM, the others only serve")
    args = parser.parse_args(argv)

    queues: list[NetfilterQueue] = []
    uplink, downlink = args.queue_base + 4 * args.worker, args.queue_base + 4 * args.worker + 1
    for number in (uplink, downlink):
        queue = NetfilterQueue()
        queue.bind(number, accept, max_len=MAX_LEN, mode=COPY_PACKET,
                   range=GSO_COPY_BYTES if args.gso else SEGMENT_COPY_BYTES, sock_len=SOCK_LEN)
        flags = (1 if args.fail_open else 0) | (4 if args.gso else 0)  # NFQA_CFG_F_FAIL_OPEN, _GSO
        if flags:
            set_queue_flags(queue.get_fd(), number, flags)
        queues.append(queue)
    steering = [rules.VmRules(f"vm{index + 1}", interface, args.queue_base + 4 * (index % args.workers),
                              args.queue_base + 4 * (index % args.workers) + 1)
                for index, interface in enumerate(args.interface)]
    owner = args.worker == 0

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if owner:
            rules.install(steering, fail_open=args.fail_open)
        for queue in queues[1:]:
            threading.Thread(target=_serve_quietly, args=(queue,), daemon=True).start()
        print("ready", flush=True)
        queues[0].run()
    except KeyboardInterrupt:
        pass
    finally:
        if owner:
            rules.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
