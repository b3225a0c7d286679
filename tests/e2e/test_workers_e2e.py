"""Engine workers against the real kernel: with ``workers = 2`` each VM is owned by one worker
(each a child process with queues of its own; worker 0 the daemon's own process with
``isolate_data_path = false``), one ``status`` sees both, and a worker killed with SIGKILL is
started again with its VM's skin in force before that VM's next packet."""

from __future__ import annotations

import json
import os
import signal

import pytest

from manager import measure
from manager.lab import QUEUE_BASE
from manager.process import DaemonProcess
from tests.e2e.test_manager_e2e import netskin, wait_until, write_skin

pytestmark = pytest.mark.e2e

DELAY_MS = 40


def with_workers(lab, workers: int, fail_mode: str = "open", isolate: bool = True) -> None:
    text = lab.config_path.read_text().replace('fail_mode = "open"', f'fail_mode = "{fail_mode}"')
    lab.config_path.write_text(f"workers = {workers}\nisolate_data_path = {str(isolate).lower()}\n" + text)


def status(lab) -> dict:
    return json.loads(netskin(lab.config_path, "status", "--json").stdout)


def rtts(lab, vm: str, count: int = 10) -> list[float]:
    result = measure.ping(lab, vm, lab.inet_address, count=count, interval=0.05)
    assert result["received"] == count, result
    return result["rtts_ms"]


@pytest.mark.parametrize("isolate", [True, False])
def test_two_workers_each_own_a_vm_and_one_status_sees_both(lab, isolate):
    with_workers(lab, 2, isolate=isolate)
    write_skin(lab, "slow", latency_ms=DELAY_MS)
    with DaemonProcess(lab.config_path) as daemon:
        assert netskin(lab.config_path, "apply", "vm2", "slow").returncode == 0
        assert min(rtts(lab, "vm2")) >= DELAY_MS  # vm2's packets meet its skin in worker 1
        assert max(rtts(lab, "vm1")) < DELAY_MS  # and vm1's are not delayed by it in worker 0

        st = status(lab)
        vms, workers = st["vms"], st["host"]["workers"]
        assert (vms["vm1"]["worker"], vms["vm2"]["worker"]) == (0, 1)
        # Each worker has its own queues: worker k's are queue_base + 4k …
        assert vms["vm1"]["queues"]["uplink"] in (QUEUE_BASE, QUEUE_BASE + 2)
        assert vms["vm2"]["queues"]["uplink"] in (QUEUE_BASE + 4, QUEUE_BASE + 6)
        assert [w["vms"] for w in workers] == [1, 1]
        assert [w["worker"] for w in workers] == [0, 1]
        assert (workers[0]["pid"] == daemon.proc.pid) is not isolate  # isolated: a child process too
        assert workers[1]["pid"] not in (daemon.proc.pid, workers[0]["pid"])
        # Worker 1's counters reach the daemon's status: every ping request (and no more
        # than were sent, give or take the few of the next test call) is counted.
        assert vms["vm2"]["uplink"]["packets"] >= 10
        assert vms["vm2"]["enforced_generation"] == vms["vm2"]["generation"]


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_a_killed_worker_is_started_again_with_its_vms_skin(lab, fail_mode):
    with_workers(lab, 2, fail_mode)
    write_skin(lab, "slow", latency_ms=DELAY_MS)
    with DaemonProcess(lab.config_path) as daemon:
        assert netskin(lab.config_path, "apply", "vm2", "slow").returncode == 0
        before = status(lab)["host"]["workers"][1]
        os.kill(before["pid"], signal.SIGKILL)
        after = wait_until(lambda: next((w for w in [status(lab)["host"]["workers"][1]]
                                         if w["restarts"] == 1 and w["pid"] != before["pid"]), None), 20)
        assert after, "worker 1 was not started again"
        print(f"worker 1: pid {before['pid']} killed, pid {after['pid']} serving")
        assert after["last_exit"] == "signal SIGKILL"
        # Every packet after the restart meets the skin: none is faster than the delay.
        samples = rtts(lab, "vm2", count=20)
        assert min(samples) >= DELAY_MS, samples
        st = status(lab)
        assert st["vms"]["vm2"]["enforced_generation"] == st["vms"]["vm2"]["generation"]
        assert st["vms"]["vm2"]["worker"] == 1
        assert daemon.proc.poll() is None  # the daemon itself never stopped
        assert max(rtts(lab, "vm1")) < DELAY_MS
        assert "engine worker 1" in daemon.log() and "ended (signal SIGKILL); starting it again" in daemon.log()


def test_a_stopped_daemon_leaves_no_worker_process(lab):
    with_workers(lab, 2)
    with DaemonProcess(lab.config_path):
        pid = status(lab)["host"]["workers"][1]["pid"]
        assert os.path.exists(f"/proc/{pid}")
    assert wait_until(lambda: _zombie(pid), 10), "the worker process outlived its daemon"


def test_a_killed_daemons_workers_follow_it(lab):
    """A daemon killed with SIGKILL: its worker sees the end of its socket and exits too, so
    fail_mode (here open) decides for every VM, as with one worker."""
    with_workers(lab, 2)
    daemon = DaemonProcess(lab.config_path).start()
    pid = status(lab)["host"]["workers"][1]["pid"]
    daemon.stop(signal.SIGKILL)
    assert wait_until(lambda: _zombie(pid), 10), "the worker process outlived its daemon"
    assert measure.ping(lab, "vm2", lab.inet_address, count=5, interval=0.05)["loss_percent"] == 0.0


def _zombie(pid: int) -> bool:
    """The process is gone, or only its exit status is left."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True
