"""netskin as a wheel: built from the checkout, installed into a fresh virtualenv and run from
outside the checkout (PYTHONPATH unset), it finds its presets and firewall profiles and enforces
them.

The wheel and the virtualenv are built once per module; dependencies come from the package index
(netfilterqueue compiles with gcc and libnetfilter-queue-dev, which scripts/bootstrap.sh installs).
The firewall is checked black-box, by whether new TCP connections from the internet get through.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from manager.process import DaemonProcess
from tests.e2e.netns_helpers import ready_script
from tests.e2e.test_firewall_dns_e2e import LISTENER

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PRESETS = REPO / "rules" / "presets"
# Whatever .gitignore keeps out of the repository stays out of the wheel's source tree too.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".vagrant"
)
# Variables that would let the installed tools see the checkout or another configuration.
LEAKY_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "NETSKIN_CONFIG", "NETSKIN_PRESETS_DIR", "NETSKIN_RULES_DIR")

CONNECT = r"""
import json, socket, sys
results = {}
for port in map(int, sys.argv[2:]):
    s = socket.socket()
    s.settimeout(1.5)
    try:
        s.connect((sys.argv[1], port))
        results[port] = "open"
    except ConnectionRefusedError:
        results[port] = "refused"
    except (socket.timeout, TimeoutError):
        results[port] = "timeout"
    except OSError as exc:
        results[port] = f"error {exc.errno}"
    s.close()
print(json.dumps(results))
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in LEAKY_ENV}
    env.update(extra)
    return env


def run(argv: list, *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(arg) for arg in argv], cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )


def must(done: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@dataclass(frozen=True)
class WheelInstall:
    wheel: Path
    venv: Path
    outside: Path  # a working directory outside the checkout

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def run(self, tool: str, *args, **extra_env: str) -> subprocess.CompletedProcess:
        return run([self.bin / tool, *args], cwd=self.outside, env=clean_env(**extra_env), timeout=120)


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> WheelInstall:
    base = tmp_path_factory.mktemp("wheel")
    assert REPO not in base.parents, f"{base} must be outside the checkout"
    source = base / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE, symlinks=True)
    dist = base / "dist"
    must(run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, source], cwd=base), "pip wheel")
    (wheel,) = dist.glob("netskin-*.whl")
    venv = base / "venv"
    must(run([sys.executable, "-m", "venv", venv], cwd=base), "python -m venv")
    must(run([venv / "bin" / "pip", "install", "-q", wheel], cwd=base, timeout=900), "pip install of the wheel")
    outside = base / "elsewhere"
    outside.mkdir()
    return WheelInstall(wheel=wheel, venv=venv, outside=outside)


def empty_host_config(where: Path) -> Path:
    """A host configuration with no VMs and an empty drop-in directory: the library is the presets."""
    (where / "skins.d").mkdir(exist_ok=True)
    config = where / "netskin.toml"
    config.write_text('skins_dir = "skins.d"\nstate_dir = "state"\ncontrol_socket = "control.sock"\n')
    return config


def listed_presets(install: WheelInstall, config: Path, **extra_env: str) -> dict[str, dict]:
    done = must(install.run("netskin", "skins", "list", "--json", "--config", config, **extra_env), "netskin skins list")
    return {entry["name"]: entry for entry in json.loads(done.stdout) if entry["origin"] == "preset"}


def test_the_wheel_lists_every_preset_of_the_checkout(wheel_install, tmp_path):
    presets = listed_presets(wheel_install, empty_host_config(tmp_path))
    assert sorted(presets) == sorted(path.stem for path in PRESETS.glob("*.toml"))
    site_packages = next(wheel_install.venv.glob("lib/python3*/site-packages"))
    for name, entry in presets.items():
        assert entry["valid"], (name, entry["errors"])
        assert Path(entry["path"]).is_relative_to(site_packages), entry["path"]


def test_the_wheel_honours_the_presets_override(wheel_install, tmp_path):
    own = tmp_path / "presets"
    own.mkdir()
    shutil.copy(PRESETS / "dsl.toml", own / "only-this.toml")
    presets = listed_presets(wheel_install, empty_host_config(tmp_path), NETSKIN_PRESETS_DIR=str(own))
    assert list(presets) == ["only-this"]


def test_the_checkout_on_pythonpath_uses_its_own_rules(wheel_install):
    # Run from the checkout with "." on sys.path (pytest's pythonpath): rules/ of the checkout wins
    # over the wheel's copy, so an edited preset or profile takes effect without a rebuild.
    probe = "from interceptor import library, profiles; print(library.presets_dir()); print(profiles.shipped_rules_dir())"
    done = must(run([wheel_install.bin / "python", "-c", probe], cwd=REPO, env=clean_env(PYTHONPATH=".")), "probe")
    assert done.stdout.split() == [str(PRESETS), str(REPO / "rules")]


class WheelDaemon(DaemonProcess):
    """The installed wheel's netskin-interceptor, not this interpreter's ``-m interceptor``."""

    def __init__(self, config_path: Path, bin_dir: Path) -> None:
        super().__init__(config_path)
        self.bin_dir = bin_dir

    def command(self, config_path: Path) -> list[str]:
        return [str(self.bin_dir / "netskin-interceptor"), "--config", str(config_path)]


def restricted_preset() -> str:
    """The shipped preset that wears the "restricted" firewall profile (only SSH in)."""
    names = sorted(
        path.stem for path in PRESETS.glob("*.toml")
        if tomllib.loads(path.read_text()).get("security_profile") == "restricted"
    )
    assert names, "no preset in rules/presets has security_profile = \"restricted\""
    return names[0]


def connect_from_inet(lab, *ports: int) -> dict[int, str]:
    out = lab.exec("inet", [sys.executable, "-c", CONNECT, lab.vm("vm1").address, *ports], check=True)
    return {int(port): outcome for port, outcome in json.loads(out.stdout).items()}


def test_the_wheels_daemon_enforces_a_shipped_profile(wheel_install, lab, monkeypatch):
    preset = restricted_preset()
    # The daemon inherits the working directory and environment: outside the checkout, no PYTHONPATH.
    monkeypatch.chdir(wheel_install.outside)
    for name in LEAKY_ENV:
        monkeypatch.delenv(name, raising=False)
    with ready_script(lab, "vm1", LISTENER, 22, 80), WheelDaemon(lab.config_path, wheel_install.bin):
        assert connect_from_inet(lab, 22, 80) == {22: "open", 80: "open"}
        applied = wheel_install.run("netskin", "apply", "vm1", preset, "--config", lab.config_path)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        after = connect_from_inet(lab, 22, 80)
        assert after[22] == "open", after
        assert after[80] in ("refused", "timeout"), after


def test_the_wheels_fleet_lab_runs_without_the_checkout(wheel_install, request):
    """`lab up --hosts` from the wheel: etcd, daemons and agents all run the installed package."""
    from manager.etcd_lab import etcd_skip_reason
    from manager.lab import lab_down
    from tests.conftest import lab_skip_reason, unique_lab_prefix

    reason = lab_skip_reason() or etcd_skip_reason()
    if reason:
        pytest.skip(reason)
    prefix = unique_lab_prefix()
    request.addfinalizer(lambda: lab_down(prefix))
    lab = json.loads(must(wheel_install.run("netskin", "lab", "up", "--hosts", "2", "--vms", "1", "--prefix", prefix,
                                            "--json"), "netskin lab up --hosts 2").stdout)
    assert sorted(lab["hosts"]) == ["hv1", "hv2"]
    status = must(run(["ip", "netns", "exec", lab["etcd"]["namespace"], wheel_install.bin / "netskin", "status",
                       "--json", "--config", lab["manager_config"]], cwd=wheel_install.outside), "fleet status")
    assert [h["state"] for h in json.loads(status.stdout)["hosts"]] == ["alive", "alive"]
    state = json.loads((Path("/run/netskin-lab") / prefix / "lab.json").read_text())
    python = [p["argv"][0] for p in state["processes"] if p["name"].startswith(("daemon-", "agent-"))]
    assert python and all(Path(exe).parent == wheel_install.bin for exe in python), python
    must(wheel_install.run("netskin", "lab", "down", "--prefix", prefix), "netskin lab down")
    assert not (Path("/run/netskin-lab") / prefix).exists()
