"""interceptor.schema: loading, validation messages, aliases, host configuration and compilation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interceptor import schema
from interceptor.compiled import NS_PER_MS
from interceptor.schema import (
    ConfigError,
    HostConfig,
    SkinError,
    compile_skin,
    load_host_config,
    load_skin_file,
    validate_skin,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PRESETS = ROOT / "rules" / "presets"

EXAMPLE_SKINS = sorted(
    p for p in EXAMPLES.iterdir() if p.suffix in schema.SKIN_SUFFIXES and not p.name.startswith("invalid")
)
PRESET_FILES = sorted(PRESETS.glob("*.toml"))


def errors_of(data: dict, default_name: str | None = "t") -> list[str]:
    with pytest.raises(SkinError) as caught:
        validate_skin(data, default_name)
    return caught.value.lines


# --- files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLE_SKINS, ids=lambda p: p.name)
def test_every_example_validates_and_compiles(path):
    compiled = compile_skin(load_skin_file(path))
    assert compiled.name


def test_the_examples_cover_both_seed_formats_and_every_file_type():
    assert {p.suffix for p in EXAMPLE_SKINS} >= {".json", ".yaml", ".toml"}
    persona = load_skin_file(EXAMPLES / "persona.json")
    assert (persona.name, persona.latency_ms, persona.packet_loss_percent) == ("field-tester", 120, 2)
    seed = load_skin_file(EXAMPLES / "Mobile_US_East.json")
    assert (seed.name, str(seed.ip_address), seed.mtu) == ("Mobile_US_East", "10.77.200.10", 1400)


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_every_preset_validates_is_named_by_its_stem_and_cites_its_source(path):
    skin = load_skin_file(path)
    assert skin.name == path.stem
    assert path.read_text().startswith("#")
    compile_skin(skin)


def test_the_preset_catalogue_is_complete():
    expected = {
        "2g-developing-rural", "2g-developing-urban", "3g-average", "3g-good", "cable", "dsl",
        "edge-average", "edge-good", "edge-lossy", "no-connectivity",
        "chrome-3g", "chrome-slow-4g", "chrome-fast-4g",
        "comcast-gprs", "comcast-edge", "comcast-3g", "comcast-dsl-poor", "comcast-dsl-good",
        "comcast-wifi", "comcast-starlink",
        "offline", "locked-down", "hostile-dns",
        "flapping-link", "outage-every-minute", "walk-out-of-coverage", "dns-outage",
    }  # fmt: skip
    assert {p.stem for p in PRESET_FILES} == expected


def test_atc_presets_are_per_direction_one_way():
    compiled = compile_skin(load_skin_file(PRESETS / "edge-average.toml"))
    assert compiled.downlink.delay_ns == 400 * NS_PER_MS
    assert compiled.uplink.delay_ns == 440 * NS_PER_MS
    assert compiled.downlink.ns_per_byte == pytest.approx(8e6 / 240)
    assert compiled.uplink.ns_per_byte == pytest.approx(8e6 / 200)


def test_comcast_presets_are_round_trip():
    compiled = compile_skin(load_skin_file(PRESETS / "comcast-3g.toml"))
    assert compiled.uplink.delay_ns + compiled.downlink.delay_ns == 250 * NS_PER_MS
    assert compiled.uplink.loss_probability == compiled.downlink.loss_probability == 0.015
    starlink = compile_skin(load_skin_file(PRESETS / "comcast-starlink.toml"))
    assert starlink.uplink.ns_per_byte == 0.0  # unlimited


def test_invalid_loss_example_gives_exactly_one_precise_line():
    path = EXAMPLES / "invalid-loss.yaml"
    with pytest.raises(SkinError) as caught:
        load_skin_file(path)
    assert caught.value.lines == [f"{path}: packet_loss_percent: 150 is out of range (allowed 0–100)"]
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.json", "{", "not valid JSON"),
        ("bad.yaml", "a: [1,", "not valid YAML"),
        ("bad.toml", "a = ", "not valid TOML"),
        ("list.yaml", "- 1\n- 2\n", "expected a table of fields at the top level, got a list"),
        ("empty.yaml", "", "the file is empty"),
        ("skin.txt", "latency_ms: 1", "unsupported file type"),
    ],
)
def test_unparsable_files_give_one_line_naming_the_file(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SkinError) as caught:
        load_skin_file(path)
    [line] = caught.value.lines
    assert line.startswith(f"{path}: ") and expected in line


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(SkinError, match="no such file"):
        load_skin_file(tmp_path / "nope.json")


# --- validation messages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "line"),
    [
        ({"uplink": {"rate_kbps": -5}}, "uplink.rate_kbps: -5 is out of range (allowed ≥ 0)"),
        ({"mtu": 10}, "mtu: 10 is out of range (allowed 68–65535)"),
        ({"qos_priority": 11}, "qos_priority: 11 is out of range (allowed 1–10)"),
        ({"packet_loss_probability": 1.5}, "packet_loss_probability: 1.5 is out of range (allowed 0–1)"),
        ({"latency_ms": 60001}, "latency_ms: 60001 is out of range (allowed 0–60000)"),
        ({"jitter_ms": True}, "jitter_ms: true is not a number (allowed 0–60000)"),
        ({"queue_limit_ms": 0}, "queue_limit_ms: 0 is out of range (allowed 1–60000)"),
        ({"dns": {"ttl": -1}}, "dns.ttl: -1 is out of range (allowed 0–604800)"),
        (
            {"loss_model": {"gilbert_elliott": {"p": 1, "r": 101}}},
            "loss_model.gilbert_elliott.r: 101 is out of range (allowed 0–100)",
        ),
        ({"ip_address": "10.0.0.300"}, 'ip_address: "10.0.0.300" is not an IPv4 address'),
        ({"dns_servers": ["10.0.0.1", "x"]}, 'dns_servers[1]: "x" is not an IP address'),
        ({"bandwidth_limit_kbps": float("inf")}, "bandwidth_limit_kbps: inf is not a finite number (allowed ≥ 0)"),
    ],
)
def test_errors_name_the_field_the_value_and_the_range(data, line):
    assert errors_of(data) == [line]


def test_unknown_fields_are_rejected_everywhere():
    [top] = errors_of({"colour": "red"})
    assert top.startswith("colour: unknown field (allowed: name, skin_name, description, latency_ms")
    [typo] = errors_of({"latncy_ms": 3})
    assert "did you mean latency_ms?" in typo
    [nested] = errors_of({"uplink": {"delay": 5}})
    assert nested.startswith("uplink.delay: unknown field")
    assert "delay_ms" in nested
    [dns] = errors_of({"dns": {"rewrite": {}, "nxdomain": []}})
    assert dns.startswith("dns.nxdomain: unknown field")


def test_every_error_is_reported_one_line_each():
    lines = errors_of({"mtu": 1, "qos_priority": 0, "colour": 1})
    assert len(lines) == 3
    assert all("\n" not in line for line in lines)


def test_loss_model_must_be_random_or_gilbert_elliott():
    assert validate_skin({"loss_model": "random"}, "t").loss_model.gilbert_elliott is None
    [line] = errors_of({"loss_model": "bursty"})
    assert line.startswith('loss_model: "bursty" is not a loss model')
    [both] = errors_of({"packet_loss_percent": 1, "loss_model": {"gilbert_elliott": {"p": 1, "r": 10}}})
    assert "remove packet_loss_percent" in both


# --- aliases and names ---------------------------------------------------------------------------


def test_both_alias_forms_mean_the_same():
    persona = validate_skin({"simulated_latency_ms": 80, "packet_loss_probability": 0.07}, "p")
    seed = validate_skin({"latency_ms": 80, "packet_loss_percent": 7}, "s")
    assert (persona.latency_ms, persona.packet_loss_percent) == (80, 7)
    assert compile_skin(persona).uplink == compile_skin(seed).uplink
    assert compile_skin(persona).downlink.loss_probability == 0.07


def test_giving_both_aliases_with_the_same_value_is_fine():
    skin = validate_skin(
        {"name": "a", "skin_name": "a", "latency_ms": 5, "simulated_latency_ms": 5,
         "packet_loss_percent": 2, "packet_loss_probability": 0.02}
    )  # fmt: skip
    assert (skin.name, skin.latency_ms, skin.packet_loss_percent) == ("a", 5, 2)


@pytest.mark.parametrize(
    ("data", "start"),
    [
        ({"latency_ms": 3, "simulated_latency_ms": 4}, "latency_ms: 3 conflicts with simulated_latency_ms: 4"),
        ({"name": "a", "skin_name": "b"}, 'name: "a" conflicts with skin_name: "b"'),
        (
            {"packet_loss_percent": 1, "packet_loss_probability": 0.5},
            "packet_loss_percent: 1 conflicts with packet_loss_probability: 0.5",
        ),
    ],
)
def test_conflicting_aliases_are_rejected(data, start):
    [line] = errors_of(data)
    assert line.startswith(start)


def test_the_name_comes_from_name_skin_name_or_the_file_stem(tmp_path):
    assert validate_skin({"skin_name": "x"}).name == "x"
    assert validate_skin({"name": "y"}, "stem").name == "y"
    path = tmp_path / "from-stem.yaml"
    path.write_text("latency_ms: 1\n")
    assert load_skin_file(path).name == "from-stem"
    assert errors_of({}, default_name=None) == ["name: required field is missing (give name or skin_name)"]
    bad = tmp_path / "has space.json"
    bad.write_text("{}")
    with pytest.raises(SkinError, match="add a name field"):
        load_skin_file(bad)


def test_mac_addresses_are_normalised_and_must_be_unicast():
    assert validate_skin({"mac_address": "02-00-5E-10-00-0A"}, "t").mac_address == "02:00:5e:10:00:0a"
    assert validate_skin({"mac_address": "02005e10000a"}, "t").mac_address == "02:00:5e:10:00:0a"
    for bad in ("01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00"):
        assert "is not a unicast MAC address" in errors_of({"mac_address": bad})[0]
    assert "is not a MAC address" in errors_of({"mac_address": "02:00:5e:10:00"})[0]


def test_dns_patterns_are_exact_names_or_wildcards():
    dns = validate_skin({"dns": {"rewrite": {"*.Example.TEST.": "198.51.100.7"}, "block": ["a.b"]}}, "t").dns
    assert dict(dns.rewrite) == {"*.example.test": dns.rewrite["*.example.test"]}
    assert str(dns.rewrite["*.example.test"]) == "198.51.100.7"
    assert (dns.ttl, dns.delay_ms) == (60, 0)
    for bad in ("*", "a.*.b", "bad name.test", "-x.test"):
        [line] = errors_of({"dns": {"block": [bad]}})
        assert line.startswith("dns.block: ") and "is not a DNS name pattern" in line


# --- compilation -----------------------------------------------------------------------------------


def test_latency_is_round_trip_and_halved_per_direction():
    compiled = compile_skin(validate_skin({"latency_ms": 80, "jitter_ms": 10}, "t"))
    assert compiled.uplink.delay_ns == compiled.downlink.delay_ns == 40 * NS_PER_MS
    assert compiled.uplink.jitter_ns == compiled.downlink.jitter_ns == 10 * NS_PER_MS


def test_bandwidth_becomes_nanoseconds_per_byte_in_each_direction():
    compiled = compile_skin(validate_skin({"bandwidth_limit_kbps": 2000}, "t"))
    # 2000 kbit/s = 250 000 byte/s = 4000 ns per byte.
    assert compiled.uplink.ns_per_byte == compiled.downlink.ns_per_byte == 4000.0
    assert compile_skin(validate_skin({}, "t")).uplink.ns_per_byte == 0.0


def test_a_rate_below_one_bit_per_second_is_rejected_not_overflowed():
    [line] = errors_of({"uplink": {"rate_kbps": 1e-300}})
    assert line.startswith("uplink.rate_kbps: 1e-300 kbit/s is below 1 bit/s")
    assert compile_skin(validate_skin({"bandwidth_limit_kbps": 0.001}, "t")).uplink.ns_per_byte == 8e9


def test_direction_objects_override_the_top_level_one_way():
    skin = validate_skin(
        {"latency_ms": 100, "packet_loss_percent": 2, "bandwidth_limit_kbps": 1000, "jitter_ms": 4,
         "uplink": {"delay_ms": 30, "rate_kbps": 250}, "downlink": {"loss_percent": 0, "jitter_ms": 0}},
        "t",
    )  # fmt: skip
    compiled = compile_skin(skin)
    assert compiled.uplink.delay_ns == 30 * NS_PER_MS  # one-way, not halved
    assert compiled.uplink.ns_per_byte == 32_000.0
    assert compiled.uplink.loss_probability == 0.02
    assert compiled.uplink.jitter_ns == 4 * NS_PER_MS
    assert compiled.downlink.delay_ns == 50 * NS_PER_MS
    assert compiled.downlink.ns_per_byte == 8000.0
    assert compiled.downlink.loss_probability == 0.0
    assert compiled.downlink.jitter_ns == 0


def test_gilbert_elliott_percents_become_probabilities():
    skin = validate_skin({"loss_model": {"gilbert_elliott": {"p": 5, "r": 40, "h": 80}}}, "t")
    compiled = compile_skin(skin)
    for direction in (compiled.uplink, compiled.downlink):
        ge = direction.gilbert_elliott
        assert (ge.p, ge.r, ge.loss_bad, ge.loss_good) == (0.05, 0.4, 0.8, 0.0)
        assert direction.loss_probability == 0.0
    # A direction that sets its own loss uses random loss instead.
    split = compile_skin(
        validate_skin(
            {"loss_model": {"gilbert_elliott": {"p": 5, "r": 40}}, "uplink": {"loss_percent": 3}}, "t"
        )
    )
    assert split.uplink.gilbert_elliott is None and split.uplink.loss_probability == 0.03
    assert split.downlink.gilbert_elliott is not None


def test_the_rest_is_copied_across():
    skin = load_skin_file(EXAMPLES / "persona.json")
    compiled = compile_skin(skin)
    assert compiled.qos_weight == 7
    assert compiled.security_profile == "standard"
    assert compiled.uplink.loss_probability == compiled.downlink.loss_probability == 0.02
    assert compiled.uplink.queue_limit_ns == 500 * NS_PER_MS
    seed = compile_skin(load_skin_file(EXAMPLES / "Mobile_US_East.json"))
    assert seed.dns_servers == ("10.77.0.2",)
    assert (seed.ip_address, seed.mac_address, seed.mtu) == ("10.77.200.10", "02:00:5e:10:00:01", 1400)
    assert compile_skin(validate_skin({"reorder_percent": 25}, "t")).uplink.reorder_probability == 0.25


# --- properties ------------------------------------------------------------------------------------

RATES = st.one_of(st.just(0.0), st.floats(0.001, 1e7))  # below 1 bit/s is rejected

# (field, low, high) for the other numeric top-level fields.
RANGES = [
    ("latency_ms", 0, 60_000),
    ("simulated_latency_ms", 0, 60_000),
    ("jitter_ms", 0, 60_000),
    ("reorder_percent", 0, 100),
    ("packet_loss_percent", 0, 100),
    ("packet_loss_probability", 0, 1),
    ("queue_limit_ms", 1, 60_000),
]
INT_RANGES = [("qos_priority", 1, 10), ("mtu", 68, 65_535)]


@st.composite
def in_range_skins(draw):
    data = {}
    for field, low, high in RANGES:
        if draw(st.booleans()):
            data[field] = draw(st.floats(low, high))
    if draw(st.booleans()):
        data["bandwidth_limit_kbps"] = draw(RATES)
    for field, low, high in INT_RANGES:
        if draw(st.booleans()):
            data[field] = draw(st.integers(low, high))
    # The two spellings must agree when both are given.
    if "simulated_latency_ms" in data and "latency_ms" in data:
        data["latency_ms"] = data["simulated_latency_ms"]
    if "packet_loss_probability" in data and "packet_loss_percent" in data:
        del data["packet_loss_percent"]
    for direction in ("uplink", "downlink"):
        if draw(st.booleans()):
            data[direction] = {
                "delay_ms": draw(st.floats(0, 60_000)),
                "loss_percent": draw(st.floats(0, 100)),
                "rate_kbps": draw(RATES),
            }
    return data


@settings(max_examples=300)
@given(in_range_skins())
def test_any_in_range_skin_validates_and_compiles(data):
    compiled = compile_skin(validate_skin(data, "prop"))
    for direction in (compiled.uplink, compiled.downlink):
        assert 0 <= direction.loss_probability <= 1
        assert direction.delay_ns >= 0 and direction.ns_per_byte >= 0
        assert math.isfinite(direction.ns_per_byte)


@st.composite
def out_of_range_values(draw):
    nested = [
        ("downlink.delay_ms", 0, 60_000),
        ("uplink.loss_percent", 0, 100),
        ("uplink.rate_kbps", 0, None),
        ("loss_model.gilbert_elliott.p", 0, 100),
        ("dns.delay_ms", 0, 60_000),
    ]
    field, low, high = draw(
        st.sampled_from(RANGES + INT_RANGES + nested + [("bandwidth_limit_kbps", 0, None)])
    )
    if (field, low, high) in INT_RANGES:
        return field, draw(st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1)))
    outside = [st.floats(max_value=low, exclude_max=True, allow_infinity=False)]
    if high is not None:
        outside.append(st.floats(min_value=high, exclude_min=True, allow_infinity=False))
    return field, draw(st.one_of(outside))


@settings(max_examples=300)
@given(out_of_range_values())
def test_any_out_of_range_value_is_one_line_naming_the_field(case):
    field, value = case
    data = value
    for key in reversed(field.split(".")):
        data = {key: data}
    if field.startswith("loss_model."):
        data["loss_model"]["gilbert_elliott"]["r"] = 10
    [line] = errors_of(data)
    assert line.startswith(f"{field}: ") and "out of range (allowed" in line


@given(st.dictionaries(st.text(min_size=1).filter(lambda k: k not in schema.Skin.model_fields), st.integers(), min_size=1, max_size=3))
def test_any_unknown_field_is_named(data):
    lines = errors_of(data)
    assert len(lines) == len(data)
    assert all("unknown field" in line for line in lines)


# --- host configuration -----------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_example_host_configuration_loads(monkeypatch):
    config = load_host_config(EXAMPLES / "host" / "netskin.toml")
    assert list(config.vms) == ["web1", "db1"]
    assert config.vms["web1"].skin == "3g-average"
    assert str(config.vms["db1"].address6) == "fd00:77::3"
    assert config.vm_queues("web1") == (7700, 7701)
    assert config.vm_queues("db1") == (7700, 7701)  # one engine worker: one queue pair for all VMs
    assert config.queue_numbers(0) == config.vm_queues("db1")
    assert config.queue_numbers(0, gso=True) == (7702, 7703)  # the pair taking GSO super-packets
    assert config.queue_numbers(1) == (7704, 7705)  # worker 1's pair
    with pytest.raises(ConfigError, match="unknown VM"):
        config.vm_queues("nope")


def test_a_missing_default_configuration_means_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv(schema.CONFIG_ENV, raising=False)
    monkeypatch.setattr(schema, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    config = load_host_config()
    assert config == HostConfig()
    assert (config.fail_mode, config.queue_base, str(config.skins_dir)) == ("open", 7700, "/etc/netskin/skins.d")


def test_a_named_configuration_must_exist(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_host_config(tmp_path / "absent.toml")
    monkeypatch.setenv(schema.CONFIG_ENV, str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match=r"\$NETSKIN_CONFIG"):
        load_host_config()


def test_the_environment_names_the_configuration_and_relative_paths_are_beside_it(monkeypatch, tmp_path):
    path = write(tmp_path / "host.toml", 'skins_dir = "skins"\nstate_dir = "/abs"\n')
    monkeypatch.setenv(schema.CONFIG_ENV, str(path))
    config = load_host_config()
    assert config.skins_dir == tmp_path / "skins"
    assert config.state_dir == Path("/abs")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('colour = 1\n', "colour: unknown field"),
        ('fail_mode = "sometimes"\n', 'fail_mode: "sometimes" is not allowed (allowed: "open" or "closed")'),
        ("host_uplink_kbps = -1\n", "host_uplink_kbps: -1 is out of range (allowed ≥ 0)"),
        ('[vms.a]\ninterface = "tap-a"\n', "vms.a.address: required field is missing"),
        ('[vms.a]\ninterface = "tap-a"\naddress = "10.0.0.1"\nmac = 1\n', "vms.a.mac: unknown field"),
        (
            '[vms.a]\ninterface = "a-very-long-ifname"\naddress = "10.0.0.1"\n',
            'vms.a.interface: "a-very-long-ifname" is too long (allowed at most 15 characters)',
        ),
        (
            '[vms.a]\ninterface = "t"\naddress = "10.0.0.1"\n[vms.b]\ninterface = "t"\naddress = "10.0.0.2"\n',
            'vms.b.interface: "t" is already used by vms.a',
        ),
        (
            'queue_base = 65535\n[vms.a]\ninterface = "t"\naddress = "10.0.0.1"\n',
            "queue_base: 65535 leaves no room for the queues",
        ),
    ],
)
def test_host_configuration_errors_are_one_line_each(tmp_path, text, line):
    path = write(tmp_path / "host.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_host_config(path)
    [only] = caught.value.lines
    assert only.startswith(f"{path}: {line}")


def test_a_stored_document_compiles_under_its_name():
    compiled = schema.compile_document({"latency_ms": 20}, "stored")
    assert compiled.name == "stored" and compiled.uplink.delay_ns == 10 * NS_PER_MS
    with pytest.raises(SkinError, match="mtu"):
        schema.compile_document({"mtu": 1}, "stored")


def test_json_round_trip_of_a_resolved_skin_is_stable():
    skin = load_skin_file(EXAMPLES / "bursty-wifi.yaml")
    again = validate_skin(json.loads(skin.model_dump_json()))
    assert compile_skin(again) == compile_skin(skin)


def test_a_libvirt_table_names_the_connection(tmp_path):
    path = tmp_path / "netskin.toml"
    path.write_text('[libvirt]\nuri = "qemu+unix:///system?socket=/run/lab/libvirt-sock"\n')
    assert load_host_config(path).libvirt.uri == "qemu+unix:///system?socket=/run/lab/libvirt-sock"
    assert HostConfig().libvirt is None


@pytest.mark.parametrize("table, message", [
    ('uri = "system"', "not a libvirt connection URI"),
    ('uri = "qemu:///system extra"', "not a libvirt connection URI"),
    ("", "libvirt.uri"),
    ('uri = "qemu:///system"\npoll_s = 1', "poll_s"),
])
def test_a_bad_libvirt_table_is_one_line_naming_it(tmp_path, table, message):
    path = tmp_path / "netskin.toml"
    path.write_text(f"[libvirt]\n{table}\n")
    with pytest.raises(ConfigError, match=message):
        load_host_config(path)
