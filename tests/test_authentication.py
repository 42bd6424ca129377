"""Message authentication at reception (the ``authentication`` parameter)
against independent parts: an authoritative DNS server of the tests
(dnslib, tests/dns_zone.py) and messages signed by dkimpy, sent over SMTP
by smtplib."""

from __future__ import annotations

import base64
import contextlib
import smtplib
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import dkim
import kumo_listener as kumo
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dns_zone import SERVFAIL, TIMEOUT, ZoneServer
from support import require_tool, run_kumo, swaks, wait_until

HOSTNAME = "mx.test.example"


@pytest.fixture(scope="module")
def test_dns() -> Iterator[ZoneServer]:
    server = ZoneServer()
    # Short: the names that never answer must give temperror within a test's patience.
    kumo.configure_dns([server.address], timeout=0.5, attempts=1, budget=3.0)
    yield server
    server.stop()
    # Back to the system's resolver (a machine without /etc/resolv.conf keeps ours).
    with contextlib.suppress(ValueError):
        kumo.configure_dns([])


@pytest.fixture
def zone(test_dns: ZoneServer):
    test_dns.zone.clear()
    # Each test starts with an empty resolver cache, since the zone changes.
    kumo.configure_dns([test_dns.address], timeout=0.5, attempts=1, budget=3.0)
    return test_dns.zone


class Keys:
    """A DKIM key pair and its DNS record, RSA or Ed25519, as dkimpy wants them."""

    def __init__(self, kind: str = "rsa", bits: int = 2048) -> None:
        if kind == "rsa":
            key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
            self.private = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
            public = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            self.record = f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"
            self.algorithm = b"rsa-sha256"
        else:
            key = ed25519.Ed25519PrivateKey.generate()
            seed = key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            public = key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            self.private = base64.b64encode(seed)
            self.record = f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}"
            self.algorithm = b"ed25519-sha256"

    def sign(
        self,
        message: bytes,
        domain: str,
        selector: str = "s1",
        canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
        **options: Any,
    ) -> bytes:
        header = dkim.sign(
            message,
            selector.encode(),
            domain.encode(),
            self.private,
            canonicalize=canonicalize,
            signature_algorithm=options.pop("algorithm", self.algorithm),
            include_headers=[b"from", b"to", b"subject", b"date"],
            **options,
        )
        return header + message


# Big enough for a 2048-bit key's record to need several strings.
RSA_2048 = Keys("rsa", 2048)
RSA_1024 = Keys("rsa", 1024)
ED25519 = Keys("ed25519")


def message(sender: str = "alice@example.com", body: str = "Hello.\r\n") -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: bob@example.net\r\nSubject: test\r\n"
        f"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n{body}"
    ).encode()


@pytest.fixture
def received(policy: kumo.Policy) -> list[dict[str, Any]]:
    """What ``smtp_server_message_received`` saw of each message."""
    seen: list[dict[str, Any]] = []

    @policy.on("smtp_server_message_received")
    def take(msg: kumo.Message, conn_meta: kumo.ConnectionMeta) -> None:
        seen.append(
            {
                "results": msg.authentication_results,
                "data": msg.data,
                "conn": conn_meta.get_meta("authentication_results"),
            }
        )

    return seen


def results_of(seen: dict[str, Any], method: str) -> list[dict[str, Any]]:
    return [result for result in seen["results"] if result["method"] == method]


def header_of(data: bytes) -> str:
    """Our ``Authentication-Results:`` field, unfolded."""
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    fields = head.replace("\r\n\t", " ").replace("\r\n ", " ").split("\r\n")
    ours = [f for f in fields if f.startswith(f"Authentication-Results: {HOSTNAME}")]
    assert len(ours) == 1, fields
    return ours[0]


def send(
    address: tuple[str, int],
    data: bytes,
    sender: str = "alice@example.com",
    helo: str = "client.example.com",
    source: str = "127.0.0.1",
) -> Any:
    """Send over smtplib; the error smtplib raised, or None."""
    with smtplib.SMTP(address[0], address[1], timeout=20, source_address=(source, 0)) as client:
        client.ehlo(helo)
        try:
            client.sendmail(sender, ["bob@example.net"], data)
        except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as error:
            return error
    return None


def spf_zone(zone) -> None:
    zone.txt("example.com", "v=spf1 ip4:127.0.0.1 -all")
    zone.txt("client.example.com", "v=spf1 ip4:127.0.0.1 -all")
    zone.txt("forged.example", "v=spf1 ip4:192.0.2.1 -all")
    zone.txt("soft.example", "v=spf1 ~all")
    zone.misbehave(["slow.example", "_dmarc.slow.example"], TIMEOUT)
    zone.misbehave(["broken.example", "_dmarc.broken.example"], SERVFAIL)


ALL_ANNOTATE = {"spf": "annotate", "dkim": "annotate", "dmarc": "annotate", "arc": "annotate"}


def test_annotate_writes_the_header_and_the_results_below_our_received(zone, listen, received):
    spf_zone(zone)
    zone.txt("s1._domainkey.example.com", RSA_2048.record)
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    address = listen(authentication=ALL_ANNOTATE)
    assert send(address, RSA_2048.sign(message(), "example.com")) is None
    wait_until(lambda: received)
    seen = received[0]
    data = seen["data"]
    # Ours, in this order: Received, Authentication-Results, then the message.
    assert data.startswith(b"Received: ")
    lines = data.split(b"\r\n")
    first_field_after_received = next(
        line for line in lines[1:] if line and not line.startswith((b" ", b"\t"))
    )
    assert first_field_after_received.startswith(b"Authentication-Results: " + HOSTNAME.encode())
    header = header_of(data)
    assert "spf=pass" in header and "smtp.mailfrom=alice@example.com" in header
    assert header.index("smtp.mailfrom") < header.index("smtp.helo=client.example.com")
    assert "dkim=pass" in header and "header.d=example.com header.s=s1" in header
    assert "dmarc=pass" in header and "policy.dmarc=reject header.from=example.com" in header
    assert "arc=none" in header
    assert [r["result"] for r in results_of(seen, "spf")] == ["pass", "pass"]
    (dkim_result,) = results_of(seen, "dkim")
    assert dkim_result["result"] == "pass"
    assert dkim_result["props"]["header.d"] == "example.com"
    assert dkim_result["props"]["header.a"] == "rsa-sha256"
    assert set(dkim_result) == {"method", "result", "reason", "props"}
    assert results_of(seen, "dmarc")[0]["result"] == "pass"
    # The connection's own results (SPF) are on its metadata.
    assert [r["method"] for r in seen["conn"]] == ["spf", "spf"]


@pytest.mark.parametrize(
    ("keys", "canonicalize"),
    [
        (RSA_2048, (b"relaxed", b"relaxed")),
        (RSA_2048, (b"simple", b"simple")),
        (RSA_1024, (b"relaxed", b"simple")),
        (ED25519, (b"relaxed", b"relaxed")),
    ],
    ids=["rsa2048-relaxed", "rsa2048-simple", "rsa1024", "ed25519"],
)
def test_dkim_signatures_of_dkimpy_pass(zone, listen, received, keys, canonicalize):
    spf_zone(zone)
    zone.txt("s1._domainkey.example.com", keys.record)
    address = listen(authentication={"dkim": "enforce"})
    signed = keys.sign(message(), "example.com", canonicalize=canonicalize)
    assert send(address, signed) is None
    wait_until(lambda: received)
    (result,) = results_of(received[0], "dkim")
    assert result["result"] == "pass", result
    assert result["props"]["header.a"] == keys.algorithm.decode()


def test_dkim_results_for_each_kind_of_signature(zone, listen, received):
    spf_zone(zone)
    zone.txt("s1._domainkey.example.com", RSA_2048.record)
    zone.txt("s2._domainkey.example.com", ED25519.record)
    zone.misbehave(["s3._domainkey.example.com"], SERVFAIL)
    # s4 has no key; s5's key is not a key.
    zone.txt("s5._domainkey.example.com", "v=DKIM1; k=rsa; p=bm90IGEga2V5")
    address = listen(authentication={"dkim": "annotate"})
    plain = message()
    signed = RSA_2048.sign(plain, "example.com")  # pass
    signed = ED25519.sign(signed, "example.com", selector="s2")  # pass
    signed = RSA_2048.sign(signed, "example.com", selector="s3")  # temperror
    signed = RSA_2048.sign(signed, "example.com", selector="s4")  # permerror: no key
    signed = RSA_2048.sign(signed, "example.com", selector="s5")  # fails to verify
    length = RSA_2048.sign(plain, "example.com", length=True)
    sha1 = RSA_2048.sign(plain, "example.com", algorithm=b"rsa-sha1")
    for extra in (length, sha1):
        signed = extra.split(b"\r\n\r\n")[0].split(b"From:")[0] + signed
    assert send(address, signed) is None
    wait_until(lambda: received)
    by_selector = {r["props"].get("header.s"): r for r in results_of(received[0], "dkim")}
    words = sorted(r["result"] for r in results_of(received[0], "dkim"))
    assert len(words) == 7, results_of(received[0], "dkim")
    assert by_selector["s2"]["result"] == "pass"
    assert by_selector["s3"]["result"] == "temperror"
    assert by_selector["s4"]["result"] == "permerror"
    assert by_selector["s5"]["result"] in ("fail", "permerror")
    reasons = [
        r["reason"] or "" for r in results_of(received[0], "dkim") if r["result"] == "neutral"
    ]
    assert any("rsa-sha1" in reason for reason in reasons), reasons
    assert any("'l='" in reason for reason in reasons), reasons


def test_a_tampered_body_is_not_a_pass(zone, listen, received):
    zone.txt("s1._domainkey.example.com", RSA_2048.record)
    address = listen(authentication={"dkim": "annotate"})
    signed = RSA_2048.sign(message(), "example.com").replace(b"Hello.", b"Hullo.")
    assert send(address, signed) is None
    wait_until(lambda: received)
    (result,) = results_of(received[0], "dkim")
    assert result["result"] == "neutral" and "body hash" in result["reason"].lower()


def test_enforce_and_annotate_per_via_on_one_listener(zone, listen, received):
    spf_zone(zone)
    zone.txt("s1._domainkey.example.com", RSA_2048.record)
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    zone.txt("_dmarc.forged.example", "v=DMARC1; p=reject")
    enforce = {"spf": "enforce", "dkim": "enforce", "dmarc": "enforce"}
    address = listen(
        listen="0.0.0.0:0",
        authentication=ALL_ANNOTATE,
        via={
            "127.0.0.2": {"authentication": enforce},
            "127.0.0.3": {"authentication": ALL_ANNOTATE},
        },
    )
    port = address[1]
    # SPF fail at MAIL FROM: 550 5.7.23 where enforced, accepted and annotated elsewhere.
    refused = send(("127.0.0.2", port), message("x@forged.example"), sender="x@forged.example")
    assert isinstance(refused, smtplib.SMTPSenderRefused)
    assert refused.smtp_code == 550 and refused.smtp_error.startswith(b"5.7.23")
    assert send(("127.0.0.3", port), message("x@forged.example"), sender="x@forged.example") is None
    wait_until(lambda: received)
    assert results_of(received[0], "spf")[0]["result"] == "fail"
    assert results_of(received[0], "dmarc")[0]["result"] == "fail"
    # SPF temperror: 451 4.7.24, never a 5xx.
    for name in ("slow.example", "broken.example"):
        started = time.monotonic()
        deferred = send(("127.0.0.2", port), message(f"x@{name}"), sender=f"x@{name}")
        assert isinstance(deferred, smtplib.SMTPSenderRefused), name
        assert (deferred.smtp_code, deferred.smtp_error[:6]) == (451, b"4.7.24"), name
        assert time.monotonic() - started < 5, "a dead resolver answers within the budget"
    # DKIM fail (a signature that does not verify): 550 5.7.20.
    zone.txt("s9._domainkey.example.com", RSA_1024.record)
    wrong_key = RSA_2048.sign(message(), "example.com", selector="s9")
    refused = send(("127.0.0.2", port), wrong_key)
    assert isinstance(refused, smtplib.SMTPDataError)
    assert (refused.smtp_code, refused.smtp_error[:6]) == (550, b"5.7.20")
    # DMARC p=reject, nothing aligned (SPF passes for another domain, no signature): 550 5.7.1.
    zone.txt("other.example", "v=spf1 ip4:127.0.0.1 -all")
    refused = send(("127.0.0.2", port), message("alice@example.com"), sender="x@other.example")
    assert isinstance(refused, smtplib.SMTPDataError)
    assert (refused.smtp_code, refused.smtp_error[:5]) == (550, b"5.7.1")
    # Aligned and signed: accepted where enforced.
    received.clear()
    assert send(("127.0.0.2", port), RSA_2048.sign(message(), "example.com")) is None
    wait_until(lambda: received)
    assert {r["method"]: r["result"] for r in received[0]["results"]} == {
        "spf": "pass",
        "dkim": "pass",
        "dmarc": "pass",
        "arc": "none",  # merged field by field: the via block leaves ARC as the top level says
    }


def test_dmarc_temperror_defers_and_quarantine_is_only_recorded(zone, listen, received):
    spf_zone(zone)
    zone.txt("_dmarc.quarantine.example", "v=DMARC1; p=quarantine")
    zone.txt("quarantine.example", "v=spf1 -all")
    address = listen(authentication={"dmarc": "enforce"})
    deferred = send(address, message("x@slow.example"), sender="x@example.com")
    assert isinstance(deferred, smtplib.SMTPDataError)
    assert deferred.smtp_code == 451
    assert send(address, message("x@quarantine.example"), sender="x@quarantine.example") is None
    wait_until(lambda: received)
    (dmarc_result,) = results_of(received[0], "dmarc")
    assert dmarc_result["result"] == "fail"
    assert dmarc_result["props"]["policy.dmarc"] == "quarantine"


def test_incoming_results_claiming_our_authserv_id_are_removed(zone, listen, received):
    spf_zone(zone)
    address = listen(authentication={"spf": "annotate"})
    forged = (
        f"Authentication-Results: {HOSTNAME}; spf=pass smtp.mailfrom=x@example.com\r\n"
        "Authentication-Results: other.example; spf=fail\r\n"
    ).encode() + message()
    assert send(address, forged) is None
    wait_until(lambda: received)
    data = received[0]["data"]
    assert data.count(f"Authentication-Results: {HOSTNAME}".encode()) == 1
    assert b"Authentication-Results: other.example; spf=fail" in data
    assert "spf=pass" in header_of(data)


def test_null_sender_uses_postmaster_at_helo_and_results_are_counted(
    zone, listen, received, server
):
    spf_zone(zone)
    address = listen(authentication={"spf": "enforce"})
    assert send(address, message(), sender="") is None
    wait_until(lambda: received)
    mail_from = results_of(received[0], "spf")[0]
    assert mail_from["result"] == "pass"
    assert mail_from["props"] == {"smtp.mailfrom": "postmaster@client.example.com"}
    samples = server._core.metrics()["kumo_listener_authentication_results"]
    # Per listener, method and result: the HELO and the MAIL FROM identities.
    assert (("127.0.0.1:0", "spf", "pass"), 2) in samples


def test_off_by_default_writes_nothing(zone, listen, received):
    address = listen()
    assert send(address, message()) is None
    wait_until(lambda: received)
    assert received[0]["results"] == []
    assert b"Authentication-Results" not in received[0]["data"]
    assert zone.queries == []


def test_bad_values_raise_with_the_key_path(listen):
    with pytest.raises(kumo.ParamsError, match=r"authentication\.spf: expected one of"):
        listen(authentication={"spf": "strict"})
    with pytest.raises(kumo.ParamsError, match=r"authentication\.dkm: unknown parameter"):
        listen(authentication={"dkm": "off"})


def test_configure_dns_checks_its_arguments():
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        kumo.configure_dns(["not an address"])
    with pytest.raises(ValueError, match="timeout"):
        kumo.configure_dns([], timeout=0)


def test_serve_dns_server_points_the_checks_at_the_given_resolver(zone, test_dns, serve, tmp_path):
    spf_zone(zone)
    policy = tmp_path / "policy.py"
    policy.write_text(
        "import kumo_listener as kumo\n\n"
        "@kumo.on('init')\n"
        "def init():\n"
        "    kumo.start_esmtp_listener(listen='127.0.0.1:0', hostname='mx.test.example',\n"
        "        authentication={'spf': 'enforce'})\n"
    )
    served = serve(
        "--policy",
        str(policy),
        "--sink",
        "discard",
        "--dns-server",
        test_dns.address,
        "--dns-timeout",
        "0.5",
        "--dns-attempts",
        "1",
    )
    refused = send(served.address, message("x@forged.example"), sender="x@forged.example")
    assert isinstance(refused, smtplib.SMTPSenderRefused)
    assert (refused.smtp_code, refused.smtp_error[:6]) == (550, b"5.7.23")
    assert send(served.address, message()) is None
    assert ("forged.example", "TXT") in zone.queries
    assert served.stop() == 0


def test_serve_refuses_a_bad_dns_server(tmp_path):
    result = run_kumo("serve", "--dns-server", "nowhere", cwd=tmp_path)
    assert result.returncode == 2
    assert 'DNS server "nowhere": expected HOST:PORT or an IP address' in result.stderr


def arc_sealed(keys: Keys, data: bytes, domain: str = "forwarder.example") -> bytes:
    """``data`` as a forwarder passes it on: its results, then an ARC set sealed by dkimpy."""
    with_results = (
        f"Authentication-Results: {domain}; spf=pass smtp.mailfrom=alice@example.com\r\n".encode()
        + data
    )
    headers = dkim.arc_sign(
        with_results,
        b"arc",
        domain.encode(),
        keys.private,
        domain.encode(),
        include_headers=[b"from", b"to", b"subject", b"date"],
    )
    return b"".join(headers) + with_results


def test_arc_sets_sealed_by_dkimpy(zone, listen, received):
    zone.txt("arc._domainkey.forwarder.example", RSA_2048.record)
    address = listen(
        listen="0.0.0.0:0",
        authentication={"arc": "annotate"},
        via={"127.0.0.2": {"authentication": {"arc": "enforce"}}},
    )
    sealed = arc_sealed(RSA_2048, message())
    assert send(address, sealed) is None
    wait_until(lambda: received)
    (arc_result,) = results_of(received[0], "arc")
    assert arc_result["result"] == "pass", arc_result
    assert "arc=pass" in header_of(received[0]["data"])
    # Changed after sealing: the chain fails, and enforce refuses with 5.7.29.
    tampered = sealed.replace(b"Subject: test", b"Subject: changed")
    received.clear()
    assert send(address, tampered) is None
    wait_until(lambda: received)
    assert results_of(received[0], "arc")[0]["result"] == "fail"
    refused = send(("127.0.0.2", address[1]), tampered)
    assert isinstance(refused, smtplib.SMTPDataError)
    assert (refused.smtp_code, refused.smtp_error[:6]) == (550, b"5.7.29")


def test_iprev_is_recorded_and_never_refuses(zone, listen, received):
    # hickory answers the reverse names of loopback itself (RFC 6761:
    # `localhost.`), without asking our server: only what comes of that is
    # checked here, not the DNS cases.
    address = listen(
        listen="0.0.0.0:0", relay_hosts=["127.0.0.0/8"], authentication={"iprev": "enforce"}
    )
    for source, word in (("127.0.0.1", "pass"), ("127.0.0.4", "fail")):
        received.clear()
        assert send(address, message(), source=source) is None
        wait_until(lambda: received)
        (iprev,) = results_of(received[0], "iprev")
        assert (iprev["result"], iprev["props"]["policy.iprev"]) == (word, source), iprev
        assert f"iprev={word}" in header_of(received[0]["data"])
    assert not any(name.endswith("in-addr.arpa") for name, _ in zone.queries)


# The checks on demand: kumo.check_authentication with the parameter off.


def stored_messages(maildir) -> list[bytes]:
    return [path.read_bytes() for path in sorted((maildir / "new").glob("*"))]


def test_policy_checks_on_demand_from_a_def_handler(zone, listen, policy):
    spf_zone(zone)
    zone.txt("s1._domainkey.example.com", RSA_2048.record)
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    zone.txt("_dmarc.forged.example", "v=DMARC1; p=reject")
    checked: list[list[dict[str, Any]]] = []
    annotated: list[list[dict[str, Any]]] = []

    @policy.on("smtp_server_message_received")
    def judge(msg: kumo.Message, conn_meta: kumo.ConnectionMeta) -> None:
        results = kumo.check_authentication(msg, conn_meta)
        checked.append(results)
        annotated.append(msg.authentication_results)
        if any(r["method"] == "spf" and r["result"] == "fail" for r in results):
            raise kumo.Reject(550, "5.7.23 our own SPF rule")

    address = listen()  # `authentication` off: only the policy checks
    assert send(address, RSA_2048.sign(message(), "example.com")) is None
    words = {r["method"]: r["result"] for r in checked[0]}
    assert words == {"spf": "pass", "iprev": "pass", "dkim": "pass", "arc": "none", "dmarc": "pass"}
    assert [r["method"] for r in checked[0]] == ["spf", "iprev", "dkim", "arc", "dmarc"]
    assert all(set(r) == {"method", "result", "reason", "props"} for r in checked[0])
    assert checked[0][0]["props"] == {"smtp.mailfrom": "alice@example.com"}
    assert checked[0][2]["props"]["header.d"] == "example.com"
    assert annotated[0] == [], "the parameter is off: nothing of its own"
    refused = send(address, message("x@forged.example"), sender="x@forged.example")
    assert isinstance(refused, smtplib.SMTPDataError), refused
    assert (refused.smtp_code, refused.smtp_error) == (550, b"5.7.23 our own SPF rule")
    words = {r["method"]: r["result"] for r in checked[1]}
    assert words == {"spf": "fail", "iprev": "pass", "dkim": "none", "arc": "none", "dmarc": "fail"}


def test_policy_checks_on_demand_from_an_async_handler_and_adds_the_header(
    zone, listen, policy, maildir
):
    spf_zone(zone)
    zone.txt("s1._domainkey.example.com", RSA_2048.record)
    zone.misbehave(["_dmarc.example.com"], SERVFAIL)
    checked: list[list[dict[str, Any]]] = []

    @policy.on("smtp_server_message_received")
    async def judge(msg: kumo.Message, conn_meta: kumo.ConnectionMeta) -> None:
        results = await kumo.check_authentication_async(
            msg, conn_meta, spf=False, iprev=False, arc=False, add_header=True
        )
        checked.append(results)

    address = listen()
    signed = RSA_2048.sign(message(), "example.com").replace(b"Hello.", b"Hullo.")
    assert send(address, signed) is None
    assert [(r["method"], r["result"]) for r in checked[0]] == [
        ("dkim", "neutral"),
        ("dmarc", "temperror"),
    ]
    (stored,) = wait_until(lambda: stored_messages(maildir))
    # Prepended: at the top of the message (below the Maildir's envelope), above our Received:.
    top = stored.split(b"\r\n")[2]
    assert top == f"Authentication-Results: {HOSTNAME};".encode(), stored[:300]
    header = header_of(stored)
    assert "dkim=neutral" in header and "dmarc=temperror" in header and "spf=" not in header
    assert b"\r\nReceived: " in stored.split(b"\r\n\r\n", 1)[0]


def test_policy_checks_on_demand_see_the_xclient_address_and_the_null_sender(zone, listen, policy):
    zone.txt("helo.example", "v=spf1 ip4:127.0.0.1 -all")
    checked: list[list[dict[str, Any]]] = []

    @policy.on("smtp_server_data")
    def judge(msg: kumo.Message, conn_meta: kumo.ConnectionMeta) -> None:
        checked.append(kumo.check_authentication(msg, conn_meta, dkim=False, dmarc=False))

    address = listen()
    assert send(address, message(), sender="", helo="helo.example") is None
    spf, iprev, arc = checked[0]
    assert (spf["result"], spf["props"]) == ("pass", {"smtp.mailfrom": "postmaster@helo.example"})
    assert (iprev["method"], arc["method"]) == ("iprev", "arc")


# swaks, per via: 127.0.0.2 enforcing, 127.0.0.3 annotating, one listener.


def swaks_send(server: str, port: int, sender: str, data: bytes) -> str:
    """swaks's transcript of one message to bob@example.net."""
    done = swaks(
        "--server", server, "--port", str(port), "--helo", "client.example.com",
        "--from", sender, "--to", "bob@example.net", "--data", data.decode(),
        "--timeout", "20",
    )  # fmt: skip
    return done.stdout + done.stderr


def test_swaks_gets_the_replies_of_enforce_and_annotate_per_via(zone, listen, received):
    spf_zone(zone)
    zone.txt("s1._domainkey.dmarc.example", RSA_2048.record)
    zone.txt("dmarc.example", "v=spf1 ip4:192.0.2.1 -all")
    zone.txt("_dmarc.dmarc.example", "v=DMARC1; p=reject")
    enforce = {"spf": "enforce", "dkim": "annotate", "dmarc": "enforce"}
    port = listen(
        listen="0.0.0.0:0",
        via={
            "127.0.0.2": {"authentication": enforce},
            "127.0.0.3": {"authentication": ALL_ANNOTATE},
        },
    )[1]
    forged = message("x@forged.example")
    transcript = swaks_send("127.0.0.2", port, "x@forged.example", forged)
    assert "<** 550 5.7.23 " in transcript, transcript
    transcript = swaks_send("127.0.0.3", port, "x@forged.example", forged)
    assert "<-  250 " in transcript and "<** " not in transcript, transcript
    wait_until(lambda: received)
    assert "spf=fail" in header_of(received[0]["data"])
    for name in ("slow.example", "broken.example"):
        transcript = swaks_send("127.0.0.2", port, f"x@{name}", message(f"x@{name}"))
        assert "<** 451 4.7.24 " in transcript, transcript
        assert "<** 5" not in transcript, transcript
    # DMARC p=reject, nothing aligned passing (SPF of a softfailing MAIL FROM
    # domain that is not the From domain; the From domain's signature broken).
    unaligned = RSA_2048.sign(message("x@dmarc.example"), "dmarc.example")
    unaligned = unaligned.replace(b"Hello.", b"Hullo.")
    transcript = swaks_send("127.0.0.2", port, "x@soft.example", unaligned)
    assert "<** 550 5.7.1 " in transcript, transcript
    received.clear()
    transcript = swaks_send("127.0.0.3", port, "x@soft.example", unaligned)
    assert "<** " not in transcript, transcript
    wait_until(lambda: received)
    assert "dmarc=fail" in header_of(received[0]["data"])


def weak_rsa_keys(bits: int = 512) -> Keys:
    """RSA keys too short to trust, by openssl (cryptography makes none under 1024 bits)."""
    require_tool("openssl")
    private = subprocess.run(
        ["openssl", "genrsa", "-traditional", str(bits)], capture_output=True, check=True
    ).stdout
    key = serialization.load_pem_private_key(private, password=None)
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    keys = Keys("rsa", 1024)
    keys.private = private
    keys.record = f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"
    return keys


class ExpiredDKIM(dkim.DKIM):
    """dkimpy's signer, its signature given `x=` (and `t=`) in the past."""

    def gen_header(self, fields, *args, **kwargs):  # type: ignore[no-untyped-def]
        fields = [(name, value) for name, value in fields if name not in (b"t", b"x")]
        at = [name for name, _ in fields].index(b"b")
        fields[at:at] = [(b"t", b"1000000000"), (b"x", b"1000000100")]
        return super().gen_header(fields, *args, **kwargs)


def test_guards_expired_weak_many_and_sha1_signatures(zone, listen, received):
    zone.txt("s1._domainkey.example.com", RSA_2048.record)
    weak = weak_rsa_keys()
    zone.txt("weak._domainkey.example.com", weak.record)
    address = listen(authentication={"dkim": "annotate"})
    plain = message()
    signer = ExpiredDKIM(plain)
    expired = signer.sign(b"s1", b"example.com", RSA_2048.private, include_headers=[b"from"])
    cases = {
        "expired": expired + plain,
        "rsa-512": weak.sign(plain, "example.com", selector="weak"),
        "rsa-sha1": RSA_2048.sign(plain, "example.com", algorithm=b"rsa-sha1"),
    }
    many = plain
    for _ in range(12):
        many = RSA_2048.sign(many, "example.com")
    cases["twelve"] = many
    found = {}
    for name, data in cases.items():
        received.clear()
        assert send(address, data) is None
        wait_until(lambda: received)
        found[name] = results_of(received[0], "dkim")
    (expired_result,) = found["expired"]
    assert expired_result["result"] != "pass", expired_result
    assert "expired" in (expired_result["reason"] or "").lower(), expired_result
    (weak_result,) = found["rsa-512"]
    assert weak_result["result"] != "pass", weak_result
    (sha1_result,) = found["rsa-sha1"]
    assert sha1_result["result"] == "neutral" and "rsa-sha1" in sha1_result["reason"]
    words = [r["result"] for r in found["twelve"]]
    assert words.count("pass") == 10, found["twelve"]
    not_checked = [r for r in found["twelve"] if "not checked" in (r["reason"] or "")]
    assert len(not_checked) == 2, found["twelve"]


def test_signatures_of_opendkim_and_mail_dkim(zone, listen, received, tmp_path):
    """Two signers independent of dkimpy and of us: OpenDKIM's
    opendkim-testmsg (which signs rsa-sha1 only: dropped, RFC 8301) and
    Perl's Mail::DKIM (dkimproxy-sign, rsa-sha256: a pass; tampered: not)."""
    testmsg = require_tool("opendkim-testmsg", "opendkim-tools")
    mail_dkim = require_tool("dkimproxy-sign", "libmail-dkim-perl")
    key = tmp_path / "key.pem"
    key.write_bytes(RSA_2048.private)
    zone.txt("od._domainkey.example.com", RSA_2048.record)
    zone.txt("pm._domainkey.example.com", RSA_2048.record)
    plain = message()
    by_opendkim = subprocess.run(
        [testmsg, "-C", "-d", "example.com", "-k", str(key), "-s", "od"],
        input=plain, capture_output=True, check=True,
    ).stdout  # fmt: skip
    field = subprocess.run(
        [mail_dkim, "--key", str(key), "--selector", "pm", "--domain", "example.com",
         "--method", "relaxed", "--algorithm", "rsa-sha256"],
        input=plain, capture_output=True, check=True,
    ).stdout  # fmt: skip
    by_mail_dkim = field.rstrip(b"\r\n") + b"\r\n" + plain
    address = listen(authentication={"dkim": "annotate"})
    found = {}
    cases = {
        "opendkim": by_opendkim,
        "mail-dkim": by_mail_dkim,
        "mail-dkim-tampered": by_mail_dkim.replace(b"Hello.", b"Hullo."),
    }
    for name, data in cases.items():
        received.clear()
        assert send(address, data) is None
        wait_until(lambda: received)
        (found[name],) = results_of(received[0], "dkim")
    assert found["opendkim"]["props"]["header.a"] == "rsa-sha1", found["opendkim"]
    assert found["opendkim"]["result"] == "neutral" and "rsa-sha1" in found["opendkim"]["reason"]
    assert found["mail-dkim"]["result"] == "pass", found["mail-dkim"]
    assert found["mail-dkim"]["props"]["header.s"] == "pm"
    assert found["mail-dkim-tampered"]["result"] not in ("pass", "none"), found
    assert "body hash" in found["mail-dkim-tampered"]["reason"].lower()
