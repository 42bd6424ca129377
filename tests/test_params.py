"""Listener parameters: validation with key paths, and the per-connection
merge base → peer → via → dynamic."""

from __future__ import annotations

import socket
from pathlib import Path

import kumo_listener as kumo
import pytest


def greeting(address: tuple[str, int], raw, via: str = "127.0.0.1", source: str | None = None):
    client = raw((via, address[1]), source)
    return client.reply()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"hostname": 5}, "hostname: expected a string"),
        ({"hostnme": "x"}, "hostnme: unknown"),
        ({"client_timeout": "soon"}, "client_timeout:"),
        ({"invalid_line_endings": "deny"}, "invalid_line_endings:"),
        ({"batch_handling": "Sometimes"}, "batch_handling:"),
        ({"relay_hosts": ["127.0.0.1", "10.0.0.1/33"]}, "relay_hosts[1]:"),
        ({"peer": {"192.168.1.1/24": {}}}, "192.168.1.0/24"),
        (
            {"via": {"10.0.0.1": {"max_connections": 5}}},
            "via.'10.0.0.1'.max_connections: only allowed at the top level of start_esmtp_listener",
        ),
        (
            {"peer": {"10.0.0.0/8": {"via": {"127.0.0.2": {"hostname": 1}}}}},
            "peer.'10.0.0.0/8'.via.'127.0.0.2'.hostname: expected a string",
        ),
        ({"listen": "somewhere"}, "listen:"),
        ({"max_message_size": -1}, "max_message_size:"),
    ],
)
def test_static_errors_name_the_key_path(server, params, message):
    with pytest.raises(ValueError, match=None) as raised:
        server.start_esmtp_listener(**{"listen": "127.0.0.1:0", **params})
    assert message in str(raised.value)


def test_every_static_error_is_reported_at_once(server):
    with pytest.raises(kumo.ParamsError) as raised:
        server.start_esmtp_listener(listen="127.0.0.1:0", hostname=1, banner=2, meta=3)
    text = str(raised.value)
    assert "hostname:" in text and "banner:" in text and "meta:" in text


def test_non_json_meta_is_a_type_error_with_its_path(server):
    with pytest.raises(TypeError, match=r"meta\.when"):
        server.start_esmtp_listener(listen="127.0.0.1:0", meta={"when": object()})


def test_merge_precedence_and_meta_key_by_key(policy, listen, raw):
    seen = {}

    @policy.on("smtp_server_get_dynamic_parameters")
    def dynamic(listener, conn_meta):
        seen["listener"] = listener
        seen["hostname_before_hook"] = conn_meta.get_meta("hostname")
        if conn_meta.get_meta("received_via").startswith("127.0.0.3:"):
            return {"hostname": "dynamic.example", "meta": {"d": "dynamic", "c": "dynamic"}}
        return None

    @policy.on("smtp_server_connection_accepted")
    def accepted(conn_meta):
        seen["meta"] = {k: conn_meta.get_meta(k) for k in ("a", "b", "c", "d", "hostname")}

    address = listen(
        listen="0.0.0.0:0",
        hostname="base.example",
        meta={"a": "base", "b": "base", "c": "base"},
        relay_hosts=["127.0.0.0/8"],
        peer={
            "127.0.0.0/8": {"hostname": "wide-peer.example"},
            "127.0.0.9": {"hostname": "peer.example", "meta": {"b": "peer"}},
        },
        via={
            "127.0.0.2": {"hostname": "via.example", "meta": {"c": "via"}},
            "127.0.0.3": {"banner": "three"},
        },
    )
    assert greeting(address, raw) == (220, ["wide-peer.example ESMTP kumo_listener"])
    assert greeting(address, raw, source="127.0.0.9") == (220, ["peer.example ESMTP kumo_listener"])
    assert seen["meta"] == {
        "a": "base",
        "b": "peer",
        "c": "base",
        "d": None,
        "hostname": "peer.example",
    }
    assert greeting(address, raw, via="127.0.0.2", source="127.0.0.9") == (
        220,
        ["via.example ESMTP kumo_listener"],
    )
    assert seen["meta"]["b"] == "peer" and seen["meta"]["c"] == "via"
    assert greeting(address, raw, via="127.0.0.3", source="127.0.0.9") == (
        220,
        ["dynamic.example ESMTP three"],
    )
    assert seen["meta"] == {
        "a": "base",
        "b": "peer",
        "c": "dynamic",
        "d": "dynamic",
        "hostname": "dynamic.example",
    }
    assert seen["listener"] == "0.0.0.0:0"
    assert seen["hostname_before_hook"] == "peer.example"


def test_nested_blocks_apply_recursively(listen, raw):
    address = listen(
        listen="0.0.0.0:0",
        relay_hosts=["127.0.0.0/8"],
        via={
            "127.0.0.2": {
                "hostname": "via.example",
                "peer": {"127.0.0.9": {"hostname": "via-peer.example"}},
            }
        },
    )
    assert greeting(address, raw, via="127.0.0.2")[1] == ["via.example ESMTP kumo_listener"]
    assert greeting(address, raw, via="127.0.0.2", source="127.0.0.9")[1] == [
        "via-peer.example ESMTP kumo_listener"
    ]


def test_seed_example_wildcard_listener_with_toml_overrides(policy, listen, raw, tmp_path: Path):
    overrides = tmp_path / "listener_params.toml"
    overrides.write_text(
        '[via."127.0.0.2"]\nhostname = "mx.customer-one.example"\n\n'
        '[via."127.0.0.3"]\nhostname = "mx.customer-two.example"\nbanner = "hello two"\n'
    )

    @policy.on("smtp_server_get_dynamic_parameters")
    def dynamic(listener, conn_meta):
        return kumo.serde.toml_load(overrides)

    address = listen(listen="0.0.0.0:0", hostname="default.example")
    assert greeting(address, raw, via="127.0.0.2")[1] == [
        "mx.customer-one.example ESMTP kumo_listener"
    ]
    assert greeting(address, raw, via="127.0.0.3")[1] == ["mx.customer-two.example ESMTP hello two"]
    assert greeting(address, raw, via="127.0.0.4")[1] == ["default.example ESMTP kumo_listener"]
    overrides.write_text('[via."127.0.0.2"]\nhostname = "mx.renamed.example"\n')
    assert greeting(address, raw, via="127.0.0.2")[1] == ["mx.renamed.example ESMTP kumo_listener"]
    assert greeting(address, raw, via="127.0.0.3")[1] == ["default.example ESMTP kumo_listener"]


def test_bad_dynamic_result_fails_only_that_connection(policy, listen, raw, kumo_log):
    @policy.on("smtp_server_get_dynamic_parameters")
    def dynamic(listener, conn_meta):
        if conn_meta.get_meta("received_from").startswith("127.0.0.9:"):
            return {"via": {"127.0.0.1": {"max_connections": 1}}}
        return {"hostname": "fine.example"}

    address = listen(relay_hosts=["127.0.0.0/8"])
    code, lines = greeting(address, raw, source="127.0.0.9")
    assert code == 421 and lines[0].startswith("4.3.0 ")
    assert greeting(address, raw) == (220, ["fine.example ESMTP kumo_listener"])
    assert "via.'127.0.0.1'.max_connections: only allowed at the top level" in kumo_log.text


def test_hook_that_raises_gives_421_and_a_logged_traceback(policy, listen, raw, kumo_log):
    @policy.on("smtp_server_get_dynamic_parameters")
    def dynamic(listener, conn_meta):
        raise RuntimeError("database unreachable")

    code, lines = greeting(listen(), raw)
    assert code == 421 and lines[0].startswith("4.3.0 ")
    assert "database unreachable" in kumo_log.text
    assert "Traceback" in kumo_log.text


def test_listener_params_are_validated_once_and_reusable(policy, listen, raw):
    with pytest.raises(kumo.ParamsError, match=r"via\.'127\.0\.0\.2'\.hostname: expected a string"):
        kumo.ListenerParams({"via": {"127.0.0.2": {"hostname": 2}}})
    with pytest.raises(kumo.ParamsError, match="max_connections: only allowed at the top level"):
        kumo.ListenerParams(max_connections=3)
    validated = kumo.ListenerParams(
        {"via": {"127.0.0.2": {"hostname": "mx.two.example"}}}, banner="validated"
    )
    calls = []

    @policy.on("smtp_server_get_dynamic_parameters")
    def dynamic(listener, conn_meta):
        calls.append(listener)
        return validated

    address = listen(listen="0.0.0.0:0", hostname="default.example")
    assert greeting(address, raw, via="127.0.0.2")[1] == ["mx.two.example ESMTP validated"]
    assert greeting(address, raw, via="127.0.0.3")[1] == ["default.example ESMTP validated"]
    assert len(calls) == 2


def test_hook_returning_a_non_dict_gives_421(policy, listen, raw):
    policy.on("smtp_server_get_dynamic_parameters", lambda listener, meta: ["hostname"])
    assert greeting(listen(), raw)[0] == 421


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 on this host")
def test_dual_stack_listener_matches_ipv4_keys_for_mapped_clients(policy, listen, raw):
    seen = {}
    policy.on(
        "smtp_server_connection_accepted",
        lambda meta: seen.update(src=meta.get_meta("received_from")),
    )
    address = listen(
        listen="[::]:0",
        relay_hosts=["127.0.0.0/8"],
        peer={"127.0.0.9": {"hostname": "v4-peer.example"}},
        via={"127.0.0.2": {"banner": "via two"}},
    )
    assert greeting(address, raw, via="127.0.0.2", source="127.0.0.9") == (
        220,
        ["v4-peer.example ESMTP via two"],
    )
    assert seen["src"].startswith("127.0.0.9:")
    client = raw(("::1", address[1]))
    assert client.reply() == (220, ["mx.test.example ESMTP kumo_listener"])
