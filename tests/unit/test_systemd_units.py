"""The systemd units: `systemd-analyze verify` finds nothing to say about them, they agree with
the host configuration's defaults and with the install layout, and their sandbox stays tight.

`systemd-analyze verify` checks that every Exec*= binary exists. The units name
/usr/local/bin/netskin{,-interceptor}, the links vagrant/provision.sh makes into the virtualenv;
the verified copies name this environment's own entry points instead, the files those links
point to. Everything else in the copies is byte for byte the shipped unit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from interceptor.schema import DEFAULT_CONFIG_PATH, HostConfig

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
UNIT_SUFFIXES = (".service", ".path", ".socket", ".timer", ".target")
UNITS = sorted(p for p in SYSTEMD.iterdir() if p.suffix in UNIT_SUFFIXES)
INSTALLED_BIN = "/usr/local/bin"
TOOLS = ("netskin", "netskin-interceptor")

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install systemd)",
)


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values in file order (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path.name}: {line!r} before any section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def entry_point(tool: str) -> Path:
    """This environment's console script for ``tool`` (what /usr/local/bin/TOOL links to)."""
    candidate = Path(sys.executable).parent / tool
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(tool)
    if found is None:
        pytest.fail(f"{tool} is not installed in this environment; run scripts/bootstrap.sh")
    return Path(found)


def verifiable_copies(directory: Path) -> list[Path]:
    copies = []
    for unit in UNITS:
        text = unit.read_text()
        for tool in TOOLS:
            text = re.sub(rf"{re.escape(INSTALLED_BIN)}/{re.escape(tool)}(?=\s|$)", str(entry_point(tool)), text)
        copy = directory / unit.name
        copy.write_text(text)
        copies.append(copy)
    return copies


def analyze(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120, env=env)


def test_there_are_units_to_check():
    names = {unit.name for unit in UNITS}
    assert {"netskin-interceptor.service", "netskin-skins.path", "netskin-skins-reload.service",
            "netskin-api.service", "netskin-agent.service"} <= names


def test_systemd_analyze_verify_says_nothing_about_our_units(tmp_path):
    copies = verifiable_copies(tmp_path)
    done = analyze("verify", *map(str, copies))
    output = done.stdout + done.stderr
    print(output)
    ours = [line for line in output.splitlines()
            if "netskin" in line or str(tmp_path) in line]
    assert ours == [], "systemd-analyze verify:\n" + "\n".join(ours)
    assert done.returncode == 0, output


def enable(directory: Path, copies: list[Path]) -> set[str]:
    """What `systemctl enable` does, in ``directory``: a WANTED.wants/UNIT link per WantedBy=.
    Returns the wanting units that are not ours (the targets to start from)."""
    ours = {copy.name for copy in copies}
    targets = set()
    for copy in copies:
        for wanted_by in parse_unit(copy).get("Install", {}).get("WantedBy", []):
            for target in wanted_by.split():
                wants = directory / f"{target}.wants"
                wants.mkdir(exist_ok=True)
                (wants / copy.name).symlink_to(Path("..") / copy.name)
                if target not in ours:
                    targets.add(target)
    return targets


def test_the_enabled_units_boot_without_an_ordering_cycle(tmp_path):
    """Starting multi-user.target with the units enabled: no ordering cycle, no complaint (a path
    unit ordered after the interceptor once made paths.target part of a cycle at boot)."""
    copies = verifiable_copies(tmp_path)
    targets = enable(tmp_path, copies)
    assert "multi-user.target" in targets
    done = analyze("verify", *map(str, copies), *sorted(targets))
    output = done.stdout + done.stderr
    print(output)
    assert "cycle" not in output
    ours = [line for line in output.splitlines() if "netskin" in line or str(tmp_path) in line]
    assert ours == [], "systemd-analyze verify:\n" + "\n".join(ours)


def test_verify_would_catch_a_mistake(tmp_path):
    """The check above is not vacuous: a misspelt key in a copy is reported by name."""
    broken = tmp_path / "netskin-broken.service"
    text = (SYSTEMD / "netskin-interceptor.service").read_text()
    broken.write_text(text.replace("ProtectSystem=strict", "ProtectSytem=strict"))
    done = analyze("verify", str(broken))
    assert "ProtectSytem" in done.stdout + done.stderr


def test_exec_lines_use_the_installed_tools_with_the_default_config():
    seen = set()
    for unit in UNITS:
        service = parse_unit(unit).get("Service", {})
        for key in ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop", "ExecStopPost"):
            for line in service.get(key, []):
                command = line.split()[0].lstrip("-+!@:|")
                if Path(command).name not in TOOLS:
                    continue
                seen.add(Path(command).name)
                assert command == f"{INSTALLED_BIN}/{Path(command).name}", f"{unit.name}: {key}={line}"
                assert f"--config {DEFAULT_CONFIG_PATH}" in line, f"{unit.name}: {key}={line}"
    assert seen == set(TOOLS)


def test_interceptor_unit_matches_the_daemon_and_its_defaults():
    unit = parse_unit(SYSTEMD / "netskin-interceptor.service")["Service"]
    defaults = HostConfig()
    # Ready only when the daemon says so (READY=1 once rules, queues and skins are in force), and
    # only the daemon itself may say it; its event loop feeds the watchdog.
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["WatchdogSec"] == ["10s"]
    assert unit["ExecStart"] == [f"{INSTALLED_BIN}/netskin-interceptor --config {DEFAULT_CONFIG_PATH}"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]
    # SIGTERM to the daemon alone (it removes its rules itself on a clean stop), not to the
    # iptables-restore it may be running.
    assert unit["KillMode"] == ["mixed"]
    # Directories systemd creates for the daemon are the host configuration's defaults.
    assert Path("/var/lib") / unit["StateDirectory"][0] == defaults.state_dir
    assert Path("/run") / unit["RuntimeDirectory"][0] == defaults.control_socket.parent
    assert {Path("/etc") / d for d in unit["ConfigurationDirectory"][0].split()} == {
        DEFAULT_CONFIG_PATH.parent, defaults.skins_dir}
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_NICE"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("MemoryDenyWriteExecute", "yes"),
                       ("LockPersonality", "yes"), ("SystemCallArchitectures", "native")):
        assert unit[key] == [value], key
    assert set(unit["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"}


def test_no_unit_removes_the_rules_behind_the_daemons_back():
    """fail_mode holds after a crash, during a restart and after systemd gave up: no Exec line
    runs --cleanup (the old ExecStopPost=--cleanup ran after crashes too, so a crashed "closed"
    host passed VM traffic unfiltered). Only the daemon, on SIGTERM, or the administrator does."""
    for unit in UNITS:
        service = parse_unit(unit).get("Service", {})
        for key, lines in service.items():
            if key.startswith("Exec"):
                for line in lines:
                    assert "--cleanup" not in line, f"{unit.name}: {key}={line}"
                    assert "iptables" not in line, f"{unit.name}: {key}={line}"
    interceptor = parse_unit(SYSTEMD / "netskin-interceptor.service")["Service"]
    assert "ExecStopPost" not in interceptor and "ExecStop" not in interceptor


def test_skins_path_watches_the_default_skins_dir_and_reloads():
    path = parse_unit(SYSTEMD / "netskin-skins.path")
    assert path["Path"]["PathChanged"] == [str(HostConfig().skins_dir)]
    target = path["Path"]["Unit"][0]
    reload = parse_unit(SYSTEMD / target)["Service"]["ExecStart"][0]
    assert "reload" in reload and "netskin-interceptor.service" in reload


@pytest.mark.parametrize("unit,limit", [("netskin-interceptor.service", 3.0), ("netskin-api.service", 3.0),
                                        ("netskin-agent.service", 3.0)])
def test_sandbox_exposure_stays_low(tmp_path, unit, limit):
    copies = {copy.name: copy for copy in verifiable_copies(tmp_path)}
    done = analyze("security", "--offline=yes", "--no-pager", str(copies[unit]))
    if "--offline" in done.stderr and done.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline: {done.stderr.strip()}")
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout)
    assert found, done.stdout[-2000:] + done.stderr
    print(found.group(0))
    assert float(found.group(1)) <= limit
