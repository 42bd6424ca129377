"""TLS: STARTTLS (RFC 3207) and implicit TLS, the certificate chosen per
connection (static, `via` blocks, the dynamic hook, files replaced in place),
TLS parameter errors, client certificates, TLS connection metadata, and
AUTH PLAIN (RFC 4954).

Every certificate is made by support.Pki, with `cryptography`, into the
test's tmp_path.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import kumo_listener as kumo
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from support import (
    Issued,
    Pki,
    RawClient,
    client_context,
    common_name,
    delivered,
    logged,
    require_tool,
    swaks,
    tls_session,
    upgrade,
)

# An SMTP reply at the start of the stream or of a line: what must never
# arrive in plaintext once the client has asked for TLS.
SMTP_REPLY = re.compile(rb"(?:^|\r\n)[2-5]\d\d[ -]")

TLS_META = (
    "tls_cipher",
    "tls_protocol_version",
    "tls_peer_subject_name",
    "authn_id",
    "authz_id",
)


# --- certificates -----------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def certificate_names(cert: x509.Certificate) -> set[str]:
    """The subject CN and every DNS SAN."""
    names = {str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return names
    return names | set(san.get_values_for_type(x509.DNSName))


def files(issued: Issued) -> dict[str, str]:
    """Listener parameters naming `issued`'s PEM files."""
    return {"tls_certificate": str(issued.cert_path), "tls_private_key": str(issued.key_path)}


def inline(issued: Issued) -> dict[str, dict[str, str]]:
    """Listener parameters carrying `issued` as key_data."""
    return {
        "tls_certificate": {"key_data": issued.cert_pem},
        "tls_private_key": {"key_data": issued.key_pem},
    }


# --- clients ----------------------------------------------------------------


def implicit_tls_client(
    raw, address: tuple[str, int], context: ssl.SSLContext | None = None
) -> RawClient:
    """Connect and handshake at once, before reading anything."""
    client = raw(address)
    client.sock = (context or client_context()).wrap_socket(client.sock)
    return client


def peer_certificate(client: RawClient) -> x509.Certificate:
    der = client.sock.getpeercert(binary_form=True)
    assert der, "the server presented no certificate"
    return x509.load_der_x509_certificate(der)


def certificate_at(
    raw, address: tuple[str, int], via: str = "127.0.0.1", context: ssl.SSLContext | None = None
) -> x509.Certificate:
    """The certificate presented after STARTTLS to a client connecting to `via`."""
    client, _ = tls_session(raw, address, context, via=via)
    return peer_certificate(client)


@pytest.fixture
def mail_meta(policy: kumo.Policy) -> dict:
    """The TLS and AUTH connection metadata as seen by the last MAIL FROM."""
    seen: dict = {}

    @policy.on("smtp_server_mail_from")
    def mail_from(sender, meta):
        seen.clear()
        seen.update({name: meta.get_meta(name) for name in TLS_META})

    return seen


@pytest.fixture
def auth_calls(policy: kumo.Policy) -> list[tuple[str, str, str]]:
    """Registers an AUTH PLAIN handler accepting user/secret; records its calls."""
    calls: list[tuple[str, str, str]] = []

    @policy.on("smtp_server_auth_plain")
    def auth(authz, authc, password, meta):
        calls.append((authz, authc, password))
        return authc == "user" and password == "secret"

    return calls


def log_in_and_relay(client: smtplib.SMTP, maildir: Path, subject: str) -> None:
    """Over TLS, after EHLO: AUTH PLAIN offered (STARTTLS no longer), the login
    accepted, and a message to an outside recipient relayed and stored."""
    assert not client.has_extn("starttls")
    assert "PLAIN" in client.esmtp_features["auth"].split()
    assert client.login("user", "secret")[0] == 235
    message = f"Subject: {subject}\r\n\r\nhi\r\n".encode()
    client.sendmail("a@b.example", ["c@outside.example"], message)
    [stored] = delivered(maildir)
    assert f"Subject: {subject}\r\n".encode() in stored


def plain(authz: str, authc: str, password: str) -> str:
    """An AUTH PLAIN response (RFC 4616): base64 of authz NUL authc NUL password."""
    return b64(f"{authz}\0{authc}\0{password}".encode())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- STARTTLS: the protocol ---------------------------------------------------


def test_starttls_is_advertised_in_plaintext_only(listen, raw):
    client = raw(listen())
    assert client.reply()[0] == 220
    assert "STARTTLS" in client.ehlo()
    upgrade(client)
    lines = client.ehlo()
    assert lines[0] == "mx.test.example Hello client.example"
    assert "STARTTLS" not in lines
    assert not any(line.upper().startswith("AUTH") for line in lines)
    assert "PIPELINING" in lines and "ENHANCEDSTATUSCODES" in lines


@pytest.mark.parametrize(
    ("version", "name"),
    [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")],
)
def test_handshake_with_tls_1_2_and_1_3(listen, raw, version, name):
    context = client_context()
    context.minimum_version = context.maximum_version = version
    client, _ = tls_session(raw, listen(), context)
    assert client.sock.version() == name
    assert client.command("NOOP") == (250, ["2.0.0 OK"])
    assert client.command("QUIT")[0] == 221


def test_a_whole_message_over_starttls(listen, raw, maildir):
    client, _ = tls_session(raw, listen())
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    assert client.command("RCPT TO:<c@d.example>")[0] == 250
    assert client.command("DATA")[0] == 354
    assert client.command("Subject: over TLS\r\n\r\nsecret body\r\n.")[0] == 250
    [stored] = delivered(maildir)
    assert b"Subject: over TLS\r\n" in stored and b"secret body" in stored


def test_transaction_before_starttls_is_forgotten(listen, raw):
    client = raw(listen())
    client.reply()
    client.ehlo()
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    upgrade(client)
    client.ehlo()
    assert client.command("RCPT TO:<c@d.example>")[0] == 503
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250


def test_ehlo_is_needed_again_after_starttls(listen, raw):
    client = raw(listen())
    client.reply()
    client.ehlo()
    upgrade(client)
    assert client.command("MAIL FROM:<a@b.example>")[0] == 503
    client.ehlo()
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250


def test_starttls_with_an_argument_is_a_syntax_error(listen, raw):
    client = raw(listen())
    client.reply()
    client.ehlo()
    assert client.command("STARTTLS foo")[0] == 501
    upgrade(client)
    assert "STARTTLS" not in client.ehlo()


def test_starttls_when_tls_is_active_is_refused(listen, raw):
    client, _ = tls_session(raw, listen())
    code, lines = client.command("STARTTLS")
    assert code // 100 == 5, lines
    assert client.command("NOOP") == (250, ["2.0.0 OK"])


@pytest.mark.parametrize(
    "injected",
    [
        b"NOOP\r\n",
        b"MAIL FROM:<evil@attacker.example>\r\n",
        b"EHLO evil.example\r\nMAIL FROM:<evil@attacker.example>\r\n",
    ],
    ids=["noop", "mail", "ehlo-mail"],
)
def test_plaintext_pipelined_after_starttls_is_discarded(listen, raw, injected):
    """CVE-2011-0411: commands sent in plaintext with STARTTLS must not be
    answered (or acted on) inside the TLS session."""
    client = raw(listen())
    client.reply()
    client.ehlo()
    client.send(b"STARTTLS\r\n" + injected)
    assert client.reply() == (220, ["2.0.0 Ready to start TLS"])
    assert client.buffer == b""
    client.sock = client_context().wrap_socket(client.sock)
    client.send(b"EHLO client.example\r\n")
    assert client.line() == b"250-mx.test.example Hello client.example"
    code, lines = client.reply()  # the rest of the EHLO reply
    assert code == 250 and "STARTTLS" not in lines
    # No injected MAIL is pending: a nested MAIL would get 503.
    assert client.command("MAIL FROM:<a@b.example>") == (250, ["2.1.0 OK"])


@pytest.mark.parametrize(
    "handshake",
    [b"\x16\x03\x01garbage\r\n", b"hello\r\n", b"EHLO client.example\r\n", None],
    ids=["bad-record", "plain-text", "ehlo-again", "fin"],
)
def test_failed_handshake_closes_without_plaintext_reply(listen, raw, handshake):
    address = listen()
    client = raw(address)
    client.reply()
    client.ehlo()
    assert client.command("STARTTLS")[0] == 220
    if handshake is None:
        client.sock.shutdown(socket.SHUT_WR)
    else:
        client.send(handshake)
    received = client.until_closed(3)
    assert not SMTP_REPLY.search(received), received
    # The listener is unharmed.
    assert tls_session(raw, address)[1][0] == "mx.test.example Hello client.example"


@pytest.mark.parametrize(
    "partial",
    [b"", b"\x16\x03\x01\x02\x00\x01"],
    ids=["silent", "stalled-mid-record"],
)
def test_stalled_handshake_is_closed_after_client_timeout(listen, raw, partial):
    client = raw(listen(client_timeout=1))
    client.reply()
    client.ehlo()
    assert client.command("STARTTLS")[0] == 220
    started = time.monotonic()
    if partial:
        client.send(partial)
    received = client.until_closed(5)
    assert time.monotonic() - started >= 0.5
    assert not SMTP_REPLY.search(received), received


# --- which certificate --------------------------------------------------------


@pytest.mark.parametrize(
    ("key_type", "key_format"),
    [
        ("ec", serialization.PrivateFormat.PKCS8),
        ("ec", serialization.PrivateFormat.TraditionalOpenSSL),
        ("rsa", serialization.PrivateFormat.PKCS8),
        ("rsa", serialization.PrivateFormat.TraditionalOpenSSL),
    ],
    ids=["ec-pkcs8", "ec-sec1", "rsa-pkcs8", "rsa-pkcs1"],
)
def test_configured_certificate_is_presented_and_verifies(listen, raw, pki, key_type, key_format):
    ca = pki.ca()
    leaf = pki.leaf("mx.test.example", ca=ca, key_type=key_type, key_format=key_format)
    address = listen(**files(leaf))
    context = client_context(ca, check_hostname=True)
    client, _ = tls_session(raw, address, context, server_hostname="mx.test.example")
    assert peer_certificate(client) == leaf.cert


def test_certificate_and_key_as_key_data(listen, raw, pki):
    ca = pki.ca()
    leaf = pki.leaf("mx.inline.example", ca=ca)
    address = listen(**inline(leaf))
    assert common_name(certificate_at(raw, address, context=client_context(ca))) == (
        "mx.inline.example"
    )


def test_certificate_chain_file_is_sent_whole(listen, raw, pki):
    root = pki.ca("Test Root CA")
    intermediate = pki.ca("Test Intermediate CA", issuer=root)
    leaf = pki.leaf("mx.test.example", ca=intermediate)
    assert leaf.chain == [intermediate.cert]
    address = listen(**files(leaf))
    # The client trusts only the root: it needs the intermediate from the server.
    context = client_context(root, check_hostname=True)
    client, _ = tls_session(raw, address, context, server_hostname="mx.test.example")
    assert peer_certificate(client) == leaf.cert


def test_without_a_certificate_a_self_signed_one_names_the_hostname(listen, raw):
    address = listen(hostname="mx.selfsigned.example")
    assert "mx.selfsigned.example" in certificate_names(certificate_at(raw, address))


def test_each_via_address_presents_its_own_certificate(listen, raw, pki):
    ca = pki.ca()
    one = pki.leaf("mx.one.example", ca=ca)
    two = pki.leaf("mx.two.example", ca=ca)
    address = listen(
        listen="0.0.0.0:0",
        hostname="default.example",
        via={
            "127.0.0.2": {"hostname": "mx.one.example", **files(one)},
            "127.0.0.3": {"hostname": "mx.two.example", **inline(two)},
        },
    )
    verified = client_context(ca)
    assert certificate_at(raw, address, "127.0.0.2", verified) == one.cert
    assert certificate_at(raw, address, "127.0.0.3", verified) == two.cert
    default = certificate_at(raw, address, "127.0.0.4")
    assert "default.example" in certificate_names(default)
    assert default not in (one.cert, two.cert)
    # Each connection chooses again: the first address still gets its own.
    assert certificate_at(raw, address, "127.0.0.2", verified) == one.cert


def test_self_signed_certificate_follows_the_effective_hostname(policy, listen, raw):
    policy.on(
        "smtp_server_get_dynamic_parameters",
        lambda listener, meta: (
            {"hostname": "mx.dynamic.example"}
            if meta.get_meta("received_via").startswith("127.0.0.3:")
            else None
        ),
    )
    address = listen(
        listen="0.0.0.0:0",
        hostname="default.example",
        via={"127.0.0.2": {"hostname": "mx.via.example"}},
    )
    assert "mx.via.example" in certificate_names(certificate_at(raw, address, "127.0.0.2"))
    assert "mx.dynamic.example" in certificate_names(certificate_at(raw, address, "127.0.0.3"))
    assert "default.example" in certificate_names(certificate_at(raw, address, "127.0.0.4"))


def via_toml(entries: dict[str, Issued]) -> str:
    """A listener_params.toml with one via block per address, naming PEM files."""
    return "\n".join(
        f'[via."{ip}"]\n'
        f"hostname = {json.dumps(issued.common_name)}\n"
        f"tls_certificate = {json.dumps(str(issued.cert_path))}\n"
        f"tls_private_key = {json.dumps(str(issued.key_path))}\n"
        for ip, issued in entries.items()
    )


@pytest.fixture
def toml_overrides(policy: kumo.Policy, tmp_path: Path) -> Path:
    """The seed's set-up: the dynamic hook returns listener_params.toml."""
    overrides = tmp_path / "listener_params.toml"
    overrides.write_text("")

    @policy.on("smtp_server_get_dynamic_parameters")
    def dynamic(listener, conn_meta):
        return kumo.serde.toml_load(overrides)

    return overrides


def test_seed_toml_certificates_per_via_follow_edits(listen, raw, pki, toml_overrides):
    ca = pki.ca()
    one = pki.leaf("mx.one.example", ca=ca)
    two = pki.leaf("mx.two.example", ca=ca)
    renamed = pki.leaf("mx.renamed.example", ca=ca)
    toml_overrides.write_text(via_toml({"127.0.0.2": one, "127.0.0.3": two}))
    address = listen(listen="0.0.0.0:0", hostname="default.example")
    verified = client_context(ca)
    assert certificate_at(raw, address, "127.0.0.2", verified) == one.cert
    assert certificate_at(raw, address, "127.0.0.3", verified) == two.cert
    assert "default.example" in certificate_names(certificate_at(raw, address, "127.0.0.4"))

    toml_overrides.write_text(via_toml({"127.0.0.2": renamed, "127.0.0.3": two}))
    client = raw(("127.0.0.2", address[1]))
    assert client.reply() == (220, ["mx.renamed.example ESMTP kumo_listener"])
    client.ehlo()
    upgrade(client, verified)
    assert peer_certificate(client) == renamed.cert
    assert certificate_at(raw, address, "127.0.0.3", verified) == two.cert


def test_certificate_files_replaced_in_place_are_used_by_the_next_connection(
    listen, raw, pki, toml_overrides
):
    ca = pki.ca()
    before = pki.leaf("mx.before.example", ca=ca)
    after = pki.leaf("mx.after.example", ca=ca)
    toml_overrides.write_text(via_toml({"127.0.0.2": before}))
    address = listen(listen="0.0.0.0:0")
    verified = client_context(ca)
    assert certificate_at(raw, address, "127.0.0.2", verified) == before.cert
    after.overwrite(before)
    assert common_name(certificate_at(raw, address, "127.0.0.2", verified)) == "mx.after.example"


# --- TLS parameter errors -------------------------------------------------------

# A key path that is not the tail of a longer one: "tls_certificate: " must not
# be satisfied by "via.'127.0.0.2'.tls_certificate: ".
TOP = r"(?<![\w.'])"

# Each case: (parameters, regexes the error message must match). The builders
# get the Pki and a directory for stray files.
ErrorCase = Callable[[Pki, Path], tuple[dict, list[str]]]


def missing_certificate(pki: Pki, tmp: Path) -> tuple[dict, list[str]]:
    leaf, missing = pki.leaf("mx.test.example"), tmp / "missing.crt"
    params = {"tls_certificate": str(missing), "tls_private_key": str(leaf.key_path)}
    return params, [TOP + r"tls_certificate: ", re.escape(str(missing))]


def missing_key(pki: Pki, tmp: Path) -> tuple[dict, list[str]]:
    leaf, missing = pki.leaf("mx.test.example"), tmp / "missing.key"
    params = {"tls_certificate": str(leaf.cert_path), "tls_private_key": str(missing)}
    return params, [TOP + r"tls_private_key: ", re.escape(str(missing))]


def certificate_not_pem(pki: Pki, tmp: Path) -> tuple[dict, list[str]]:
    leaf, junk = pki.leaf("mx.test.example"), tmp / "junk.crt"
    junk.write_text("this is not a certificate\n")
    return {"tls_certificate": str(junk), "tls_private_key": str(leaf.key_path)}, [
        TOP + r"tls_certificate: "
    ]


def key_not_pem(pki: Pki, tmp: Path) -> tuple[dict, list[str]]:
    leaf, junk = pki.leaf("mx.test.example"), tmp / "junk.key"
    junk.write_bytes(b"\x00\x01binary junk\xff")
    return {"tls_certificate": str(leaf.cert_path), "tls_private_key": str(junk)}, [
        TOP + r"tls_private_key: "
    ]


def certificate_given_as_key(pki: Pki, tmp: Path) -> tuple[dict, list[str]]:
    leaf = pki.leaf("mx.test.example")
    return {"tls_certificate": str(leaf.cert_path), "tls_private_key": str(leaf.cert_path)}, [
        TOP + r"tls_private_key: "
    ]


def certificate_key_data_not_pem(pki: Pki, tmp: Path) -> tuple[dict, list[str]]:
    leaf = pki.leaf("mx.test.example")
    params = {"tls_certificate": {"key_data": "not PEM"}, "tls_private_key": str(leaf.key_path)}
    return params, [TOP + r"tls_certificate: "]


def key_does_not_match(pki: Pki, tmp: Path) -> tuple[dict, list[str]]:
    leaf, other = pki.leaf("mx.test.example"), pki.leaf("mx.other.example")
    params = {"tls_certificate": str(leaf.cert_path), "tls_private_key": str(other.key_path)}
    return params, [TOP + r"tls_(private_key|certificate): "]


def missing_key_in_via(pki: Pki, tmp: Path) -> tuple[dict, list[str]]:
    leaf, missing = pki.leaf("mx.test.example"), tmp / "via-missing.key"
    block = {"tls_certificate": str(leaf.cert_path), "tls_private_key": str(missing)}
    return {"via": {"127.0.0.2": block}}, [
        TOP + r"via\.'127\.0\.0\.2'\.tls_private_key: ",
        re.escape(str(missing)),
    ]


def mismatch_in_peer_via(pki: Pki, tmp: Path) -> tuple[dict, list[str]]:
    leaf, other = pki.leaf("mx.test.example"), pki.leaf("mx.other.example")
    block = {"tls_certificate": str(leaf.cert_path), "tls_private_key": str(other.key_path)}
    return {"peer": {"10.0.0.0/8": {"via": {"127.0.0.2": block}}}}, [
        TOP + r"peer\.'10\.0\.0\.0/8'\.via\.'127\.0\.0\.2'\.tls_(private_key|certificate): "
    ]


def client_ca_missing(pki: Pki, tmp: Path) -> tuple[dict, list[str]]:
    missing = tmp / "missing-ca.crt"
    return {"tls_required_client_ca": str(missing)}, [
        TOP + r"tls_required_client_ca: ",
        re.escape(str(missing)),
    ]


def client_ca_not_pem(pki: Pki, tmp: Path) -> tuple[dict, list[str]]:
    return {"tls_required_client_ca": {"key_data": "no certificates here"}}, [
        TOP + r"tls_required_client_ca: "
    ]


def implicit_tls_not_bool(pki: Pki, tmp: Path) -> tuple[dict, list[str]]:
    return {"implicit_tls": "yes"}, [TOP + r"implicit_tls: "]


def implicit_tls_in_via(pki: Pki, tmp: Path) -> tuple[dict, list[str]]:
    return {"via": {"127.0.0.2": {"implicit_tls": True}}}, [
        re.escape(
            "via.'127.0.0.2'.implicit_tls: only allowed at the top level of start_esmtp_listener"
        )
    ]


@pytest.mark.parametrize(
    "case",
    [
        missing_certificate,
        missing_key,
        certificate_not_pem,
        key_not_pem,
        certificate_given_as_key,
        certificate_key_data_not_pem,
        key_does_not_match,
        missing_key_in_via,
        mismatch_in_peer_via,
        client_ca_missing,
        client_ca_not_pem,
        implicit_tls_not_bool,
        implicit_tls_in_via,
    ],
    ids=lambda case: case.__name__,
)
def test_static_tls_errors_name_the_key_path(server, pki, tmp_path, case: ErrorCase):
    params, patterns = case(pki, tmp_path)
    with pytest.raises(kumo.ParamsError) as raised:
        server.start_esmtp_listener(**{"listen": "127.0.0.1:0", **params})
    assert isinstance(raised.value, ValueError)
    text = str(raised.value)
    for pattern in patterns:
        assert re.search(pattern, text), (pattern, text)


def test_bad_certificate_from_the_dynamic_hook_fails_only_starttls(
    policy, listen, raw, pki, tmp_path, kumo_log
):
    good = pki.leaf("mx.good.example")
    missing = tmp_path / "vanished.crt"

    @policy.on("smtp_server_get_dynamic_parameters")
    def dynamic(listener, meta):
        if meta.get_meta("received_via").startswith("127.0.0.2:"):
            return {"tls_certificate": str(missing), "tls_private_key": str(good.key_path)}
        return files(good)

    address = listen(listen="0.0.0.0:0")
    client = raw(("127.0.0.2", address[1]))
    assert client.reply() == (220, ["mx.test.example ESMTP kumo_listener"])
    client.ehlo()
    assert client.command("STARTTLS") == (454, ["4.7.0 TLS not available"])
    assert client.command("NOOP") == (250, ["2.0.0 OK"])
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    assert certificate_at(raw, address, "127.0.0.1") == good.cert
    logged(kumo_log, re.escape(str(missing)), within=3)
    # The log names our address and the identity that could not be used.
    assert re.search(
        rf"127\.0\.0\.2:\d+ \(mx\.test\.example\): TLS not available: .*"
        rf"\(tls_certificate {re.escape(str(missing))}, tls_private_key ",
        kumo_log.text,
    ), kumo_log.text


# --- client certificates and TLS metadata -----------------------------------------


@pytest.mark.parametrize("source", ["file", "key_data"])
@pytest.mark.parametrize("version", [None, ssl.TLSVersion.TLSv1_2], ids=["tls-default", "tls-1.2"])
def test_client_certificate_from_the_required_ca_is_recorded(
    listen, raw, pki, mail_meta, source, version
):
    client_ca = pki.ca("Client CA")
    client_cert = pki.leaf("client.example", ca=client_ca)
    required = str(client_ca.cert_path) if source == "file" else {"key_data": client_ca.cert_pem}
    address = listen(tls_required_client_ca=required)
    context = client_context(cert=client_cert, maximum_version=version)
    client, _ = tls_session(raw, address, context)
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    subject = mail_meta["tls_peer_subject_name"]
    assert isinstance(subject, str) and "client.example" in subject, subject


@pytest.mark.parametrize(
    ("require_ca", "presented"),
    [(True, "other-ca"), (True, "self-signed"), (True, None), (False, "trusted-ca")],
    ids=["other-ca", "self-signed", "no-certificate", "not-requested"],
)
def test_other_client_certificates_are_not_refused_nor_recorded(
    listen, raw, pki, mail_meta, require_ca, presented
):
    client_ca = pki.ca("Client CA")
    certs = {
        "trusted-ca": lambda: pki.leaf("client.example", ca=client_ca),
        "other-ca": lambda: pki.leaf("client.example", ca=pki.ca("Some Other CA")),
        "self-signed": lambda: pki.leaf("client.example"),
    }
    cert = certs[presented]() if presented else None
    params = {"tls_required_client_ca": str(client_ca.cert_path)} if require_ca else {}
    address = listen(**params)
    client, _ = tls_session(raw, address, client_context(cert=cert))
    assert client.command("NOOP") == (250, ["2.0.0 OK"])
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    assert mail_meta["tls_peer_subject_name"] is None
    assert mail_meta["tls_cipher"]


@pytest.mark.parametrize(
    ("maximum_version", "names"),
    [(None, ("1.3", "1_3")), (ssl.TLSVersion.TLSv1_2, ("1.2", "1_2"))],
    ids=["tls-1.3", "tls-1.2"],
)
def test_tls_cipher_and_protocol_version_metadata(listen, raw, mail_meta, maximum_version, names):
    context = client_context(maximum_version=maximum_version)
    client, _ = tls_session(raw, listen(), context)
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    assert isinstance(mail_meta["tls_cipher"], str) and mail_meta["tls_cipher"]
    version = mail_meta["tls_protocol_version"]
    assert isinstance(version, str) and any(name in version for name in names), version
    assert mail_meta["tls_peer_subject_name"] is None


def test_plaintext_session_has_no_tls_metadata(listen, raw, mail_meta):
    client = raw(listen())
    client.reply()
    client.ehlo()
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    assert mail_meta == dict.fromkeys(TLS_META)


# --- openssl s_client ---------------------------------------------------------------


def s_client_starttls(address: tuple[str, int], *options: str) -> str:
    """``openssl s_client -starttls smtp`` to `address` naming mx.test.example,
    QUIT at once: what it printed, after checking it exited 0 and negotiated TLS."""
    host, port = address
    command = [require_tool("openssl"), "s_client", "-starttls", "smtp"]
    command += ["-connect", f"{host}:{port}", "-servername", "mx.test.example", "-crlf"]
    result = subprocess.run([*command, *options], input=b"QUIT\n", capture_output=True, timeout=15)
    out = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, out + result.stderr.decode("utf-8", "replace")
    assert ("New, TLS" in out or "Protocol" in out) and "Cipher" in out, out
    return out


@pytest.mark.parametrize(
    "protocol", [None, "-tls1_2", "-tls1_3"], ids=["default", "tls-1.2", "tls-1.3"]
)
def test_openssl_s_client_starttls_smtp(listen, pki, protocol):
    ca = pki.ca()
    leaf = pki.leaf("mx.test.example", ca=ca)
    address = listen(**files(leaf))
    options = ["-CAfile", str(ca.cert_path), "-verify_return_error"]
    options += ["-verify_hostname", "mx.test.example"]
    out = s_client_starttls(address, *options, *([protocol] if protocol else []))
    assert "Verify return code: 0 (ok)" in out, out
    if protocol:
        assert "TLSv1." + protocol[-1] in out, out


def test_openssl_s_client_starttls_smtp_with_self_signed_default(listen):
    out = s_client_starttls(listen())
    assert "mx.test.example" in out


def read_stream_until(stream, marker: bytes, within: float) -> bytes:
    """Read a child's pipe until `marker` appears, without blocking past `within` s."""
    deadline = time.monotonic() + within
    data = b""
    while marker not in data:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([stream], [], [], max(remaining, 0))
        if not ready:
            pytest.fail(f"no {marker!r} within {within}s; got {data!r}")
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            pytest.fail(f"EOF before {marker!r}; got {data!r}")
        data += chunk
    return data


def test_openssl_s_client_implicit_tls(listen):
    openssl = require_tool("openssl")
    host, port = listen(implicit_tls=True)
    command = [openssl, "s_client", "-quiet", "-crlf", "-connect", f"{host}:{port}"]
    command += ["-servername", "mx.test.example"]
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        banner = read_stream_until(proc.stdout, b"220 mx.test.example", within=5)
        proc.stdin.write(b"QUIT\n")
        proc.stdin.flush()
        rest, _ = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert b"220 mx.test.example ESMTP kumo_listener" in banner
    assert b"221 " in banner + rest


# --- implicit TLS ---------------------------------------------------------------------


def test_implicit_tls_banner_comes_over_tls(listen, raw, mail_meta):
    client = implicit_tls_client(raw, listen(implicit_tls=True))
    assert client.reply() == (220, ["mx.test.example ESMTP kumo_listener"])
    lines = client.ehlo()
    assert lines[0] == "mx.test.example Hello client.example"
    assert "STARTTLS" not in lines
    assert client.command("STARTTLS")[0] // 100 == 5
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    assert isinstance(mail_meta["tls_cipher"], str) and mail_meta["tls_cipher"]
    assert mail_meta["tls_protocol_version"]


def test_implicit_tls_uses_the_via_certificate(listen, raw, pki):
    ca = pki.ca()
    one = pki.leaf("mx.one.example", ca=ca)
    address = listen(
        listen="0.0.0.0:0",
        implicit_tls=True,
        via={"127.0.0.2": {"hostname": "mx.one.example", **files(one)}},
    )
    client = implicit_tls_client(raw, ("127.0.0.2", address[1]), client_context(ca))
    assert client.reply() == (220, ["mx.one.example ESMTP kumo_listener"])
    assert peer_certificate(client) == one.cert


@pytest.mark.parametrize("first", [b"EHLO client.example\r\n", b"QUIT\r\n"], ids=["ehlo", "quit"])
def test_implicit_tls_plaintext_client_gets_no_plaintext_reply(listen, raw, first):
    client = raw(listen(implicit_tls=True))
    client.send(first)
    received = client.until_closed(3)
    assert not SMTP_REPLY.search(received), received


def test_implicit_tls_silent_client_is_closed_after_client_timeout(listen, raw):
    client = raw(listen(implicit_tls=True, client_timeout=1))
    received = client.until_closed(5)
    assert not SMTP_REPLY.search(received), received


def test_implicit_tls_with_smtplib(listen, auth_calls, maildir):
    host, port = listen(implicit_tls=True, relay_hosts=[])
    with smtplib.SMTP_SSL(host, port, timeout=10, context=client_context()) as client:
        client.ehlo("client.example")
        log_in_and_relay(client, maildir, "465")


# --- AUTH PLAIN -------------------------------------------------------------------------


def test_auth_before_tls_is_refused_with_538(listen, raw, auth_calls):
    client = raw(listen())
    client.reply()
    lines = client.ehlo()
    assert not any(line.upper().startswith("AUTH") for line in lines)
    code, lines = client.command("AUTH PLAIN " + plain("", "user", "secret"))
    assert code == 538 and lines[-1].startswith("5.7.11 "), lines
    assert auth_calls == []


def test_ehlo_over_tls_advertises_auth_plain_with_a_handler(listen, raw, auth_calls):
    _, lines = tls_session(raw, listen())
    assert "AUTH PLAIN LOGIN" in lines


def test_no_auth_handler_no_auth_over_tls(listen, raw):
    client, lines = tls_session(raw, listen())
    assert not any(line.upper().startswith("AUTH") for line in lines)
    assert client.command("AUTH PLAIN " + plain("", "user", "secret"))[0] // 100 == 5


@pytest.mark.parametrize("two_step", [False, True], ids=["initial-response", "two-step"])
@pytest.mark.parametrize(
    ("authz", "expected_authz"),
    [("", "user"), ("postmaster", "postmaster")],
    ids=["no-authz", "authz"],
)
def test_auth_plain_success(listen, raw, auth_calls, mail_meta, two_step, authz, expected_authz):
    client, _ = tls_session(raw, listen())
    response = plain(authz, "user", "secret")
    if two_step:
        assert client.command("AUTH PLAIN") == (334, [""])
        code, lines = client.command(response)
    else:
        code, lines = client.command(f"AUTH PLAIN {response}")
    assert code == 235, lines
    assert [call[1:] for call in auth_calls] == [("user", "secret")]
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    assert mail_meta["authn_id"] == "user"
    assert mail_meta["authz_id"] == expected_authz


@pytest.mark.parametrize(
    ("exchange", "code", "enhanced"),
    [
        (["AUTH PLAIN " + plain("", "user", "wrong")], 535, "5.7.8"),
        (["AUTH PLAIN " + plain("", "nobody", "secret")], 535, "5.7.8"),
        (["AUTH PLAIN", plain("", "user", "wrong")], 535, "5.7.8"),
        (["AUTH PLAIN !!!!"], 501, None),
        (["AUTH PLAIN ZZZ"], 501, None),
        (["AUTH PLAIN", "!!!!"], 501, None),
        (["AUTH PLAIN", "*"], 501, None),
        (["AUTH PLAIN " + b64(b"user\0secret")], 501, None),
        (["AUTH PLAIN " + b64(b"\0user\0secret\0")], 501, None),
        (["AUTH PLAIN ="], 501, None),
        (["AUTH CRAM-MD5"], 504, None),
    ],
    ids=[
        "wrong-password",
        "unknown-user",
        "two-step-wrong-password",
        "bad-base64",
        "bad-padding",
        "two-step-bad-base64",
        "cancelled",
        "one-nul",
        "three-nuls",
        "empty",
        "cram-md5",
    ],
)
def test_auth_plain_failures_then_success(listen, raw, auth_calls, exchange, code, enhanced):
    client, _ = tls_session(raw, listen())
    *continued, last = exchange
    for line in continued:
        assert client.command(line) == (334, [""])
    got, lines = client.command(last)
    assert got == code, lines
    if enhanced:
        assert lines[-1].startswith(enhanced + " "), lines
    if code != 535:
        assert auth_calls == [], "malformed AUTH must not reach the handler"
    # The session goes on, unauthenticated, and may still log in.
    assert client.command("NOOP") == (250, ["2.0.0 OK"])
    assert client.command("AUTH PLAIN " + plain("", "user", "secret"))[0] == 235


# --- AUTH LOGIN ------------------------------------------------------------------------

USERNAME_PROMPT = (334, ["VXNlcm5hbWU6"])
PASSWORD_PROMPT = (334, ["UGFzc3dvcmQ6"])


@pytest.mark.parametrize("initial_response_ok", [True, False], ids=["initial-response", "two-step"])
def test_smtplib_auth_login_over_starttls(listen, auth_calls, mail_meta, initial_response_ok):
    host, port = listen()
    with smtplib.SMTP(host, port, timeout=10) as client:
        client.starttls(context=client_context())
        client.ehlo("client.example")
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        client.user, client.password = "user", "secret"
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=initial_response_ok)
        assert code == 235
        client.sendmail("a@b.example", ["c@outside.example"], b"Subject: login\r\n\r\nhi\r\n")
    assert auth_calls == [("", "user", "secret")], "LOGIN passes an empty authz"
    assert mail_meta["authn_id"] == mail_meta["authz_id"] == "user"


def test_smtplib_auth_login_with_a_wrong_password(listen, auth_calls):
    host, port = listen()
    with smtplib.SMTP(host, port, timeout=10) as client:
        client.starttls(context=client_context())
        client.ehlo("client.example")
        client.user, client.password = "user", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth("LOGIN", client.auth_login)
        assert refused.value.smtp_code == 535
    assert auth_calls == [("", "user", "wrong")]


@pytest.mark.parametrize(
    ("exchange", "code"),
    [
        (["AUTH LOGIN", "*"], 501),
        (["AUTH LOGIN " + b64(b"user"), "*"], 501),
        (["AUTH LOGIN !!!!"], 501),
        (["AUTH LOGIN", "!!!!"], 501),
        (["AUTH LOGIN " + b64(b"user"), "!!!!"], 501),
        (["AUTH LOGIN ="], 501),
        (["AUTH LOGIN " + b64(b"us\0er")], 501),
        (["AUTH LOGIN " + b64(b"user"), b64(b"wrong")], 535),
        (["AUTH LOGIN", b64(b"nobody"), b64(b"secret")], 535),
    ],
    ids=[
        "cancel-username",
        "cancel-password",
        "bad-base64",
        "two-step-bad-base64",
        "bad-base64-password",
        "empty-username",
        "nul",
        "wrong-password",
        "unknown-user",
    ],
)
def test_auth_login_failures_then_success(listen, raw, auth_calls, exchange, code):
    client, _ = tls_session(raw, listen())
    *continued, last = exchange
    for line in continued:
        assert client.command(line) in (USERNAME_PROMPT, PASSWORD_PROMPT)
    got, lines = client.command(last)
    assert got == code, lines
    if code != 535:
        assert auth_calls == [], "malformed AUTH must not reach the handler"
    assert client.command("AUTH LOGIN") == USERNAME_PROMPT
    assert client.command(b64(b"user")) == PASSWORD_PROMPT
    assert client.command(b64(b"secret"))[0] == 235


def test_auth_login_before_tls_is_refused_with_538(listen, raw, auth_calls):
    client = raw(listen())
    client.reply()
    client.ehlo()
    code, lines = client.command("AUTH LOGIN " + b64(b"user"))
    assert code == 538 and lines[-1].startswith("5.7.11 "), lines
    assert auth_calls == []


def test_swaks_auth_login(listen, auth_calls, maildir):
    host, port = listen()
    result = swaks(
        *("--server", host, "--port", str(port), "--tls"),
        *("--auth", "LOGIN", "--auth-user", "user", "--auth-password", "secret"),
        *("--from", "a@b.example", "--to", "c@outside.example"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert auth_calls == [("", "user", "secret")]
    assert len(delivered(maildir)) == 1


def test_auth_again_after_success_is_503(listen, raw, auth_calls):
    client, _ = tls_session(raw, listen())
    assert client.command("AUTH PLAIN " + plain("", "user", "secret"))[0] == 235
    assert client.command("AUTH PLAIN " + plain("", "user", "secret"))[0] == 503
    assert len(auth_calls) == 1


def test_auth_inside_a_transaction_is_503(listen, raw, auth_calls):
    client, _ = tls_session(raw, listen())
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    assert client.command("AUTH PLAIN " + plain("", "user", "secret"))[0] == 503
    assert auth_calls == []
    assert client.command("RSET")[0] == 250
    assert client.command("AUTH PLAIN " + plain("", "user", "secret"))[0] == 235


def test_authenticated_client_may_relay(listen, raw, auth_calls):
    client, _ = tls_session(raw, listen(relay_hosts=[]))
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    code, lines = client.command("RCPT TO:<c@outside.example>")
    assert code == 550 and lines[-1].startswith("5.7.1 "), lines
    assert client.command("RSET")[0] == 250
    assert client.command("AUTH PLAIN " + plain("", "user", "secret"))[0] == 235
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    assert client.command("RCPT TO:<c@outside.example>")[0] == 250


def test_failed_auth_does_not_allow_relaying(listen, raw, auth_calls):
    client, _ = tls_session(raw, listen(relay_hosts=[]))
    assert client.command("AUTH PLAIN " + plain("", "user", "wrong"))[0] == 535
    assert client.command("MAIL FROM:<a@b.example>")[0] == 250
    assert client.command("RCPT TO:<c@outside.example>")[0] == 550


def test_smtplib_starttls_login_and_send(listen, smtp, pki, auth_calls, maildir):
    ca = pki.ca()
    leaf = pki.leaf("mx.test.example", ca=ca)
    client = smtp(listen(relay_hosts=[], **files(leaf)))
    client.ehlo("client.example")
    assert client.has_extn("starttls") and not client.has_extn("auth")
    assert client.starttls(context=client_context(ca))[0] == 220
    client.ehlo("client.example")
    log_in_and_relay(client, maildir, "relayed")


def test_smtplib_login_with_a_wrong_password(listen, smtp, auth_calls):
    client = smtp(listen())
    client.starttls(context=client_context())
    with pytest.raises(smtplib.SMTPAuthenticationError) as raised:
        client.login("user", "wrong")
    assert raised.value.smtp_code == 535
