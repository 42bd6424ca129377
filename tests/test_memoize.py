"""``kumo.memoize`` under load and failure: one populate at a time per key,
the last good value served while a refresh runs or fails, a populate
timeout, invalidation (per key, per function, every function)."""

from __future__ import annotations

import asyncio
import threading
import time

import kumo_listener as kumo
import pytest
from support import in_threads


class Slow:
    """A loader that takes `delay` seconds and counts its calls."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, key: str) -> str:
        with self.lock:
            self.calls += 1
            number = self.calls
        time.sleep(self.delay)
        return f"{key}:{number}"


def test_concurrent_callers_share_one_populate():
    loader = Slow(0.2)
    cached = kumo.memoize(loader, name="slow", ttl=0.3, capacity=4)
    assert in_threads(20, lambda: cached("k")) == ["k:1"] * 20
    assert loader.calls == 1
    time.sleep(0.35)
    # Expired under load: one refresh, the others get the last good value at once.
    started = time.monotonic()
    results = in_threads(20, lambda: (cached("k"), time.monotonic() - started))
    assert loader.calls == 2
    values = [value for value, _ in results]
    assert values.count("k:2") == 1 and values.count("k:1") == 19, values
    waited = sorted(took for _, took in results)
    assert waited[18] < 0.1, "those with a last good value did not wait"


def test_async_callers_share_one_populate():
    calls = []

    async def fetch(key: str) -> str:
        calls.append(key)
        await asyncio.sleep(0.1)
        return key.upper()

    cached = kumo.memoize(fetch, name="fetch", ttl=60, capacity=4)

    async def main() -> list[str]:
        return await asyncio.gather(*(cached("k") for _ in range(50)))

    assert asyncio.run(main()) == ["K"] * 50
    assert calls == ["k"]


def test_a_populate_that_fails_is_shared_and_not_cached():
    attempts = []

    async def broken(key: str) -> str:
        attempts.append(key)
        await asyncio.sleep(0.05)
        raise OSError("down")

    cached = kumo.memoize(broken, name="broken", ttl=60, capacity=4)

    async def main() -> list:
        return await asyncio.gather(*(cached("k") for _ in range(5)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(result, OSError) for result in results)
    assert attempts == ["k"]
    asyncio.run(main())
    assert attempts == ["k", "k"], "exceptions are not cached"


def test_an_async_populate_times_out_and_the_last_good_value_is_kept():
    hang = asyncio.Event()
    outcomes: list[str] = []

    async def fetch(key: str) -> str:
        if outcomes:
            await hang.wait()
        outcomes.append(key)
        return f"{key}:{len(outcomes)}"

    cached = kumo.memoize(fetch, name="t", ttl=0.05, capacity=4, populate_timeout="100ms")
    strict = kumo.memoize(fetch, name="strict", ttl=60, capacity=4, populate_timeout=0.1)
    stale = kumo.memoize(
        fetch, name="s", ttl=0.05, capacity=4, populate_timeout=0.1, stale_on_error=True
    )

    async def main() -> None:
        assert await cached("a") == "a:1"
        await asyncio.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"memoize 't': no result within 0\.1s"):
            await cached("a")
        assert time.monotonic() - started < 0.5
        with pytest.raises(TimeoutError):
            await strict("b")

    asyncio.run(main())
    outcomes.clear()

    async def with_stale() -> None:
        assert await stale("c") == "c:1"
        await asyncio.sleep(0.1)
        assert await stale("c") == "c:1"

    asyncio.run(with_stale())


def test_a_def_populate_times_out_on_its_thread():
    loader = Slow(0.5)
    cached = kumo.memoize(loader, name="slow", ttl=60, capacity=4, populate_timeout=0.1)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        cached("k")
    assert time.monotonic() - started < 0.3
    # Still the one populate running: no second one starts meanwhile.
    with pytest.raises(TimeoutError):
        cached("k")
    assert loader.calls == 1
    time.sleep(0.5)
    assert cached("k") == "k:1", "it stored its result when it returned"


def test_the_last_good_value_is_served_while_a_def_refresh_runs_or_fails():
    results: list[object] = ["one", RuntimeError("broken"), "two"]
    gate = threading.Event()

    def load(key: str) -> str:
        gate.wait(5)
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return f"{key}:{result}"

    cached = kumo.memoize(load, name="load", ttl=0.05, capacity=4, stale_on_error=True)
    gate.set()
    assert cached("a") == "a:one"
    time.sleep(0.1)
    gate.clear()
    refresh = threading.Thread(target=cached, args=("a",))
    refresh.start()
    time.sleep(0.05)
    started = time.monotonic()
    assert cached("a") == "a:one", "the refresh is running"
    assert time.monotonic() - started < 0.05
    gate.set()
    refresh.join(5)
    assert cached("a") == "a:one", "the refresh failed: kept"
    time.sleep(0.1)
    assert cached("a") == "a:two"


def test_invalidation_per_key_per_function_and_everywhere():
    first, second = Slow(0), Slow(0)
    one = kumo.memoize(first, name="one", ttl=60, capacity=4)
    two = kumo.memoize(second, name="two", ttl=60, capacity=4)
    assert (one("a"), one("b"), two("a")) == ("a:1", "b:2", "a:1")
    one.invalidate("a")  # type: ignore[attr-defined]
    assert (one("a"), one("b")) == ("a:3", "b:2")
    one.invalidate_all()  # type: ignore[attr-defined]
    assert (one("a"), one("b"), two("a")) == ("a:4", "b:5", "a:1")
    kumo.invalidate_memoized()
    assert (one("a"), two("a")) == ("a:6", "a:2")


def test_a_result_fetched_before_an_invalidation_is_not_fresh_after_it():
    gate = threading.Event()
    calls = []

    def load(key: str) -> int:
        calls.append(key)
        if len(calls) == 1:
            gate.wait(5)
        return len(calls)

    cached = kumo.memoize(load, name="racy", ttl=60, capacity=4)
    fetching = threading.Thread(target=cached, args=("k",))
    fetching.start()
    time.sleep(0.05)
    cached.invalidate("k")  # type: ignore[attr-defined]
    kumo.invalidate_memoized()
    gate.set()
    fetching.join(5)
    assert cached("k") == 2, "fetched again: the first result predates the invalidation"
