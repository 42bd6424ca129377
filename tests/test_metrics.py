"""Prometheus metrics: scraped over HTTP from ``kumo-listener serve --metrics``
after a known number of connections, messages and refusals (and while idle
connections hold its endpoint), and registered in a program's own
``prometheus_client`` registry from an embedded server."""

from __future__ import annotations

import smtplib
import socket
import time
import urllib.request

import kumo_listener as kumo
import pytest
from kumo_listener.metrics import MetricsServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from support import RawClient, free_port, proc_status, wait_until

BODY = b"Subject: m\r\n\r\nbody\r\n"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_serve_metrics_over_http(serve):
    port = free_port()
    served = serve("--listen", "127.0.0.1:0", "--sink", "discard", "--metrics", f"127.0.0.1:{port}")
    with smtplib.SMTP(*served.address, timeout=10) as client:
        client.sendmail("a@b.example", ["c@d.example", "e@f.example"], BODY)
        client.sendmail("a@b.example", ["c@d.example"], BODY)
    refused = RawClient(served.address)
    assert refused.reply()[0] == 220
    assert refused.command("MAIL FROM:<a@b.example>")[0] == 503
    assert refused.command("BOGUS")[0] == 500
    listener = (("listener", "127.0.0.1:0"),)

    def scrape() -> dict:
        url = f"http://127.0.0.1:{port}/metrics"
        return samples(urllib.request.urlopen(url, timeout=10).read().decode())

    # The smtplib session ends just after its QUIT was answered.
    def one_active() -> dict | None:
        values = scrape()
        return values if values[("kumo_listener_connections_active", listener)] == 1 else None

    values = wait_until(one_active, within=5, what=lambda: f"one active connection: {scrape()}")
    assert values[("kumo_listener_connections_total", listener)] == 2
    assert values[("kumo_listener_messages_received_total", listener)] == 3
    assert values[("kumo_listener_rejections_total", (("code", "500"), *listener))] == 1
    assert values[("kumo_listener_rejections_total", (("code", "503"), *listener))] == 1
    assert ("kumo_listener_received_bytes_total", listener) in values
    calls = (("event", "smtp_server_get_dynamic_parameters"),)
    assert ("kumo_listener_policy_call_seconds_count", calls) not in values, "no handler, no call"
    assert served.stop() == 0


def test_an_embedded_server_registers_its_collector(policy, maildir, raw):
    @policy.on("smtp_server_rcpt_to")
    def refuse(recipient, meta):
        if recipient.user == "nobody":
            raise kumo.Reject(550, "5.1.1 no such user")

    registry = CollectorRegistry()
    with kumo.Server(policy=policy, maildir=maildir) as server:
        registry.register(server.metrics_collector())
        address = server.start_esmtp_listener(listen="127.0.0.1:0").address
        with smtplib.SMTP(*address, timeout=10) as client:
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                client.sendmail("a@b.example", ["nobody@d.example"], BODY)
            client.sendmail("a@b.example", ["c@d.example"], BODY)
        listener = {"listener": "127.0.0.1:0"}
        get = registry.get_sample_value
        assert get("kumo_listener_rejections_total", {**listener, "code": "550"}) == 1
        assert get("kumo_listener_messages_received_total", listener) == 1
        calls = {"event": "smtp_server_rcpt_to"}
        assert get("kumo_listener_policy_call_seconds_count", calls) == 2
        assert get("kumo_listener_policy_call_seconds_bucket", {**calls, "le": "+Inf"}) == 2
        assert get("kumo_listener_policy_call_seconds_sum", calls) > 0


def test_idle_connections_to_the_metrics_endpoint_hold_no_thread_and_no_scrape_out(serve):
    port = free_port()
    served = serve("--listen", "127.0.0.1:0", "--sink", "discard", "--metrics", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/metrics"
    assert urllib.request.urlopen(url, timeout=10).status == 200
    threads_before = int(proc_status("Threads", served.process.pid)[0])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(300)]
    try:
        for sock in idle[:100]:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the end of the request
        started = time.monotonic()
        scraped = urllib.request.urlopen(url, timeout=10).read().decode()
        assert time.monotonic() - started < 2
        assert ("kumo_listener_connections_total", (("listener", "127.0.0.1:0"),)) in samples(
            scraped
        )
        threads = int(proc_status("Threads", served.process.pid)[0])
        assert threads <= threads_before + 1, (threads_before, threads)

        # Past 64 open at once, those waiting longest were closed.
        def closed(sock: socket.socket) -> bool:
            sock.settimeout(0.01)
            try:
                return sock.recv(1) == b""
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True

        assert sum(map(closed, idle)) >= 300 - 64
    finally:
        for sock in idle:
            sock.close()
    assert served.stop() == 0


def test_the_metrics_endpoint_closes_a_connection_that_sends_no_request_in_time():
    registry = CollectorRegistry()
    server = MetricsServer(registry, "127.0.0.1", 0, read_timeout=0.3, max_connections=2)
    try:
        silent = socket.create_connection(server.address, timeout=5)
        started = time.monotonic()
        assert silent.recv(1) == b""
        assert 0.2 < time.monotonic() - started < 3
        with socket.create_connection(server.address, timeout=5) as client:
            client.sendall(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.recv(4096).startswith(b"HTTP/1.1 404 Not Found\r\n")
        with socket.create_connection(server.address, timeout=5) as client:
            client.sendall(b"HEAD /metrics HTTP/1.1\r\n\r\n")
            head = client.recv(4096)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n"), head
        silent.close()
    finally:
        server.close()
