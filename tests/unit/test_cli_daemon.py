"""The CLI's daemon commands against a fake daemon: global options, exit codes, timeouts, restore.

The fake is a real Unix socket server in a thread speaking the control protocol (one JSON line
each way), with an in-memory model of the daemon's assignments; each test scripts how it behaves
(refusals, slow swaps, identity problems). The real daemon is exercised in tests/e2e.
"""

from __future__ import annotations

import json
import socketserver
import threading
import time
from pathlib import Path

import pytest
import trio
from typer.testing import CliRunner

from interceptor import control
from manager.cli import app

runner = CliRunner()

IN_PROGRESS = "identity change still in progress"


def counters(packets: int = 0) -> dict:
    return {"packets": packets, "bytes": packets * 100, "passed_packets": packets, "dropped_packets": 0,
            "held_packets": 0, "held_bytes": 0, "drops": {"loss": 0, "queue": 0}}


class FakeDaemon:
    """The daemon's control protocol over a real socket, with scriptable misbehaviour."""

    def __init__(self, path: Path, vms=("vm1", "vm2"), skins=("a", "b", "c")) -> None:
        self.path = path
        self.skins = set(skins)
        self.vms = {vm: {"active": None, "shadow": None, "generation": 0, "enforced_generation": 0,
                         "verify_problems": [], "history": []} for vm in vms}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.packets = 0
        # Scripts, set by the tests:
        self.unenforceable: set[str] = set()  # apply refuses these at once (code 3)
        self.identity_fails: dict[str, list[str]] = {}  # apply: problems -> daemon puts the old one back
        self.swap_problems: list[str] = []  # rollback/revert: problems left after the swap
        self.not_enforced = False  # apply replies ok, but the data path keeps the old generation
        self.identity_seconds = 0.0  # how long identity takes after a swap (status: in progress)
        self.reply_delay = 0.0  # extra wait before the reply, after everything is done
        self.internal: set[str] = set()  # commands that fail with an internal error

        daemon = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    reply = daemon.handle(json.loads(line))
                    try:
                        self.wfile.write(json.dumps(reply).encode() + b"\n")
                        self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        return  # a client that stopped waiting, as the real daemon sees it

        self.server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeDaemon":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def commands(self) -> list[str]:
        return [request["cmd"] for request in self.requests if request["cmd"] != "status"]

    # -- the protocol ---------------------------------------------------------------------------

    def handle(self, request: dict) -> dict:
        with self.lock:
            self.requests.append(request)
        cmd, vm = request["cmd"], request.get("vm")
        if cmd in self.internal:
            return {"ok": False, "error": "internal error: KeyError('uplink')", "code": 2, "internal": True}
        if vm is not None and vm not in self.vms:
            return {"ok": False, "error": f"unknown VM '{vm}' (configured VMs: {', '.join(self.vms)}); add it "
                                          f"under [vms.{vm}] in the host config", "code": 1}
        if cmd == "status":
            self.packets += 50
            return {"ok": True, "vms": self.status(vm), "host": {"held_packets": 0}}
        handler = getattr(self, f"_{cmd}", None)
        if handler is None:
            return {"ok": False, "error": f"unknown command '{cmd}'", "code": 1}
        reply = handler(vm, request)
        time.sleep(self.reply_delay)
        return reply

    def status(self, vm: str | None = None) -> dict:
        with self.lock:
            names = [vm] if vm else list(self.vms)
            return {name: self._status(name) for name in names}

    def _status(self, name: str) -> dict:
        st = self.vms[name]
        return {key: value for key, value in st.items() if key != "history"} | {
            "shadow": st["shadow"], "uplink": counters(self.packets), "downlink": counters(self.packets // 2)}

    def _swap(self, vm: str, active: str | None, shadow: str | None, enforce: bool = True) -> None:
        with self.lock:
            st = self.vms[vm]
            st["history"].append((st["active"], st["shadow"]))
            st["active"], st["shadow"] = active, shadow
            st["generation"] += 1
            if enforce:
                st["enforced_generation"] = st["generation"]

    def _identity(self, vm: str, problems: list[str]) -> None:
        if self.identity_seconds:
            self.vms[vm]["verify_problems"] = [IN_PROGRESS]
            time.sleep(self.identity_seconds)
        self.vms[vm]["verify_problems"] = list(problems)

    def _refuse(self, vm: str, message: str, code: int) -> dict:
        return {"ok": False, "error": message, "code": code, "vms": self.status(vm)}

    def _apply(self, vm: str, request: dict) -> dict:
        skin = request["skin"]
        if skin not in self.skins:
            return {"ok": False, "error": f"unknown skin {skin!r}; `netskin skins list` shows the skins there are",
                    "code": 1}
        if skin in self.unenforceable:
            return self._refuse(vm, f"{skin} cannot be applied to {vm}, nothing changed: mac_address: the host "
                                    f"cannot set the MAC inside a guest", 3)
        old = self.vms[vm]
        self._swap(vm, skin, old["active"], enforce=not self.not_enforced)
        if skin in self.identity_fails:
            self._identity(vm, [])
            self._put_back(vm)
            return self._refuse(vm, f"identity of {skin!r} failed: {'; '.join(self.identity_fails[skin])}; "
                                    f"the previous assignment is back", 3)
        self._identity(vm, [])
        return {"ok": True, "vms": self.status(vm)}

    def _put_back(self, vm: str) -> None:
        st = self.vms[vm]
        active, shadow = st["history"][-1]
        self._swap(vm, active, shadow)

    def _restore(self, vm: str, request: dict) -> dict:
        if request["generation"] != self.vms[vm]["generation"]:
            return {"ok": False, "error": f"VM '{vm}' is at generation {self.vms[vm]['generation']}, not "
                                          f"{request['generation']}", "code": 1}
        self._put_back(vm)
        return {"ok": True, "vms": self.status(vm)}

    def _rollback(self, vm: str, request: dict) -> dict:
        st = self.vms[vm]
        if st["shadow"] is None:
            return {"ok": False, "error": f"VM '{vm}' has no shadow skin to roll back to; apply a skin first",
                    "code": 1}
        self._swap(vm, st["shadow"], st["active"])
        self._identity(vm, self.swap_problems)
        return {"ok": True, "vms": self.status(vm)}

    def _revert(self, vm: str, request: dict) -> dict:
        st = self.vms[vm]
        self._swap(vm, None, st["active"] or st["shadow"])
        self._identity(vm, self.swap_problems)
        return {"ok": True, "vms": self.status(vm)}


def write_host_config(directory: Path) -> Path:
    """A host configuration with two VMs; its control socket is ``directory/control.sock``."""
    config = directory / "netskin.toml"
    config.write_text('state_dir = "state"\nskins_dir = "skins.d"\ncontrol_socket = "control.sock"\n'
                      '[vms.vm1]\ninterface = "tap-vm1"\naddress = "10.77.1.2"\n'
                      '[vms.vm2]\ninterface = "tap-vm2"\naddress = "10.77.2.2"\n')
    return config


@pytest.fixture
def host(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("NETSKIN_CONFIG", raising=False)
    return write_host_config(tmp_path)


@pytest.fixture
def daemon(host):
    with FakeDaemon(host.with_name("control.sock")) as fake:
        yield fake


def netskin(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def lines(text: str) -> list[str]:
    return text.strip().splitlines()


# --- global options --------------------------------------------------------------------------


def test_config_and_json_before_the_subcommand_are_the_same_as_after(host, daemon):
    before = netskin("--config", host, "--json", "status")
    after = netskin("status", "--config", host, "--json")
    assert before.exit_code == after.exit_code == 0, before.stderr + after.stderr
    assert json.loads(before.stdout)["vms"].keys() == json.loads(after.stdout)["vms"].keys() == {"vm1", "vm2"}
    mixed = netskin("--json", "status", "vm1", "--config", host)
    assert mixed.exit_code == 0 and set(json.loads(mixed.stdout)["vms"]) == {"vm1"}


def test_global_options_reach_every_command(host, daemon):
    applied = netskin("--config", host, "--json", "apply", "vm1", "a")
    assert applied.exit_code == 0, applied.stderr
    assert json.loads(applied.stdout)["vm1"]["active"] == "a"
    listed = netskin("--config", host, "--json", "skins", "list")
    assert listed.exit_code == 0 and any(entry["name"] == "3g-average" for entry in json.loads(listed.stdout))


def test_the_subcommands_config_wins(host, daemon, tmp_path):
    missing = tmp_path / "missing.toml"
    assert netskin("--config", missing, "status", "--config", host).exit_code == 0
    refused = netskin("--config", host, "status", "--config", missing)
    assert refused.exit_code == 1 and lines(refused.stderr) == [
        f"{missing}: no such file (named by --config); give the host configuration's path"]


def test_netskin_config_still_works(host, daemon, monkeypatch):
    monkeypatch.setenv("NETSKIN_CONFIG", str(host))
    result = netskin("--json", "status")
    assert result.exit_code == 0 and set(json.loads(result.stdout)["vms"]) == {"vm1", "vm2"}


# --- exit codes --------------------------------------------------------------------------------


def test_no_daemon_is_exit_2_naming_the_real_unit(host):
    result = netskin("apply", "vm1", "a", "--config", host)
    assert result.exit_code == 2
    assert "not running" in result.stderr and "systemctl start netskin-interceptor.service" in result.stderr
    assert len(lines(result.stderr)) == 1


def test_apply_rollback_revert(host, daemon):
    assert lines(netskin("apply", "vm1", "a", "--config", host).stdout) == ["vm1: a active (generation 1)"]
    assert netskin("apply", "vm1", "b", "--config", host).exit_code == 0
    rolled = netskin("rollback", "vm1", "--config", host)
    assert rolled.exit_code == 0 and lines(rolled.stdout) == ["vm1: rolled back to a (generation 3)"]
    reverted = netskin("revert", "vm1", "--config", host, "--json")
    assert reverted.exit_code == 0 and json.loads(reverted.stdout)["vm1"]["active"] is None


def test_user_errors_are_exit_1(host, daemon):
    unknown = netskin("apply", "vm1", "nosuch", "--config", host)
    assert unknown.exit_code == 1 and "unknown skin 'nosuch'" in unknown.stderr
    no_vm = netskin("apply", "vm9", "a", "--config", host)
    assert no_vm.exit_code == 1 and "unknown VM 'vm9'" in no_vm.stderr and len(lines(no_vm.stderr)) == 1
    no_shadow = netskin("rollback", "vm2", "--config", host)
    assert no_shadow.exit_code == 1 and "no shadow" in no_shadow.stderr


def test_an_internal_daemon_error_is_exit_2_with_the_error(host, daemon):
    daemon.internal.add("apply")
    result = netskin("apply", "vm1", "a", "--config", host)
    assert result.exit_code == 2 and lines(result.stderr) == ["internal error: KeyError('uplink')"]


def test_a_refused_apply_is_exit_3_and_changes_nothing(host, daemon):
    netskin("apply", "vm1", "a", "--config", host)
    netskin("apply", "vm1", "b", "--config", host)
    daemon.unenforceable.add("c")
    result = netskin("apply", "vm1", "c", "--config", host, "--json")
    assert result.exit_code == 3
    assert lines(result.stderr) == ["c cannot be applied to vm1, nothing changed: mac_address: the host cannot "
                                    "set the MAC inside a guest; vm1 is on 'b', generation 2"]
    report = json.loads(result.stdout)
    assert report["exit_code"] == 3 and report["status"]["active"] == "b"
    assert daemon.commands() == ["apply", "apply", "apply"]  # no rollback to undo it
    # The shadow is still the one before: rollback goes back to a, not to the refused c.
    assert lines(netskin("rollback", "vm1", "--config", host).stdout) == ["vm1: rolled back to a (generation 3)"]


def test_identity_failing_in_the_daemon_is_exit_3_and_the_old_assignment_stays(host, daemon):
    netskin("apply", "vm1", "a", "--config", host)
    daemon.identity_fails["b"] = ["MTU reads back 1500, not 1400"]
    result = netskin("apply", "vm1", "b", "--config", host)
    assert result.exit_code == 3 and "MTU reads back 1500" in result.stderr and "vm1 is on 'a'" in result.stderr
    assert daemon.commands() == ["apply", "apply"]
    st = daemon.status("vm1")["vm1"]
    assert (st["active"], st["shadow"]) == ("a", None)


def test_an_apply_the_manager_cannot_verify_is_restored_not_rolled_back(host, daemon):
    netskin("apply", "vm1", "a", "--config", host)
    netskin("apply", "vm1", "b", "--config", host)
    daemon.not_enforced = True
    started = time.monotonic()
    result = netskin("apply", "vm1", "c", "--config", host, "--timeout", "3")
    assert result.exit_code == 3
    assert time.monotonic() - started < 3 + 2  # the verification window ends with the bound
    [message] = lines(result.stderr)
    assert "applied 'c' to vm1 (generation 3) but could not verify it" in message
    assert "daemon enforces generation 2, expected 3" in message
    assert message.endswith("restored vm1 to 'b', generation 4")
    assert daemon.commands() == ["apply", "apply", "apply", "restore"]
    assert [r["generation"] for r in daemon.requests if r["cmd"] == "restore"] == [3]
    st = daemon.status("vm1")["vm1"]
    assert (st["active"], st["shadow"]) == ("b", "a")  # exactly as before the failed apply


def test_rollback_and_revert_with_problems_left_are_exit_3_naming_them(host, daemon):
    netskin("apply", "vm1", "a", "--config", host)
    netskin("apply", "vm1", "b", "--config", host)
    daemon.swap_problems = ["MAC reads back 02:77:00:00:01:02, not 02:00:5e:10:00:01"]
    rolled = netskin("rollback", "vm1", "--config", host, "--json")
    assert rolled.exit_code == 3
    assert lines(rolled.stderr) == ["vm1: rolled back to 'a', generation 3, but not wholly in force: "
                                    "MAC reads back 02:77:00:00:01:02, not 02:00:5e:10:00:01"]
    report = json.loads(rolled.stdout)
    assert report["problems"] == daemon.swap_problems == report["status"]["verify_problems"]
    reverted = netskin("revert", "vm1", "--config", host)
    assert reverted.exit_code == 3 and "reverted to no skin" in reverted.stderr and "MAC reads back" in reverted.stderr


# --- slow swaps and --timeout ----------------------------------------------------------------


def test_the_cli_waits_for_a_swap_longer_than_the_socket_default(host, daemon):
    daemon.identity_seconds = 11.0  # past control.request's default of 10 s
    result = netskin("apply", "vm1", "a", "--config", host)
    assert result.exit_code == 0, result.stderr
    assert lines(result.stdout) == ["vm1: a active (generation 1)"]


def test_past_the_bound_a_swap_that_happened_is_reported_as_done(host, daemon):
    daemon.reply_delay = 2.0  # everything done, only the answer is late
    result = netskin("apply", "vm1", "a", "--config", host, "--timeout", "0.5")
    assert result.exit_code == 0, result.stderr
    assert lines(result.stdout) == ["vm1: a active (generation 1)"]


def test_past_the_bound_a_swap_still_syncing_identity_is_in_progress(host, daemon):
    daemon.identity_seconds = 2.0
    result = netskin("apply", "vm1", "a", "--config", host, "--timeout", "0.5", "--json")
    assert result.exit_code == 4
    [message] = lines(result.stderr)
    assert message.startswith("vm1: applying 'a' is still in progress after 0.5 s: swapped to 'a', generation 1")
    assert IN_PROGRESS in message and "netskin status vm1" in message
    assert json.loads(result.stdout)["status"]["verify_problems"] == [IN_PROGRESS]


def test_past_the_bound_an_apply_the_daemon_put_back_is_exit_3(host, daemon):
    netskin("apply", "vm1", "a", "--config", host)
    daemon.identity_fails["b"] = ["MTU reads back 1500, not 1400"]
    daemon.reply_delay = 2.0
    result = netskin("apply", "vm1", "b", "--config", host, "--timeout", "0.5")
    assert result.exit_code == 3
    assert lines(result.stderr) == ["vm1: applying 'b' did not take effect: after 0.5 s vm1 is on 'a', generation 3"]


def test_past_the_bound_a_rollback_that_happened_is_done(host, daemon):
    netskin("apply", "vm1", "a", "--config", host)
    netskin("apply", "vm1", "b", "--config", host)
    daemon.reply_delay = 2.0
    result = netskin("rollback", "vm1", "--config", host, "--timeout", "0.5")
    assert result.exit_code == 0, result.stderr
    assert lines(result.stdout) == ["vm1: rolled back to a (generation 3)"]


def test_control_request_tells_a_late_reply_from_no_daemon(tmp_path, daemon):
    daemon.reply_delay = 1.0
    with pytest.raises(control.ReplyTimeout, match="did not answer 'revert' within 0.2 s"):
        control.request(daemon.path, "revert", timeout=0.2, vm="vm1")
    with pytest.raises(control.DaemonUnreachable) as no_daemon:
        control.request(tmp_path / "nothing.sock", "status")
    assert not isinstance(no_daemon.value, control.ReplyTimeout)
    daemon.internal.add("status")
    with pytest.raises(control.ControlError) as internal:
        control.request(daemon.path, "status")
    assert internal.value.internal and internal.value.code == 2
    assert internal.value.reply == {"ok": False, "error": "internal error: KeyError('uplink')", "code": 2,
                                    "internal": True}


def test_the_server_half_replies_internal_errors_and_refusals_with_their_state(tmp_path):
    path = tmp_path / "control.sock"

    async def handle(request: dict) -> dict:
        if request["cmd"] == "boom":
            raise KeyError("uplink")
        if request["cmd"] == "refuse":
            raise control.ControlError("b cannot be applied to vm1, nothing changed", 3, {"vm1": {"active": "a"}})
        return {"vms": {"vm1": {"active": "a"}}}

    def ask() -> list:
        replies = [control.request(path, "status")]
        for cmd in ("boom", "refuse"):
            try:
                control.request(path, cmd)
            except control.ControlError as exc:
                replies.append(exc.reply)
        return replies

    async def main() -> list:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, path, handle)
            replies = await trio.to_thread.run_sync(ask)
            nursery.cancel_scope.cancel()
        return replies

    ok, boom, refused = trio.run(main)
    assert ok == {"vms": {"vm1": {"active": "a"}}}
    assert boom == {"ok": False, "error": "internal error: KeyError('uplink')", "code": 2, "internal": True}
    assert refused == {"ok": False, "error": "b cannot be applied to vm1, nothing changed", "code": 3,
                       "vms": {"vm1": {"active": "a"}}}
    assert not path.exists()  # the server removes its socket


# --- top --json --------------------------------------------------------------------------------


def test_top_json_prints_one_object_per_refresh(host, daemon):
    result = netskin("top", "--config", host, "--json", "--interval", "0.1", "--iterations", "3")
    assert result.exit_code == 0, result.stderr
    refreshes = [json.loads(line) for line in lines(result.stdout)]
    assert len(refreshes) == 3
    for refresh in refreshes:
        uplink = refresh["vms"]["vm1"]["uplink"]
        assert uplink["packets_per_s"] > 0 and uplink["kbit_per_s"] > 0 and uplink["drops_per_s"] == 0
        assert refresh["interval_s"] >= 0.1 and set(refresh["vms"]) == {"vm1", "vm2"}
    assert netskin("--json", "top", "--config", host, "--interval", "0.1", "--iterations", "1").stdout.count("\n") == 1


# --- lab and demo: --config --------------------------------------------------------------------


def test_lab_up_never_writes_over_a_file_it_did_not_write(host):
    before = host.read_text()
    result = netskin("--config", host, "lab", "up", "--prefix", "nsknever")
    assert result.exit_code == 1
    assert lines(result.stderr) == [f"--config {host} exists and was not written by `netskin lab up`; "
                                    f"choose another path or remove it first"]
    assert host.read_text() == before
    missing_dir = netskin("lab", "up", "--prefix", "nsknever", "--config", host.parent / "no" / "lab.toml")
    assert missing_dir.exit_code == 1 and "no such directory" in missing_dir.stderr


def test_demo_looks_the_skin_up_before_building_anything(host):
    result = netskin("--config", host, "demo", "--skin", "nosuch-skin")
    assert result.exit_code == 1
    assert lines(result.stderr) == ["unknown skin 'nosuch-skin'; `netskin skins list` shows the skins there are"]
