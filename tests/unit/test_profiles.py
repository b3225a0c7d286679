"""interceptor.profiles: the shipped profiles, one-line errors, lookup order and compilation."""

from __future__ import annotations

from pathlib import Path

import pytest

from interceptor import profiles
from interceptor.profiles import ALLOW, DROP, REJECT, CompiledProfile, CompiledRule
from interceptor.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP
from interceptor.profiles import (
    ProfileError,
    compile_profile,
    list_profiles,
    load_profile,
    load_profile_file,
    profile_dirs,
    validate_profile,
)
from interceptor.schema import SKIN_SUFFIXES, load_skin_file

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "rules"


@pytest.fixture(autouse=True)
def _shipped_rules(monkeypatch):
    monkeypatch.delenv(profiles.RULES_ENV, raising=False)


def errors_of(data: dict) -> list[str]:
    with pytest.raises(ProfileError) as caught:
        validate_profile(data)
    return caught.value.lines


def rule(**fields) -> dict:
    return {"direction": "in", "proto": "tcp", "action": "allow", **fields}


def doc(*rules: dict, **fields) -> dict:
    return {"default_in": "drop", "default_out": "allow", "rules": list(rules), **fields}


# --- the shipped profiles ---------------------------------------------------------------------


def test_the_shipped_directory_is_rules_beside_the_packages():
    assert profile_dirs(None) == [SHIPPED]
    assert set(list_profiles(profile_dirs(None))) == {"restricted", "standard", "open"}


@pytest.mark.parametrize("name", ["restricted", "standard", "open"])
def test_each_shipped_profile_starts_with_a_comment_saying_what_it_is_for(name):
    text = (SHIPPED / f"{name}.toml").read_text()
    assert text.startswith(f'# Security profile "{name}"')
    assert load_profile(name, profile_dirs(None)).description


def _incoming_allowed(profile: CompiledProfile) -> set[tuple[tuple[int, ...] | None, int]]:
    allowed = set()
    for r in profile.rules:
        assert r.direction == "in" and r.action is ALLOW and r.network is None
        for lo, hi in r.ports:
            allowed |= {(r.protos, port) for port in range(lo, hi + 1)}
    return allowed


def test_restricted_lets_in_only_ssh_and_lets_everything_out():
    profile = load_profile("restricted", profile_dirs(None))
    assert profile.name == "restricted"
    assert (profile.default_in, profile.default_out) == (DROP, ALLOW)
    assert _incoming_allowed(profile) == {((PROTO_TCP,), 22)}


def test_standard_lets_in_ssh_http_https_and_lets_everything_out():
    profile = load_profile("standard", profile_dirs(None))
    assert (profile.default_in, profile.default_out) == (DROP, ALLOW)
    assert _incoming_allowed(profile) == {((PROTO_TCP,), 22), ((PROTO_TCP,), 80), ((PROTO_TCP,), 443)}


def test_open_allows_everything_both_ways():
    profile = load_profile("open", profile_dirs(None))
    assert (profile.rules, profile.default_in, profile.default_out) == ((), ALLOW, ALLOW)


def test_the_presets_and_examples_name_only_profiles_that_exist():
    skins = [
        path
        for path in [*(ROOT / "rules" / "presets").iterdir(), *(ROOT / "examples").iterdir()]
        if path.suffix in SKIN_SUFFIXES and not path.name.startswith("invalid")
    ]
    named = {load_skin_file(path).security_profile for path in skins} - {None}
    assert named and named <= set(list_profiles(profile_dirs(None)))


# --- lookup order -----------------------------------------------------------------------------


def test_a_drop_in_overrides_the_shipped_profile_of_the_same_name(tmp_path):
    (tmp_path / "restricted.toml").write_text(
        'default_in = "reject"\ndefault_out = "drop"\n'
    )
    (tmp_path / "lab.toml").write_text('default_in = "allow"\ndefault_out = "allow"\n')
    (tmp_path / ".restricted.toml.swp").write_text("garbage")
    (tmp_path / "notes.txt").write_text("not a profile")
    dirs = profile_dirs(tmp_path)
    assert dirs == [tmp_path, SHIPPED]
    found = list_profiles(dirs)
    assert found == {
        "lab": tmp_path / "lab.toml",
        "open": SHIPPED / "open.toml",
        "restricted": tmp_path / "restricted.toml",
        "standard": SHIPPED / "standard.toml",
    }
    assert list(found) == sorted(found)
    overridden = load_profile("restricted", dirs)
    assert (overridden.rules, overridden.default_in, overridden.default_out) == ((), REJECT, DROP)


def test_the_shipped_directory_can_be_moved_by_environment(tmp_path, monkeypatch):
    (tmp_path / "only.toml").write_text('default_in = "drop"\ndefault_out = "allow"\n')
    monkeypatch.setenv(profiles.RULES_ENV, str(tmp_path))
    assert profile_dirs(None) == [tmp_path]
    assert list(list_profiles(profile_dirs(None))) == ["only"]


def test_a_missing_drop_in_directory_is_no_error(tmp_path):
    assert set(list_profiles(profile_dirs(tmp_path / "absent"))) == {"open", "restricted", "standard"}


def test_an_unknown_profile_is_one_line_naming_the_known_ones_and_the_fix(tmp_path):
    with pytest.raises(ProfileError) as caught:
        load_profile("restrictd", profile_dirs(tmp_path))
    (line,) = caught.value.lines
    assert line.startswith("unknown security profile 'restrictd' (did you mean 'restricted'? ")
    assert "known: open, restricted, standard" in line
    assert f"add {tmp_path / 'restrictd.toml'} or pick one of them" in line


def test_an_invalid_file_names_itself_on_every_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('default_in = "dorp"\ndefault_out = "allow"\n[[rules]]\ndirection = "up"\n'
                    'proto = "tcp"\naction = "allow"\n')
    with pytest.raises(ProfileError) as caught:
        load_profile("bad", profile_dirs(tmp_path))
    assert caught.value.lines == [
        f'{path}: default_in: "dorp" is not allowed (allowed: "allow", "drop" or "reject")',
        f'{path}: rules[0].direction: "up" is not allowed (allowed: "in" or "out")',
    ]


def test_a_file_that_is_not_toml_is_one_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("default_in = \n")
    with pytest.raises(ProfileError) as caught:
        load_profile_file(path)
    (line,) = caught.value.lines
    assert line.startswith(f"{path}: not valid TOML:")


def test_a_file_name_that_is_no_profile_name_is_refused(tmp_path):
    path = tmp_path / "-bad name.toml"
    path.write_text('default_in = "drop"\ndefault_out = "allow"\n')
    with pytest.raises(ProfileError, match="is not a valid profile name"):
        load_profile_file(path)


# --- one precise line per bad field -----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (doc(rule(ports=[22, "8000-8080", 0])), 'rules[0].ports[2]: 0 is out of range (allowed 1–65535)'),
        (doc(rule(ports=[65536])), "rules[0].ports[0]: 65536 is out of range (allowed 1–65535)"),
        (doc(rule(), rule(ports=["80-70000"])),
         'rules[1].ports[0]: "80-70000" is out of range (allowed 1–65535)'),
        (doc(rule(ports=["90-80"])),
         'rules[0].ports[0]: "90-80" is an empty range (write the lower port first)'),
        (doc(rule(ports=["http"])),
         'rules[0].ports[0]: "http" is not a port '
         '(allowed: a number 1–65535 or a range "lo-hi" like "8000-8080")'),
        (doc(rule(ports=[True])), "rules[0].ports[0]: true is not a port "
         '(allowed: a number 1–65535 or a range "lo-hi" like "8000-8080")'),
        (doc(rule(ports=["22"])), 'rules[0].ports[0]: "22" is not a port '
         '(allowed: a number 1–65535 or a range "lo-hi" like "8000-8080")'),
        (doc(rule(ports=22)), "rules[0].ports: expected a list, got a number"),
        (doc(rule(ports=[])), "rules[0].ports: must not be empty (remove ports to match every port)"),
        (doc(rule(proto="icmp", ports=[22])),
         'rules[0].ports: [22] is not allowed with proto "icmp" '
         '(ports need proto "tcp" or "udp"; or remove ports)'),
        (doc(rule(proto="any", ports=[22])),
         'rules[0].ports: [22] is not allowed with proto "any" '
         '(ports need proto "tcp" or "udp"; or remove ports)'),
        (doc(rule(proto="tcpp")),
         'rules[0].proto: "tcpp" is not allowed (allowed: "tcp", "udp", "icmp" or "any")'),
        (doc(rule(direction="inbound")),
         'rules[0].direction: "inbound" is not allowed (allowed: "in" or "out")'),
        (doc(rule(action="accept")),
         'rules[0].action: "accept" is not allowed (allowed: "allow", "drop" or "reject")'),
        (doc(rule(cidr="10.0.0.1/8")),
         'rules[0].cidr: "10.0.0.1/8" has host bits set (did you mean "10.0.0.0/8"?)'),
        (doc(rule(cidr="10.0.0/8")),
         'rules[0].cidr: "10.0.0/8" is not an IPv4 or IPv6 network (allowed: an address or '
         'address/prefix like "10.0.0.0/8" or "2001:db8::/32")'),
        (doc(rule(cidr="10.0.0.0/33")),
         'rules[0].cidr: "10.0.0.0/33" is not an IPv4 or IPv6 network (allowed: an address or '
         'address/prefix like "10.0.0.0/8" or "2001:db8::/32")'),
        (doc(rule(cidr=10)), 'rules[0].cidr: 10 is not a network (allowed: text like "10.0.0.0/8")'),
        (doc(rule(port=[22])),
         "rules[0].port: unknown field; did you mean ports? "
         "(allowed: direction, proto, ports, cidr, action)"),
        (doc(name="x"), "name: unknown field (allowed: description, default_in, default_out, rules)"),
        (doc(default_in="block"),
         'default_in: "block" is not allowed (allowed: "allow", "drop" or "reject")'),
        ({"default_in": "drop"}, "default_out: required field is missing"),
        (doc({"direction": "in", "proto": "tcp"}), "rules[0].action: required field is missing"),
        (doc(7), "rules[0]: expected a table of fields, got a number"),
        (doc(rules={"direction": "in"}), "rules: expected a list, got a table"),
        (doc(description=3), "description: expected text, got a number"),
    ],
)
def test_every_bad_field_is_one_precise_line(data, expected):
    assert errors_of(data) == [expected]


def test_several_problems_give_one_line_each():
    lines = errors_of(doc(rule(ports=[0, 70000]), rule(proto="x"), default_out="maybe"))
    assert len(lines) == 4
    assert [line.split(":")[0] for line in lines] == [
        "default_out",
        "rules[0].ports[0]",
        "rules[0].ports[1]",
        "rules[1].proto",
    ]


# --- compilation ------------------------------------------------------------------------------


def test_compilation_gives_protocol_numbers_port_ranges_and_integer_networks():
    model = validate_profile(
        doc(
            rule(ports=[22, "8000 - 8080"], cidr="10.0.0.0/8"),
            rule(direction="out", proto="udp", ports=[53], cidr="2001:db8::/32", action="reject"),
            rule(proto="icmp", cidr="192.0.2.7", action="drop"),
            rule(proto="any"),
            description="test",
        )
    )
    profile = compile_profile(model, "t")
    assert profile == CompiledProfile(
        name="t",
        rules=(
            CompiledRule("in", (PROTO_TCP,), ((22, 22), (8000, 8080)), (4, 10 << 24, 0xFF000000), ALLOW),
            CompiledRule(
                "out", (PROTO_UDP,), ((53, 53),), (6, 0x20010DB8 << 96, ((1 << 32) - 1) << 96), REJECT
            ),
            CompiledRule("in", (PROTO_ICMP, PROTO_ICMPV6), None, (4, 0xC0000207, 0xFFFFFFFF), DROP),
            CompiledRule("in", None, None, None, ALLOW),
        ),
        default_in=DROP,
        default_out=ALLOW,
        description="test",
    )
    # The engine compares verdicts with its own constants; the compiler hands out exactly those.
    assert all(r.action in (ALLOW, DROP, REJECT) for r in profile.rules)
    assert [r.description for r in profile.rules] == [
        "in tcp 22,8000-8080 10.0.0.0/8 → allow",
        "out udp 53 2001:db8::/32 → reject",
        "in icmp any 192.0.2.7/32 → drop",
        "in any any any → allow",
    ]
