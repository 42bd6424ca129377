"""Prometheus metrics: scraped over HTTP from ``kumo-listener serve --metrics``
after a known number of connections, messages and refusals, and registered in
a program's own ``prometheus_client`` registry from an embedded server."""

from __future__ import annotations

import smtplib
import urllib.request

import kumo_listener as kumo
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from support import RawClient, free_port, wait_until

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
