"""`netskin demo --timeline` and `netskin plot` for real: a lab, a skin with a timeline, a recording,
a PNG, and the recording drawn again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from manager.plot import Recording

pytestmark = pytest.mark.e2e


def test_demo_timeline_records_the_outages_and_plot_draws_them(tmp_path, lab_prefix):
    skins = tmp_path / "skins.d"
    skins.mkdir()
    (skins / "blink.json").write_text(json.dumps({
        "latency_ms": 10,
        "timeline": {"steps": [{"for": "1.5s"}, {"for": "1s", "set": {"packet_loss_percent": 100}}]},
    }))
    config = tmp_path / "host.toml"
    config.write_text(f'skins_dir = "{skins}"\n')
    png = tmp_path / "run.png"
    out = subprocess.run([sys.executable, "-m", "manager.cli", "demo", "--timeline", "--skin", "blink",
                          "--seconds", "6", "--png", str(png), "--config", str(config), "--prefix", lab_prefix,
                          "--json"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert png.read_bytes()[:4] == b"\x89PNG"
    recording = Recording.load(png.with_suffix(".json"))
    # 6 s at 50 probes/s. The timeline started at apply, a little before the recording: the
    # outages are where the recorded steps say (step 2 until the next step 1).
    assert len(recording.probes) >= 280
    assert [step for _, step, _ in recording.steps][:4] == [1, 2, 1, 2], recording.steps
    changes = [t for t, _, _ in recording.steps] + [recording.duration_s + 1]
    outages = [(t, changes[i + 1]) for i, (t, step, _) in enumerate(recording.steps) if step == 2]
    in_outage = lambda t, margin: any(lo - margin <= t <= hi + margin for lo, hi in outages)  # noqa: E731
    lost_in = [t for t, rtt in recording.probes if rtt is None]
    inside = [t for t, _ in recording.probes if in_outage(t, -0.1)]
    outside = [t for t in lost_in if not in_outage(t, 0.1)]
    assert len(lost_in) >= 0.95 * len(inside) and len(outside) <= 3, (len(lost_in), len(inside), outside)
    assert result["lost"] == len(lost_in)
    delivered = [rtt for _, rtt in recording.probes if rtt is not None]
    assert 9.5 <= sorted(delivered)[len(delivered) // 2] <= 13  # latency_ms 10 on top of the path
    drawn = subprocess.run([sys.executable, "-m", "manager.cli", "plot", str(png.with_suffix(".json")),
                            "--width", "60"], capture_output=True, text=True, check=True)
    assert drawn.stdout.count("\n") >= 4 and "blink on vm1" in drawn.stdout
