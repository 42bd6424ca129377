"""An authoritative DNS server for the tests, on loopback (dnslib): TXT, A,
PTR records from a dict, names that never answer and names that SERVFAIL.
The authentication checks are pointed at it with ``kumo.configure_dns``."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterable

from dnslib import PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSError, DNSRecord
from dnslib.server import DNSHandler, DNSServer

TIMEOUT = "timeout"
SERVFAIL = "servfail"


def txt_strings(value: str) -> list[bytes]:
    """A TXT record's text in strings of at most 255 bytes, as a long DKIM key is published."""
    data = value.encode()
    return [data[i : i + 255] for i in range(0, len(data), 255)]


class _Quiet:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class _ThreadingUDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True
    allow_reuse_address = True


class _ThreadingTCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Zone:
    """Records by lower-case name without the final dot: ``("TXT", text)``,
    ``("A", ip)``, ``("PTR", name)``; or a name's behaviour, ``TIMEOUT`` or
    ``SERVFAIL``. Every query is counted in ``queries``."""

    def __init__(self) -> None:
        self.records: dict[str, list[tuple[str, str]]] = {}
        self.behaviour: dict[str, str] = {}
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def add(self, name: str, kind: str, value: str) -> None:
        with self._lock:
            self.records.setdefault(name.lower().rstrip("."), []).append((kind, value))

    def txt(self, name: str, *values: str) -> None:
        for value in values:
            self.add(name, "TXT", value)

    def misbehave(self, names: Iterable[str], how: str) -> None:
        with self._lock:
            for name in names:
                self.behaviour[name.lower().rstrip(".")] = how

    def clear(self) -> None:
        with self._lock:
            self.records.clear()
            self.behaviour.clear()
            self.queries.clear()

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        question = request.q
        name = str(question.qname).lower().rstrip(".")
        kind = QTYPE[question.qtype]
        with self._lock:
            self.queries.append((name, kind))
            how = self.behaviour.get(name)
            records = list(self.records.get(name, []))
        if how == TIMEOUT:
            raise DNSError("no answer, on purpose")
        reply = request.reply()
        if how == SERVFAIL:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if not records and not any(other.endswith("." + name) for other in self.records):
            reply.header.rcode = RCODE.NXDOMAIN
        for record_kind, value in records:
            if record_kind != kind:
                continue
            rdata = {"TXT": lambda v: TXT(txt_strings(v)), "A": A, "PTR": PTR}[kind](value)
            reply.add_answer(RR(question.qname, question.qtype, rdata=rdata, ttl=60))
        if not reply.rr:
            # As a real server answers: the SOA, whose minimum is how long the
            # negative answer may be cached (RFC 2308).
            soa = SOA("ns.test.", "hostmaster.test.", (1, 3600, 600, 86400, 60))
            reply.add_auth(RR("test.", QTYPE.SOA, rdata=soa, ttl=60))
        return reply


class ZoneServer:
    """The zone served over UDP and TCP on one loopback port; `resolver`
    answers instead of a :class:`Zone` when given (dnslib's ``resolve``)."""

    def __init__(self, resolver: object | None = None) -> None:
        self.zone = Zone()
        answers = resolver or self.zone
        self.udp = DNSServer(answers, "127.0.0.1", 0, logger=_Quiet(), server=_ThreadingUDPServer)
        self.port = self.udp.server.server_address[1]
        self.tcp = DNSServer(
            answers, "127.0.0.1", self.port, tcp=True, logger=_Quiet(), server=_ThreadingTCPServer
        )
        self.udp.start_thread()
        self.tcp.start_thread()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.udp.stop()
        self.tcp.stop()
        self.udp.server.server_close()
        self.tcp.server.server_close()
