"""Per-client-address limits (Postfix's anvil): concurrent sessions and the
connection rate, decided at accept time from the static parameters."""

from __future__ import annotations

import kumo_listener as kumo
import pytest
from support import RawClient, wait_until

TOO_MANY = (421, ["4.7.0 mx.test.example too many connections from your address"])


def greeting(client: RawClient) -> tuple[int, list[str]]:
    return client.reply()


def test_concurrent_sessions_per_client_address(listen, raw):
    address = listen(max_connections_per_client=2)
    first, second = (raw(address, source="127.0.0.30") for _ in range(2))
    assert greeting(first)[0] == greeting(second)[0] == 220
    third = raw(address, source="127.0.0.30")
    assert greeting(third) == TOO_MANY
    assert third.until_closed() == b""
    assert greeting(raw(address, source="127.0.0.31"))[0] == 220, "another address counts apart"
    # 127.0.0.1 is in relay_hosts (the default), exempt as Postfix exempts $mynetworks.
    assert all(greeting(raw(address, source="127.0.0.1"))[0] == 220 for _ in range(3))
    assert first.command("QUIT")[0] == 221
    first.until_closed()

    def greeted_again() -> bool:
        again = raw(address, source="127.0.0.30")
        if greeting(again)[0] == 220:
            return True
        again.close()
        return False

    wait_until(greeted_again, within=5, what="the slot of a closed session to be given back")


def test_limits_come_from_peer_blocks(listen, raw):
    address = listen(peer={"127.0.0.32": {"max_connections_per_client": 1}})
    assert greeting(raw(address, source="127.0.0.32"))[0] == 220
    assert greeting(raw(address, source="127.0.0.32")) == TOO_MANY
    assert greeting(raw(address, source="127.0.0.33"))[0] == 220, "the default, 50, elsewhere"


def test_connection_rate_per_client_address(listen, raw):
    address = listen(max_connection_rate_per_client="3/hour")
    for _ in range(3):
        client = raw(address, source="127.0.0.34")
        assert greeting(client)[0] == 220
        assert client.command("QUIT")[0] == 221
    refused = raw(address, source="127.0.0.34")
    code, text = greeting(refused)
    assert code == 421 and text[0].startswith("4.7.0 mx.test.example too many connections"), text
    assert greeting(raw(address, source="127.0.0.35"))[0] == 220


def test_bad_limit_values_name_their_key_path(listen):
    rate_error = r"peer.'10.0.0.0/8'.max_connection_rate_per_client: expected a rate"
    with pytest.raises(kumo.ParamsError, match=rate_error):
        listen(peer={"10.0.0.0/8": {"max_connection_rate_per_client": "lots"}})
    with pytest.raises(kumo.ParamsError, match="max_connections_per_client: expected a positive"):
        listen(max_connections_per_client=0)


def test_message_rate_per_client_address(listen, raw):
    address = listen(max_message_rate_per_client="2/hour")
    client = raw(address, source="127.0.0.36")
    assert greeting(client)[0] == 220
    assert client.command("EHLO client.example")[0] == 250
    for _ in range(2):
        assert client.command("MAIL FROM:<a@b.example>")[0] == 250
        assert client.command("RSET")[0] == 250
    assert client.command("MAIL FROM:<a@b.example>") == (
        452,
        ["4.7.0 too many messages from your address, try again later"],
    )
    # Loopback (relay_hosts) is exempt.
    exempt = raw(address)
    assert greeting(exempt)[0] == 220
    assert exempt.command("EHLO client.example")[0] == 250
    for _ in range(3):
        assert exempt.command("MAIL FROM:<a@b.example>")[0] == 250
        assert exempt.command("RSET")[0] == 250
