"""The preset catalogue (rules/presets): every preset validates and is listed, each names its source
and keeps that source's numbers, and three presets with clearly different link effects do what
they say in the namespace lab, under the real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from interceptor.library import PRESETS_ENV, SkinLibrary
from interceptor.schema import SKIN_SUFFIXES
from manager import measure
from manager.process import DaemonProcess

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PRESETS = REPO / "rules" / "presets"
PRESET_FILES = sorted(p for p in PRESETS.iterdir() if p.suffix in SKIN_SUFFIXES and not p.name.startswith("."))

# What the issue asks the catalogue to hold: the 10 ATC profiles, Chrome DevTools' 3G / Slow 4G /
# Fast 4G, Comcast's GPRS/EDGE/3G/DSL/WiFi/Starlink rows, and three scenarios of netskin's own.
REQUIRED = {
    "2g-developing-rural", "2g-developing-urban", "3g-average", "3g-good", "cable", "dsl",
    "edge-average", "edge-good", "edge-lossy", "no-connectivity",
    "chrome-3g", "chrome-slow-4g", "chrome-fast-4g",
    "comcast-gprs", "comcast-edge", "comcast-3g", "comcast-dsl-poor", "comcast-dsl-good",
    "comcast-wifi", "comcast-starlink",
    "locked-down", "hostile-dns", "offline",
}

# The sources' numbers as netskin's effective per-direction link:
# (downlink delay ms, uplink delay ms, downlink kbit/s, uplink kbit/s, downlink loss %, uplink loss %),
# delays one-way, rate 0 = unlimited. ATC gives one-way values per direction; DevTools' latency
# and Comcast's latency are round trip (split in half); Comcast's bandwidth and loss apply both ways.
SOURCE_NUMBERS = {
    # ATC utils/profiles/*.json: down/up delay, down/up rate, down/up loss
    "2g-developing-rural": (650, 650, 20, 18, 2, 2),
    "2g-developing-urban": (650, 650, 35, 32, 0, 0),
    "3g-average": (100, 100, 780, 330, 0, 0),
    "3g-good": (90, 100, 850, 420, 0, 0),
    "cable": (2, 2, 6000, 1000, 0, 0),
    "dsl": (5, 5, 2000, 256, 0, 0),
    "edge-average": (400, 440, 240, 200, 0, 0),
    "edge-good": (350, 370, 250, 200, 0, 0),
    "edge-lossy": (400, 440, 240, 200, 1, 1),
    "no-connectivity": (0, 0, 1, 1, 0, 0),
    # Chrome DevTools NetworkManager.ts: latency × factor, throughput × factor
    "chrome-3g": (1000, 1000, 400, 400, 0, 0),  # 400 ms × 5; 500 kbit/s × 0.8
    "chrome-slow-4g": (281.25, 281.25, 1440, 675, 0, 0),  # 150 ms × 3.75; 1.6 Mbit/s, 750 kbit/s × 0.9
    "chrome-fast-4g": (82.5, 82.5, 8100, 1350, 0, 0),  # 60 ms × 2.75; 9 Mbit/s, 1.5 Mbit/s × 0.9
    # Comcast README "Network Condition Profiles": latency, bandwidth, packet loss
    "comcast-gprs": (250, 250, 50, 50, 2, 2),
    "comcast-edge": (150, 150, 250, 250, 1.5, 1.5),
    "comcast-3g": (125, 125, 750, 750, 1.5, 1.5),
    "comcast-dsl-poor": (35, 35, 2000, 2000, 2, 2),
    "comcast-dsl-good": (20, 20, 8000, 8000, 0.5, 0.5),
    "comcast-wifi": (20, 20, 30000, 30000, 0.2, 0.2),
    "comcast-starlink": (10, 10, 0, 0, 2.5, 2.5),
    # netskin's own
    "offline": (0, 0, 0, 0, 100, 100),
    "locked-down": (0, 0, 0, 0, 0, 0),
    "hostile-dns": (0, 0, 0, 0, 0, 0),
    # netskin's own timelines: the base skin's numbers (the steps change them over time)
    "flapping-link": (10, 10, 0, 0, 0, 0),
    "outage-every-minute": (0, 0, 0, 0, 0, 0),
    "walk-out-of-coverage": (25, 25, 20000, 20000, 0, 0),
    "dns-outage": (0, 0, 0, 0, 0, 0),
}

PING_IP_BYTES = 84  # iputils ping's default 56 data bytes + 8 ICMP + 20 IPv4


def netskin(*args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "manager.cli", *args]
    if config is not None:
        argv += ["--config", str(config)]
    env = {**os.environ, PRESETS_ENV: str(PRESETS)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)


def empty_host_config(tmp_path: Path) -> Path:
    """A host configuration whose drop-in directory is empty, so the library shows presets only."""
    (tmp_path / "skins.d").mkdir()
    config = tmp_path / "netskin.toml"
    config.write_text('state_dir = "state"\nskins_dir = "skins.d"\ncontrol_socket = "control.sock"\n')
    return config


def test_the_catalogue_holds_what_the_issue_asks_for():
    names = {p.stem for p in PRESET_FILES}
    assert REQUIRED <= names, f"missing presets: {sorted(REQUIRED - names)}"


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_each_preset_names_its_source_in_a_comment(path):
    comments = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(line.startswith("# Source:") for line in comments), f"{path.name}: no '# Source:' comment"
    assert path.stem in SOURCE_NUMBERS, f"{path.name}: add its source's numbers to SOURCE_NUMBERS"


def test_every_preset_validates():
    done = netskin("skins", "validate", "--json", *map(str, PRESET_FILES))
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(done.stdout)
    assert [r["file"] for r in results] == list(map(str, PRESET_FILES))
    assert all(r["valid"] and not r["errors"] for r in results), [r for r in results if not r["valid"]]
    assert [r["name"] for r in results] == [p.stem for p in PRESET_FILES]


def test_skins_list_json_lists_every_preset(tmp_path):
    done = netskin("skins", "list", "--json", config=empty_host_config(tmp_path))
    assert done.returncode == 0, done.stderr
    listed = {entry["name"]: entry for entry in json.loads(done.stdout)}
    assert set(listed) == {p.stem for p in PRESET_FILES}
    for name, entry in listed.items():
        assert entry["origin"] == "preset" and entry["valid"], entry
        assert Path(entry["path"]).resolve() == (PRESETS / Path(entry["path"]).name).resolve()


@pytest.mark.parametrize("name", sorted(SOURCE_NUMBERS))
def test_presets_keep_their_sources_numbers(tmp_path, name):
    skin = SkinLibrary(tmp_path, presets=PRESETS).get(name)
    down, up = skin.link("downlink"), skin.link("uplink")
    effective = (down.delay_ms, up.delay_ms, down.rate_kbps, up.rate_kbps, down.loss_percent, up.loss_percent)
    assert effective == pytest.approx(SOURCE_NUMBERS[name]), name
    assert down.jitter_ms == up.jitter_ms == 0


def expected_ping_rise_ms(skin) -> float:
    """Added round trip for one ping: both one-way delays plus its serialization at each rate."""
    rise = 0.0
    for direction in ("uplink", "downlink"):
        link = skin.link(direction)
        rise += link.delay_ms
        if link.rate_kbps:
            rise += PING_IP_BYTES * 8 / link.rate_kbps  # bits / (kbit/s) = ms
    return rise


def test_three_presets_measured_in_the_lab(lab, monkeypatch):
    """comcast-3g (symmetric 250 ms RTT), edge-lossy (ATC: 440 ms up, 400 ms down) and offline
    (100 % loss), applied one after the other with `netskin apply` to vm1 of the lab."""
    monkeypatch.setenv(PRESETS_ENV, str(PRESETS))  # the daemon below inherits it
    library = SkinLibrary(lab.workdir / "skins.d", presets=PRESETS)
    with DaemonProcess(lab.config_path) as daemon:
        base = measure.ping(lab, "vm1", lab.inet_address, count=10, interval=0.05)["rtt_median_ms"]
        for name in ("comcast-3g", "edge-lossy"):
            applied = netskin("apply", "vm1", name, config=lab.config_path)
            assert applied.returncode == 0, applied.stderr
            expected = expected_ping_rise_ms(library.get(name))
            result = measure.ping(lab, "vm1", lab.inet_address, count=15, interval=0.05,
                                  wait_s=2 * expected / 1000 + 1)
            rise = result["rtt_median_ms"] - base
            print(f"{name}: RTT +{rise:.1f} ms (asked +{expected:.1f}), {result['received']}/15 replies")
            assert result["received"] >= 10  # 1-1.5 % loss each way: a few at most
            assert rise == pytest.approx(expected, abs=5 + 0.02 * expected)

        applied = netskin("apply", "vm1", "offline", config=lab.config_path)
        assert applied.returncode == 0, applied.stderr
        lost_before = daemon.status("vm1")["vm1"]["uplink"]["drops"]["loss"]
        result = measure.ping(lab, "vm1", lab.inet_address, count=5, interval=0.1, wait_s=1)
        lost = daemon.status("vm1")["vm1"]["uplink"]["drops"]["loss"] - lost_before
        print(f"offline: {result['received']}/5 replies, {lost} dropped as loss on the uplink")
        assert result["received"] == 0
        assert lost >= 5
