"""Hardware profiles: bundled ones load, save/load round-trips, bad fields are named."""

from __future__ import annotations

import json

import pytest

from mer.errors import BadInput
from mer.sim.hardware import HardwareProfile, bundled_profiles, load_profile


def test_bundled_profiles_load() -> None:
    names = bundled_profiles()
    assert {"seed-g2-standard-32", "nvme-desktop", "ci-tiny"} <= set(names)
    for name in names:
        assert load_profile(name).name == name


def test_seed_profile_reproduces_published_figures() -> None:
    # The public run: one whole 99,094,528-byte slot per read took 116.5 ms (p50);
    # two expert FFNs of 99,090,432 bytes took 40.3 ms (p50).
    p = load_profile("seed-g2-standard-32")
    assert p.ssd.read_time(99_094_528) == pytest.approx(0.1165, rel=1e-6)
    assert 2 * p.compute.ffn_time(99_090_432) == pytest.approx(0.0403, rel=1e-6)


def test_round_trip(tmp_path) -> None:
    p = load_profile("nvme-desktop")
    p.name = "mine"
    p.ssd.channels = 7
    out = p.save(tmp_path / "hw.json")
    q = load_profile(out)
    assert q.to_dict() == p.to_dict()


@pytest.mark.parametrize(
    ("section", "name", "value", "needle"),
    [
        ("ssd", "channels", 0, "ssd.channels"),
        ("ssd", "bandwidth_bytes_per_s", -1, "ssd.bandwidth_bytes_per_s"),
        ("ssd", "chunk_bytes", 1.5, "ssd.chunk_bytes"),
        ("compute", "ffn_bytes_per_s", "fast", "compute.ffn_bytes_per_s"),
        ("compute", "workers", 0, "compute.workers"),
        ("memory", "ram_bytes", 0, "memory.ram_bytes"),
    ],
)
def test_bad_field_is_named(tmp_path, section, name, value, needle) -> None:
    d = load_profile("ci-tiny").to_dict()
    d[section][name] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(BadInput, match=needle.replace(".", r"\.")):
        load_profile(path)


def test_missing_field_and_unknown_name(tmp_path) -> None:
    d = load_profile("ci-tiny").to_dict()
    del d["ssd"]["latency_s"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(BadInput, match=r"ssd\.latency_s"):
        load_profile(path)
    with pytest.raises(BadInput, match="unknown hardware profile"):
        load_profile("no-such-machine")
    with pytest.raises(BadInput):
        HardwareProfile.from_dict([1, 2])
