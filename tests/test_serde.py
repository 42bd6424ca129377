"""``kumo.serde.toml_load``/``json_load``: parsed once per version of a file,
a changed or replaced file seen by the next call, each caller its own copy."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import kumo_listener as kumo
import pytest
from kumo_listener import serde

SETTLED = time.time() - 3600


def write(path: Path, text: str, *, modified: float = SETTLED) -> None:
    path.write_text(text)
    os.utime(path, (modified, modified))


@pytest.fixture
def counted_parses(monkeypatch):
    """How often each loader really parses. A file counts as settled at
    once (writing one sets its change time to now, which no test can set back)."""
    monkeypatch.setattr(serde, "SETTLING_SECONDS", 0.0)
    counts = {"toml": 0, "json": 0}
    toml_parse, json_parse = serde._parse_toml, serde._parse_json

    def toml(data: bytes):
        counts["toml"] += 1
        return toml_parse(data)

    def json_(data: bytes):
        counts["json"] += 1
        return json_parse(data)

    # The parser is part of the cache's key: a fresh one per test.
    monkeypatch.setattr(serde, "_parse_toml", toml)
    monkeypatch.setattr(serde, "_parse_json", json_)
    return counts


def test_an_unchanged_file_is_parsed_once(tmp_path, counted_parses):
    path = tmp_path / "p.toml"
    write(path, '[via."10.0.0.1"]\nhostname = "mx.example"\n')
    for _ in range(5):
        assert kumo.serde.toml_load(path) == {"via": {"10.0.0.1": {"hostname": "mx.example"}}}
    assert counted_parses["toml"] == 1
    write(tmp_path / "p.json", '{"hostname": "mx.example"}')
    for _ in range(3):
        assert kumo.serde.json_load(str(tmp_path / "p.json")) == {"hostname": "mx.example"}
    assert counted_parses["json"] == 1


def test_what_a_caller_changes_is_not_what_the_next_one_gets(tmp_path, counted_parses):
    path = tmp_path / "p.toml"
    write(path, 'relay_hosts = ["10.0.0.0/8"]\n[via."10.0.0.1"]\nhostname = "mx.example"\n')
    first = kumo.serde.toml_load(path)
    first["via"]["10.0.0.1"]["hostname"] = "changed.example"
    first["relay_hosts"].append("192.0.2.0/24")
    first["new"] = 1
    assert kumo.serde.toml_load(path) == {
        "relay_hosts": ["10.0.0.0/8"],
        "via": {"10.0.0.1": {"hostname": "mx.example"}},
    }
    assert counted_parses["toml"] == 1


def test_a_file_rewritten_in_place_is_read_again(tmp_path, counted_parses):
    path = tmp_path / "p.toml"
    write(path, 'hostname = "one.example"\n')
    assert kumo.serde.toml_load(path)["hostname"] == "one.example"
    write(path, 'hostname = "two.example"\n', modified=SETTLED + 1)  # same size
    assert kumo.serde.toml_load(path)["hostname"] == "two.example"
    assert counted_parses["toml"] == 2


def test_a_file_replaced_by_rename_is_read_again(tmp_path, counted_parses):
    path = tmp_path / "p.json"
    write(path, '{"hostname": "one.example"}')
    assert kumo.serde.json_load(path)["hostname"] == "one.example"
    replacement = tmp_path / "p.json.new"
    write(replacement, '{"hostname": "two.example"}')
    os.replace(replacement, path)
    assert kumo.serde.json_load(path)["hostname"] == "two.example"


def test_a_file_just_written_is_read_each_time_until_it_settles(tmp_path, counted_parses):
    serde.SETTLING_SECONDS = 2.0  # restored by the fixture
    path = tmp_path / "p.toml"
    path.write_text('hostname = "fresh.example"\n')
    for _ in range(3):
        assert kumo.serde.toml_load(path)["hostname"] == "fresh.example"
    assert counted_parses["toml"] == 3, "a write in the same timestamp tick could go unseen"


def test_a_missing_or_broken_file_raises_and_is_not_kept(tmp_path, counted_parses):
    with pytest.raises(FileNotFoundError):
        kumo.serde.toml_load(tmp_path / "absent.toml")
    path = tmp_path / "p.toml"
    write(path, "hostname = \n")
    with pytest.raises(ValueError):  # tomllib.TOMLDecodeError
        kumo.serde.toml_load(path)
    write(path, 'hostname = "fixed.example"\n')
    assert kumo.serde.toml_load(path)["hostname"] == "fixed.example"


def test_a_file_rewritten_while_being_read_is_never_half_read(tmp_path, counted_parses):
    """A writer rewrites the file in place (truncate, then write) as fast as
    it can; every load parses a whole version, or raises for a half one,
    and a half one is never served later from the cache."""
    path = tmp_path / "p.json"
    versions = [f'{{"hostname": "v{n}.example", "pad": "{"x" * 4000}"}}' for n in range(2)]
    write(path, versions[0])
    stop = threading.Event()

    def rewrite() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            with open(path, "w") as file:
                file.write(versions[n % 2])

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        loaded = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                value = kumo.serde.json_load(path)
            except ValueError:
                continue  # a half-written version: an error, as without a cache
            assert value["hostname"] in ("v0.example", "v1.example")
            loaded += 1
    finally:
        stop.set()
        writer.join()
    assert loaded > 0
    assert kumo.serde.json_load(path) == json.loads(path.read_text())
