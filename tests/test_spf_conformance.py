"""The OpenSPF conformance suite (RFC 7208 tests, tests/data/rfc7208-tests.yml
as pyspf 2.0.14 ships it) against our SPF: each scenario's zone served by
the tests' DNS server, its client address given by XCLIENT, its HELO and
MAIL FROM sent over SMTP with ``spf = "annotate"``, the result read from
the message's ``authentication_results``."""

from __future__ import annotations

import contextlib
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kumo_listener as kumo
import pytest
import yaml
from dns_zone import ZoneServer, txt_strings
from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSError, DNSRecord

SUITE = Path(__file__).parent / "data" / "rfc7208-tests.yml"

# Where mail-auth 0.13.3 (and hickory under it) departs from RFC 7208 as the
# suite reads it, by scenario; each an expected failure, strict: a fix shows.
_GAPS: dict[str, list[str]] = {
    (
        "Lenient syntax: mail-auth 0.13.3 accepts a malformed record or "
        "mechanism instead of permerror"
    ): [
        "non-ascii-policy",
        "non-ascii-mech",
        "control-char-policy",
        "badip4",
        "invalid-domain",
        "a-bad-cidr4",
        "a-bad-cidr6",
        "a-dual-cidr-ip4-err",
        "mx-bad-cidr4",
        "mx-bad-cidr6",
        "cidr4-33",
        "cidr4-032",
        "cidr6-129",
        "redirect-syntax-error",
        "invalid-modifier",
        "empty-modifier-name",
        "exp-syntax-error",
        "a-numeric",
        "a-numeric-toplabel",
        "a-only-toplabel",
        "a-only-toplabel-trailing-dot",
        "mx-numeric-top-label",
    ],
    (
        "mail-auth 0.13.3 uses the first of several SPF records instead of permerror (RFC 7208 4.5)"
    ): [
        "multitxt1",
        "multitxt2",
    ],
    (
        "mail-auth 0.13.3 gives permerror for a valid record (a modifier name's "
        "charset, a mechanism after redirect=, a domain with ':')"
    ): [
        "modifier-charset-good",
        "redirect-after-mechanisms2",
        "a-colon-domain",
        "a-colon-domain-ip4mapped",
        "mx-colon-domain",
        "mx-colon-domain-ip4mapped",
    ],
    (
        "mail-auth 0.13.3/hickory: a target name that is not a valid DNS name "
        "is a lookup error, temperror, instead of permerror/fail"
    ): [
        "invalid-domain-empty-label",
        "invalid-domain-long",
        "invalid-domain-long-via-macro",
        "a-bad-domain",
        "a-null",
        "a-bad-toplabel",
        "mx-bad-domain",
        "mx-null",
        "mx-bad-toplab",
        "macro-mania-in-domain",
        "p-macro-multiple",
        "invalid-hello-macro",
        "hello-domain-literal",
    ],
    (
        "mail-auth 0.13.3 mixes address families: ip6: matches an IPv4 client, "
        "exists: looks up the IPv6 client's AAAA instead of A"
    ): [
        "exists-ip6only",
        "cidr6-0-ip4",
        "cidr6-ip4",
    ],
    (
        "mail-auth 0.13.3's ptr mechanism does not validate the names the test "
        "zone serves (the DNS answers are right)"
    ): [
        "ptr-match-implicit",
        "ptr-match-ip6",
    ],
    "mail-auth 0.13.3 has no void-lookup limit (RFC 7208 4.6.4)": ["void-over-limit"],
    ("mail-auth 0.13.3 gives permerror, not none, for a domain literal HELO/MAIL FROM domain"): [
        "helo-domain-literal",
        "domain-literal",
    ],
}
KNOWN_GAPS: dict[str, str] = {name: why for why, names in _GAPS.items() for name in names}


class SuiteZone:
    """A scenario's ``zonedata``, read as pyspf's test runner reads it: names
    not in it do not exist (``error.*`` ones time out); ``TIMEOUT`` in a
    name's list, or as a record's value, times out the types not answered
    before it; an ``SPF`` record is also a ``TXT`` one unless the name has
    ``TXT`` records; ``NONE`` is no record; a ``CNAME`` is followed once."""

    def __init__(self) -> None:
        self.records: dict[str, list[Any]] = {}

    def load(self, zonedata: dict[str, list[Any]]) -> None:
        self.records = {}
        for name, records in zonedata.items():
            kinds = {next(iter(r)) for r in records if isinstance(r, dict)}
            extra = []
            if "TXT" not in kinds:
                extra = [{"TXT": r["SPF"]} for r in records if isinstance(r, dict) and "SPF" in r]
            self.records[name.lower().rstrip(".")] = list(records) + extra

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        qname = str(request.q.qname).lower().rstrip(".")
        kind = QTYPE[request.q.qtype]
        reply = request.reply()
        if qname not in self.records:
            if qname.startswith("error."):
                raise DNSError("no answer, on purpose")
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        self.answer_name(reply, qname, kind, follow=True)
        if not reply.rr:
            soa = SOA("ns.test.", "hostmaster.test.", (1, 3600, 600, 86400, 60))
            reply.add_auth(RR("test.", QTYPE.SOA, rdata=soa, ttl=60))
        return reply

    def answer_name(self, reply: DNSRecord, name: str, kind: str, follow: bool) -> None:
        answered = False
        for record in self.records.get(name, []):
            if record == "TIMEOUT":
                if not answered:
                    raise DNSError("no answer, on purpose")
                continue
            ((record_kind, value),) = record.items()
            if value == "TIMEOUT" and record_kind == kind:
                raise DNSError("no answer, on purpose")
            if value in ("TIMEOUT", "NONE") or record_kind not in (kind, "CNAME"):
                continue
            answered = True
            reply.add_answer(
                RR(name, getattr(QTYPE, record_kind), rdata=rdata(record_kind, value), ttl=60)
            )
            if record_kind == "CNAME" and kind != "CNAME" and follow:
                self.answer_name(reply, value.lower().rstrip("."), kind, follow=False)


def rdata(kind: str, value: Any) -> Any:
    if kind in ("TXT", "SPF"):
        parts = value if isinstance(value, list) else [value]
        strings = [s for part in parts for s in (txt_strings(part) if part else [b""])]
        return TXT(strings or [b""])
    if kind == "MX":
        return MX(value[1], value[0])
    return {"A": A, "AAAA": AAAA, "PTR": PTR, "CNAME": CNAME}[kind](value)


def scenarios() -> Iterator[Any]:
    seen: set[str] = set()
    for document in yaml.safe_load_all(SUITE.read_text()):
        for name, scenario in document["tests"].items():
            # Two sections have a scenario of the same name: the second is `name-2`.
            name = f"{name}-2" if name in seen else name
            seen.add(name)
            marks = []
            if name in KNOWN_GAPS:
                marks.append(pytest.mark.xfail(reason=KNOWN_GAPS[name], strict=True))
            yield pytest.param(scenario, document.get("zonedata") or {}, id=name, marks=marks)


@pytest.fixture(scope="module")
def suite_dns() -> Iterator[tuple[ZoneServer, SuiteZone]]:
    zone = SuiteZone()
    server = ZoneServer(zone)
    yield server, zone
    server.stop()
    with contextlib.suppress(ValueError):
        kumo.configure_dns([])


@pytest.fixture(scope="module")
def suite_listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, list]]:
    """One listener for every scenario: XCLIENT allowed, SPF annotated."""
    seen: list[list[dict[str, Any]]] = []
    policy = kumo.Policy()

    @policy.on("smtp_server_message_received")
    def take(msg: kumo.Message, conn_meta: kumo.ConnectionMeta) -> None:
        seen.append(msg.authentication_results)

    maildir = tmp_path_factory.mktemp("spf") / "maildir"
    with kumo.Server(policy=policy, maildir=maildir, shutdown_grace=5) as server:
        listener = server.start_esmtp_listener(
            listen="127.0.0.1:0",
            hostname="mx.test.example",
            allow_xclient=True,
            relay_hosts=["0.0.0.0/0", "::/0"],
            authentication={"spf": "annotate"},
        )
        yield listener.address, seen


def xclient_address(host: str) -> str:
    return f"IPV6:{host}" if ":" in host else host


def spf_over_smtp(address: Any, scenario: dict[str, Any], seen: list) -> str | None:
    """The SPF result of the scenario's MAIL FROM identity, or None when our
    SMTP server refuses its HELO name or address (the reply is then skipped)."""
    with smtplib.SMTP(address[0], address[1], timeout=30) as client:
        client.ehlo("proxy.test")
        code, text = client.docmd("XCLIENT", f"ADDR={xclient_address(scenario['host'])}")
        assert code == 220, (code, text)
        code, text = client.docmd("EHLO", scenario.get("helo") or "")
        if code != 250:
            pytest.skip(f"our server refuses this HELO over SMTP: {code} {text!r}")
        code, text = client.docmd("MAIL", f"FROM:<{scenario.get('mailfrom') or ''}>")
        if code != 250:
            pytest.skip(
                f"our server refuses MAIL FROM:<{scenario.get('mailfrom')}>: {code} {text!r}"
            )
        code, text = client.docmd("RCPT", "TO:<bob@example.net>")
        assert code == 250, (code, text)
        before = len(seen)
        code, text = client.data(b"Subject: SPF\r\n\r\nscenario\r\n")
        assert code == 250, (code, text)
    results = seen[before]
    (spf,) = [r for r in results if r["method"] == "spf" and "smtp.mailfrom" in r["props"]]
    return spf["result"]


@pytest.mark.parametrize(("scenario", "zonedata"), list(scenarios()))
def test_openspf_scenario(scenario, zonedata, suite_dns, suite_listener):
    dns_server, zone = suite_dns
    zone.load(zonedata)
    # A new resolver: an empty cache for this scenario's zone.
    kumo.configure_dns([dns_server.address], timeout=0.5, attempts=1, budget=5.0)
    address, seen = suite_listener
    expected = scenario["result"]
    acceptable = expected if isinstance(expected, list) else [expected]
    got = spf_over_smtp(address, scenario, seen)
    assert got in acceptable, f"{scenario.get('description')}: {got} not in {acceptable}"
