"""Overrides files being replaced under a running server (README: Deployment)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import kumo_listener as kumo
import pytest


def greeting(listen, raw) -> tuple[int, list[str]]:
    return raw(listen).reply()


def test_a_half_written_overrides_file_fails_each_connection_with_421(
    policy, listen, raw, kumo_log, tmp_path: Path
):
    """What the README's Deployment section describes: no memoize, the file
    read on every connection."""
    overrides = tmp_path / "listener_params.toml"
    overrides.write_text('hostname = "mx.good.example"\n')

    @policy.on("smtp_server_get_dynamic_parameters")
    def dynamic(listener, conn_meta):
        return kumo.serde.toml_load(overrides)

    address = listen()
    assert greeting(address, raw) == (220, ["mx.good.example ESMTP kumo_listener"])
    overrides.write_text('hostname = "mx.new.exa')  # cut short
    code, lines = greeting(address, raw)
    assert code == 421 and lines[0].startswith("4.3.0 "), lines
    assert "TOMLDecodeError" in kumo_log.text
    overrides.write_text("hostname = 7\n")  # well-formed, invalid
    code, lines = greeting(address, raw)
    assert code == 421 and lines[0].startswith("4.3.0 "), lines
    assert "hostname: expected a string" in kumo_log.text
    overrides.write_text('hostname = "mx.new.example"\n')
    assert greeting(address, raw) == (220, ["mx.new.example ESMTP kumo_listener"])


def test_memoize_stale_on_error_keeps_the_last_good_overrides(
    policy, listen, raw, kumo_log, tmp_path: Path
):
    overrides = tmp_path / "listener_params.toml"
    overrides.write_text('hostname = "mx.good.example"\n')
    load = kumo.memoize(
        lambda path: kumo.ListenerParams(kumo.serde.toml_load(path)),
        name="listener_params",
        ttl=0.05,
        capacity=4,
        stale_on_error=True,
    )

    @policy.on("smtp_server_get_dynamic_parameters")
    def dynamic(listener, conn_meta):
        return load(overrides)

    address = listen()
    assert greeting(address, raw) == (220, ["mx.good.example ESMTP kumo_listener"])
    for broken in ('hostname = "mx.new.exa', "hostname = 7\n"):
        overrides.write_text(broken)
        time.sleep(0.1)
        assert greeting(address, raw) == (220, ["mx.good.example ESMTP kumo_listener"])
    assert "memoize 'listener_params': keeping the last good result" in kumo_log.text
    assert "hostname: expected a string" in kumo_log.text
    overrides.write_text('hostname = "mx.new.example"\n')
    time.sleep(0.1)
    assert greeting(address, raw) == (220, ["mx.new.example ESMTP kumo_listener"])


def test_memoize_stale_on_error(caplog: pytest.LogCaptureFixture):
    results: list[object] = ["one", RuntimeError("broken"), "two"]

    def load(key: str) -> object:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return f"{key}:{result}"

    cached = kumo.memoize(load, name="load", ttl=0.05, capacity=4, stale_on_error=True)
    assert cached("a") == "a:one"
    time.sleep(0.1)
    assert cached("a") == "a:one"  # fn failed: the last good result, kept another ttl
    assert "memoize 'load': keeping the last good result: broken" in caplog.text
    assert cached("a") == "a:one"  # within that ttl: not called
    time.sleep(0.1)
    assert cached("a") == "a:two"
    results.append(RuntimeError("no previous"))
    with pytest.raises(RuntimeError, match="no previous"):
        cached("b")  # nothing to fall back on
    strict = kumo.memoize(load, name="strict", ttl=0.01, capacity=4)
    results.extend(["three", RuntimeError("strict")])
    assert strict("c") == "c:three"
    time.sleep(0.05)
    with pytest.raises(RuntimeError, match="strict"):
        strict("c")


def test_memoize_stale_on_error_async():
    outcomes: list[object] = ["one", ValueError("broken")]

    async def fetch(key: str) -> object:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    cached = kumo.memoize(fetch, name="fetch", ttl=0.01, capacity=4, stale_on_error=True)

    async def main() -> list[object]:
        first = await cached("k")
        await asyncio.sleep(0.05)
        return [first, await cached("k")]

    assert asyncio.run(main()) == ["one", "one"]
