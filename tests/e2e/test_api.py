"""`netskin serve` over a real loopback socket, against the lab and a real daemon.

Every endpoint and error status is exercised with httpx; /metrics is read back with
prometheus_client's parser; schemathesis fuzzes the served OpenAPI document against a lab of its
own, so whatever it creates, applies or deletes cannot disturb the other tests.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from manager import measure
from manager.process import DaemonProcess

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "manager.cli", "serve", "--config", str(config), *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NETSKIN_API_TOKEN"}
    return env | extra


class ApiServer:
    """`netskin serve` as a child process on a free loopback port."""

    def __init__(self, config: Path, *args: str, token: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = serve_command(config, "--port", str(self.port), *args)
        self.log_path = Path(config).with_name(f"api-{self.port}.log")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "ApiServer":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env=clean_env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"netskin serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                httpx.get(f"{self.url}/openapi.json", headers=self.headers, timeout=1.0, trust_env=False)
                return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError(f"netskin serve did not answer within {timeout}s:\n{self.log()}")

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=30.0, trust_env=False, **kw)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def api_config(lab) -> Path:
    """The lab's host configuration with vm2 as a VM whose namespace the host does not know.

    Such a VM is a real guest to netskin: its traffic is shaped on the host's interface as usual,
    but its MAC cannot be set, so a skin asking for one cannot be enforced (the 422 case).
    """
    text = lab.config_path.read_text()
    vm2_netns = f'netns = "{lab.vm("vm2").netns}"\n'
    assert vm2_netns in text
    path = lab.config_path.with_name("api.toml")
    path.write_text(text.replace(vm2_netns, ""))
    return path


class Stack:
    def __init__(self, lab, config: Path, daemon: DaemonProcess, server: ApiServer) -> None:
        self.lab, self.config, self.daemon, self.server = lab, config, daemon, server
        self.http = server.client()


@pytest.fixture(scope="module")
def stack(lab_module):
    config = api_config(lab_module)
    daemon = DaemonProcess(config).start()
    try:
        with ApiServer(config, "--verify-timeout", "2") as server:
            yield Stack(lab_module, config, daemon, server)
    finally:
        daemon.stop()


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) >= {"error"} and isinstance(body["error"], str) and "\n" not in body["error"]
    return body["error"]


# --- skins -------------------------------------------------------------------------------------


def test_skins_create_show_update_list_delete(stack):
    http = stack.http
    created = http.post("/skins", json={"name": "api-slow", "latency_ms": 40, "description": "made by the API"})
    assert created.status_code == 201, created.text
    assert created.json()["origin"] == "drop-in" and created.json()["skin"]["latency_ms"] == 40
    assert Path(created.json()["path"]).exists()
    # The seed skin format: the name comes from skin_name.
    assert http.post("/skins", json={"skin_name": "api-seed", "latency_ms": 10}).status_code == 201

    shown = http.get("/skins/api-slow").json()
    assert shown["effective"]["uplink"]["delay_ms"] == 20 and shown["effective"]["downlink"]["delay_ms"] == 20

    updated = http.put("/skins/api-slow", json={"latency_ms": 60})  # the URL names it
    assert updated.status_code == 200, updated.text
    assert http.get("/skins/api-slow").json()["skin"]["latency_ms"] == 60

    names = {entry["name"]: entry for entry in http.get("/skins").json()}
    assert names["api-slow"]["origin"] == "drop-in" and names["3g-average"]["origin"] == "preset"

    deleted = http.delete("/skins/api-seed")
    assert deleted.status_code == 200 and deleted.json()["deleted"] == "api-seed"
    assert not Path(names["api-seed"]["path"]).exists()
    http.delete("/skins/api-slow")


def test_skin_errors_carry_the_cli_message(stack):
    http = stack.http
    http.post("/skins", json={"name": "api-dup", "latency_ms": 5})
    try:
        message = error_of(http.post("/skins", json={"name": "api-dup"}), 409)
        assert "already exists" in message and "netskin skins update api-dup" in message
        message = error_of(http.post("/skins", json={"name": "bad", "packet_loss_percent": 150}), 400)
        assert message == "packet_loss_percent: 150 is out of range (allowed 0–100)"
        assert "unknown field" in error_of(http.post("/skins", json={"name": "bad", "latncy_ms": 1}), 400)
        assert "name" in error_of(http.post("/skins", json={"latency_ms": 1}), 400)
        assert "not valid JSON" in error_of(http.post("/skins", content=b"{nope"), 400)
        assert "JSON object" in error_of(http.post("/skins", json=[1, 2]), 400)
        assert "names skin 'other'" in error_of(http.put("/skins/api-dup", json={"name": "other"}), 400)
        assert "unknown skin 'nosuch'" in error_of(http.get("/skins/nosuch"), 404)
        assert "unknown skin" in error_of(http.put("/skins/nosuch", json={"latency_ms": 1}), 404)
        assert "unknown skin" in error_of(http.delete("/skins/nosuch"), 404)
        assert "is a preset" in error_of(http.delete("/skins/3g-average"), 409)
        assert "no endpoint" in error_of(http.get("/nowhere"), 404)
        assert "not allowed" in error_of(http.patch("/skins/api-dup"), 405)
    finally:
        http.delete("/skins/api-dup")


# --- personas ----------------------------------------------------------------------------------


def test_personas(stack):
    http = stack.http
    persona = {"id": "api-persona", "qos_priority": 7, "simulated_latency_ms": 30,
               "packet_loss_probability": 0.0, "bandwidth_limit_kbps": 2000}
    created = http.post("/personas/create", json=persona)
    assert created.status_code == 201, created.text
    assert {k: created.json()[k] for k in persona} == persona
    try:
        assert "already exists" in error_of(http.post("/personas/create", json=persona), 409)
        bad = persona | {"id": "api-bad", "packet_loss_probability": 2}
        assert "packet_loss_probability: 2 is out of range" in error_of(http.post("/personas/create", json=bad), 400)

        updated = http.put("/personas/update/api-persona", json=persona | {"simulated_latency_ms": 80})
        assert updated.status_code == 200 and updated.json()["simulated_latency_ms"] == 80
        assert http.get("/personas/get/api-persona").json()["simulated_latency_ms"] == 80
        # A persona is a skin: the skins endpoints see the same object.
        assert http.get("/skins/api-persona").json()["skin"]["latency_ms"] == 80
        assert "unknown skin" in error_of(http.get("/personas/get/nosuch"), 404)
        assert "unknown skin" in error_of(http.put("/personas/update/nosuch", json={"qos_priority": 1}), 404)

        applied = http.post("/vms/vm1/persona/api-persona")
        assert applied.status_code == 200, applied.text
        assert applied.json()["active"] == "api-persona"
        active = http.get("/vms/vm1/persona").json()
        assert active["id"] == "api-persona" and active["simulated_latency_ms"] == 80
        assert "unknown skin" in error_of(http.post("/vms/vm1/persona/nosuch"), 404)
        assert "unknown VM" in error_of(http.get("/vms/nosuchvm/persona"), 404)
    finally:
        http.post("/vms/vm1/revert")
        http.delete("/skins/api-persona")
    # The first seed's persona exactly as written: no name; the API makes its id.
    seed = {"qos_priority": 7, "security_profile": "standard", "simulated_latency_ms": 80,
            "packet_loss_probability": 0.01, "bandwidth_limit_kbps": 2000}
    made = http.post("/personas/create", json=seed)
    assert made.status_code == 201, made.text
    try:
        assert re.fullmatch(r"persona-[0-9a-f]{6}", made.json()["id"])
        assert http.get(f"/personas/get/{made.json()['id']}").json()["simulated_latency_ms"] == 80
    finally:
        http.delete(f"/skins/{made.json()['id']}")
    assert "wears no skin" in error_of(http.get("/vms/vm1/persona"), 404)


# --- VMs ---------------------------------------------------------------------------------------


def test_apply_rollback_revert_and_their_errors(stack):
    http, lab = stack.http, stack.lab
    # vm2 has never worn a skin: nothing to roll back to.
    assert "no shadow" in error_of(http.post("/vms/vm2/rollback"), 409)
    http.post("/skins", json={"name": "api-a", "latency_ms": 100})
    http.post("/skins", json={"name": "api-b", "latency_ms": 10})
    try:
        base = measure.ping(lab, "vm1", lab.inet_address, count=4, interval=0.05)["rtt_median_ms"]
        a = http.post("/vms/vm1/skins/api-a")
        assert a.status_code == 200, a.text
        assert (a.json()["active"], a.json()["enforced_generation"]) == ("api-a", a.json()["generation"])
        assert measure.ping(lab, "vm1", lab.inet_address, count=4, interval=0.05)["rtt_min_ms"] >= base + 95

        b = http.post("/vms/vm1/skins/api-b").json()
        assert (b["active"], b["shadow"], b["generation"]) == ("api-b", "api-a", a.json()["generation"] + 1)
        message = error_of(http.delete("/skins/api-b"), 409)
        assert "active on VM 'vm1'" in message and "netskin revert vm1" in message

        rolled = http.post("/vms/vm1/rollback").json()
        assert (rolled["active"], rolled["shadow"]) == ("api-a", "api-b")
        status = http.get("/vms/vm1").json()
        assert status["active"] == "api-a" and "packets" in status["uplink"]
        assert set(http.get("/vms").json()["vms"]) == {"vm1", "vm2"}

        reverted = http.post("/vms/vm1/revert").json()
        assert (reverted["active"], reverted["shadow"]) == (None, "api-a")

        assert "nosuchvm" in error_of(http.get("/vms/nosuchvm"), 404)
        assert "nosuchvm" in error_of(http.post("/vms/nosuchvm/skins/api-a"), 404)
        assert "nosuchvm" in error_of(http.post("/vms/nosuchvm/rollback"), 404)
        assert "nosuchvm" in error_of(http.post("/vms/nosuchvm/revert"), 404)
        assert "unknown skin 'nosuch'" in error_of(http.post("/vms/vm1/skins/nosuch"), 404)
    finally:
        http.post("/vms/vm1/revert")
        http.delete("/skins/api-a")
        http.delete("/skins/api-b")


def test_a_skin_that_cannot_be_enforced_is_422_and_changes_nothing(stack):
    """vm2's namespace is not in the API's host config (see api_config), so the host cannot set its
    MAC: the daemon refuses a skin with mac_address and the VM keeps its skin and shadow (CLI exit 3)."""
    http = stack.http
    http.post("/skins", json={"name": "api-fine", "latency_ms": 10})
    http.post("/skins", json={"name": "api-mac", "latency_ms": 10, "mac_address": "02:77:00:00:aa:02"})
    try:
        fine = http.post("/vms/vm2/skins/api-fine").json()
        response = http.post("/vms/vm2/skins/api-mac")
        message = error_of(response, 422)
        print(message)
        assert "mac" in message
        assert response.json()["vm"]["active"] == "api-fine"
        now = http.get("/vms/vm2").json()
        assert (now["active"], now["shadow"]) == (fine["active"], fine["shadow"])
    finally:
        http.post("/vms/vm2/revert")
        http.delete("/skins/api-fine")
        http.delete("/skins/api-mac")


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(f"{name}{labels} not in the scrape")


def test_metrics_parse_and_count_traffic(stack):
    http, lab = stack.http, stack.lab
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    before = response.text
    families = {family.name: family.type for family in text_string_to_metric_families(before)}
    assert families["netskin_packets"] == "counter" and families["netskin_held_packets"] == "gauge"
    assert metric(before, "netskin_daemon_up") == 1
    assert metric(before, "netskin_skin_generation", vm="vm1") >= 0
    measure.ping(lab, "vm1", lab.inet_address, count=5, interval=0.05)
    after = http.get("/metrics").text
    for name in ("netskin_packets_total", "netskin_passed_packets_total", "netskin_bytes_total"):
        for direction in ("uplink", "downlink"):
            assert metric(after, name, vm="vm1", direction=direction) >= \
                metric(before, name, vm="vm1", direction=direction) + 5


def test_openapi_document_lists_every_endpoint(stack):
    document = stack.http.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {
        "/skins", "/skins/{name}", "/vms", "/vms/{vm_id}", "/vms/{vm_id}/skins/{name}",
        "/vms/{vm_id}/rollback", "/vms/{vm_id}/revert", "/vms/{vm_id}/persona",
        "/vms/{vm_id}/persona/{persona_id}", "/personas/create", "/personas/update/{id}",
        "/personas/get/{id}", "/metrics", "/openapi.json",
    }


def test_daemon_down_is_503_and_metrics_say_so(stack):
    http = stack.http
    stack.daemon.stop()
    try:
        assert "not running" in error_of(http.get("/vms"), 503)
        assert "not running" in error_of(http.get("/vms/vm1"), 503)
        assert "not running" in error_of(http.post("/vms/vm1/skins/3g-average"), 503)
        assert "not running" in error_of(http.post("/vms/vm1/rollback"), 503)
        assert "not running" in error_of(http.post("/vms/vm1/revert"), 503)
        scrape = http.get("/metrics")
        assert scrape.status_code == 200 and metric(scrape.text, "netskin_daemon_up") == 0
        assert http.get("/skins").status_code == 200  # the library needs no daemon
    finally:
        stack.daemon.start()


# --- listening and tokens ------------------------------------------------------------------------


@pytest.fixture
def bare_config(tmp_path) -> Path:
    """A host configuration with no daemon behind it: enough for the library and for auth."""
    config = tmp_path / "netskin.toml"
    config.write_text('state_dir = "state"\nskins_dir = "skins.d"\ncontrol_socket = "control.sock"\n')
    return config


def test_a_token_is_required_on_every_request_when_configured(bare_config, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-for-the-test\n")
    with ApiServer(bare_config, "--token-file", str(token_file), token="s3cret-token-for-the-test") as server:
        anonymous = httpx.Client(base_url=server.url, timeout=10.0, trust_env=False)
        for path in ("/skins", "/metrics", "/openapi.json", "/vms"):
            assert "bearer token" in error_of(anonymous.get(path), 401)
        assert anonymous.get("/skins").headers["www-authenticate"].startswith("Bearer")
        wrong = anonymous.get("/skins", headers={"Authorization": "Bearer s3cret-token-for-the-tesT"})
        assert wrong.status_code == 401
        assert anonymous.get("/skins", headers={"Authorization": "Basic s3cret-token-for-the-test"}).status_code == 401
        assert server.client().get("/skins").status_code == 200
        document = server.client().get("/openapi.json").json()
        assert document["security"] == [{"bearer": []}]


def test_off_loopback_without_a_token_it_refuses_to_start(bare_config):
    # Checked before anything listens: nothing is exposed even for a moment.
    refused = subprocess.run(serve_command(bare_config, "--host", "0.0.0.0", "--port", str(free_port())),
                             capture_output=True, text=True, timeout=30, cwd=ROOT, env=clean_env())
    assert refused.returncode == 1
    assert "refusing to listen on 0.0.0.0 without a token" in refused.stderr
    assert "--token-file" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_a_port_in_use_is_one_clear_line(bare_config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(serve_command(bare_config, "--port", str(port)), capture_output=True, text=True,
                             timeout=30, cwd=ROOT, env=clean_env())
    assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out.stderr


# --- schemathesis ------------------------------------------------------------------------------


# Half of the path parameters come from these lists, so the fuzz reaches the lab's real VMs and
# skins (apply, rollback, revert, delete) instead of stopping at 404s.
SCHEMATHESIS_TOML = """
[dictionaries.vms]
values = ["vm1", "vm2"]

[dictionaries.skins]
values = ["fuzz-a", "fuzz-b", "3g-average", "comcast-3g", "edge-lossy"]

[parameters]
"path.vm_id" = { dictionary = "vms", probability = 0.5 }
"path.name" = { dictionary = "skins", probability = 0.5 }
"path.id" = { dictionary = "skins", probability = 0.5 }
"path.persona_id" = { dictionary = "skins", probability = 0.5 }
"""


def test_schemathesis_finds_no_server_error(lab, tmp_path):
    """Fuzz the served document against a lab of its own (its skins_dir, state and daemon)."""
    (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_TOML)
    with DaemonProcess(lab.config_path), ApiServer(lab.config_path, "--verify-timeout", "0.3") as server:
        client = server.client()
        for name, latency in (("fuzz-a", 20), ("fuzz-b", 40)):
            assert client.post("/skins", json={"name": name, "latency_ms": latency}).status_code == 201
        report = tmp_path / "schemathesis.json"
        started = time.monotonic()
        # One worker: hypothesis' lambda introspection is not thread-safe on Python 3.11.
        run = subprocess.run(
            [str(Path(sys.executable).with_name("st")), "run", f"{server.url}/openapi.json",
             "--checks", "not_a_server_error", "--max-examples", "20", "--seed", "1",
             "--phases", "examples,coverage,fuzzing", "--workers", "1", "--request-timeout", "10",
             "--report", "json", "--report-json-path", str(report)],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )
        elapsed = time.monotonic() - started
        statuses = server.log_path.read_text(errors="replace")
    print(run.stdout[-2500:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:] + statuses
    # What the fuzz reached, from the access log: (method, first path segment, status) counts.
    seen = collections.Counter(
        (m["method"], m["path"].split("/")[1], int(m["status"]))
        for m in re.finditer(r'"(?P<method>[A-Z]+) (?P<path>/\S*) [\d.]+" (?P<status>\d{3}) ', statuses))
    print(sorted(seen.items()))
    assert not [key for key in seen if key[2] >= 500]
    assert seen[("POST", "vms", 200)] > 0  # some applies, rollbacks or reverts got through
    assert "0 generated" not in run.stdout
    print(f"schemathesis took {elapsed:.1f}s")  # a figure, not a check: CI machines are noisy
