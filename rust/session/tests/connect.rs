//! From the accept to the banner: greeting, PROXY, dynamic parameters, per-client limits, timeouts and shutdown.

use super::*;

#[tokio::test]
async fn greeting_with_the_effective_hostname_and_banner() {
    let harness = plain(json!({"hostname": "mx.test", "via": {"198.51.100.1": {"banner": "first\nsecond"}}}));
    let mut client = Client::new(harness.connect(CLIENT, LOCAL));
    assert_eq!(client.reply().await, (220, vec!["mx.test ESMTP first".into(), "second".into()]));
    assert_eq!(client.code("QUIT").await, (221, "2.0.0 mx.test closing connection".into()));
    client.expect_closed().await;
}

#[tokio::test]
async fn talking_before_the_greeting_loses_synchronization() {
    let harness = plain(json!({"hostname": "mx.test"}));
    let mut client = Client::new(harness.connect(CLIENT, LOCAL));
    client.send(b"EHLO early\r\n").await;
    assert_eq!(client.reply().await, (554, vec!["5.5.0 mx.test Error: SMTP protocol synchronization".into()]));
    client.expect_closed().await;
}

#[tokio::test]
async fn http_on_the_smtp_port() {
    let harness = plain(json!({}));
    let mut client = greeted(&harness, CLIENT).await;
    assert_eq!(client.code("GET / HTTP/1.1").await, (221, "2.7.0 Error: I can break rules, too. Goodbye.".into()));
    client.expect_closed().await;
}

#[tokio::test]
async fn a_refusal_at_connect_closes_before_the_banner() {
    let script = |event: &Event| match event {
        Event::ConnectionAccepted { .. } => Outcome::Reject { code: 554, text: "5.7.1 not you".into() },
        _ => nothing(event),
    };
    let harness = harness(json!({}), &[EventKind::ConnectionAccepted], script);
    let mut client = Client::new(harness.connect(CLIENT, LOCAL));
    // No EHLO yet, so no enhanced code.
    assert_eq!(client.reply().await, (554, vec!["not you".into()]));
    client.expect_closed().await;
}

#[tokio::test]
async fn dynamic_parameters_override_for_the_connection() {
    let script = |event: &Event| match event {
        Event::GetDynamicParameters { .. } => {
            let overrides = crate::params::parse_overrides(&json!({"hostname": "dynamic.test"}), "").unwrap();
            Outcome::Done(Response::Params(Arc::new(overrides)))
        }
        _ => nothing(event),
    };
    let harness = harness(json!({"hostname": "static.test"}), &[EventKind::GetDynamicParameters], script);
    let mut client = Client::new(harness.connect(CLIENT, LOCAL));
    assert_eq!(client.reply().await.1[0], "dynamic.test ESMTP kumo_listener");
}

#[tokio::test(start_paused = true)]
async fn a_command_must_arrive_within_client_timeout() {
    let harness = plain(json!({"hostname": "mx.test", "client_timeout": 5}));
    let mut client = greeted(&harness, CLIENT).await;
    client.send(b"NO").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(client.reply().await, (421, vec!["4.3.2 mx.test idle too long, closing connection".into()]));
    client.expect_closed().await;
}

#[tokio::test]
async fn shutdown_answers_waiting_sessions_and_refuses_new_ones() {
    let harness = plain(json!({"hostname": "mx.test"}));
    let mut waiting = greeted(&harness, CLIENT).await;
    harness.shut_down();
    assert_eq!(waiting.reply().await, (421, vec!["4.3.2 mx.test shutting down".into()]));
    waiting.expect_closed().await;
    let mut late = Client::new(harness.connect(CLIENT, LOCAL));
    assert_eq!(late.reply().await, (421, vec!["4.3.2 mx.test shutting down".into()]));
}

#[tokio::test]
async fn a_proxy_header_sets_the_real_addresses_before_the_banner() {
    let seen = Seen::default();
    let recorder = seen.clone();
    let script = move |event: &Event| {
        if let Event::ConnectionAccepted { meta } = event {
            for name in ["received_from", "received_via", "orig_received_from"] {
                recorder.push(meta.get_str(name).unwrap_or_default());
            }
        }
        nothing(event)
    };
    let params = json!({"peer": {"192.0.2.10": {"require_proxy_protocol": true}}, "via": {"203.0.113.5": {"hostname": "proxied.test"}}});
    let harness = harness(params, &[EventKind::ConnectionAccepted], script);
    let mut client = Client::new(harness.connect(CLIENT, LOCAL));
    client.send(b"PROXY TCP4 10.9.8.7 203.0.113.5 1234 25\r\n").await;
    assert_eq!(client.reply().await.1[0], "proxied.test ESMTP kumo_listener");
    assert_eq!(seen.take(), ["10.9.8.7:1234", "203.0.113.5:25", "192.0.2.10:40000"]);

    let mut liar = Client::new(harness.connect(CLIENT, LOCAL));
    liar.send(b"EHLO not-a-proxy\r\n").await;
    liar.expect_closed().await;
    let logged = || harness.logs().iter().any(|line| line.contains("bad PROXY protocol header"));
    for _ in 0..100 {
        if logged() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(logged(), "{:?}", harness.logs());
}

#[tokio::test]
async fn talking_before_the_greeting_behind_a_proxy_loses_synchronization() {
    let (harness, seen) =
        recording_clients(json!({"hostname": "mx.test", "peer": {"192.0.2.10": {"require_proxy_protocol": true}}}));
    // What a proxy forwards from a client that talks first: the header, then the client's words.
    let mut client = Client::new(harness.connect(CLIENT, LOCAL));
    client.send(b"PROXY TCP4 10.9.8.7 203.0.113.5 1234 25\r\nEHLO early\r\n").await;
    assert_eq!(client.reply().await, (554, vec!["5.5.0 mx.test Error: SMTP protocol synchronization".into()]));
    client.expect_closed().await;
    assert_eq!(seen.take(), ["10.9.8.7:1234"], "judged as the real client");
    // The header alone is not talking.
    let mut client = Client::new(harness.connect(CLIENT, LOCAL));
    client.send(b"PROXY TCP4 10.9.8.7 203.0.113.5 1234 25\r\n").await;
    assert_eq!(client.reply().await.0, 220);
    assert_eq!(client.code("EHLO client.test").await.0, 250);
}

#[tokio::test]
async fn ipv6_clients_are_limited_by_their_network() {
    let params = json!({"hostname": "mx.test", "max_connections_per_client": 2,
        "peer": {"2001:db8:2::/48": {"client_ipv6_prefix_length": 128}}});
    let harness = plain(params);
    let _first = greeted(&harness, "[2001:db8:1:2::1]:1").await;
    let _second = greeted(&harness, "[2001:db8:1:2::2]:1").await;
    let mut third = Client::new(harness.connect("[2001:db8:1:2:0:fff:ffff:ffff]:1", LOCAL));
    assert_eq!(third.reply().await, (421, vec!["4.7.0 mx.test too many connections from your address".into()]));
    let _next_network = greeted(&harness, "[2001:db8:1:2:0:1000::1]:1").await;
    // At 128 bits (a peer block), each address counts alone.
    let mut alone = Vec::new();
    for n in [1, 1, 2, 3] {
        alone.push(greeted(&harness, &format!("[2001:db8:2::{n}]:1")).await);
    }
    let mut again = Client::new(harness.connect("[2001:db8:2::1]:2", LOCAL));
    assert_eq!(again.reply().await, (421, vec!["4.7.0 mx.test too many connections from your address".into()]));
}

#[tokio::test]
async fn concurrent_sessions_per_client_address_are_limited() {
    let params = json!({"hostname": "mx.test", "relay_hosts": ["192.0.2.99"], "max_connections_per_client": 1,
        "peer": {"192.0.2.10": {"allow_xclient": true}}});
    let harness = plain(params);
    let first = greeted(&harness, CLIENT).await;
    let mut second = Client::new(harness.connect("192.0.2.10:40001", LOCAL));
    assert_eq!(second.reply().await, (421, vec!["4.7.0 mx.test too many connections from your address".into()]));
    second.expect_closed().await;
    let _elsewhere = greeted(&harness, "192.0.2.11:1").await;
    let _relay_host = greeted(&harness, "192.0.2.99:1").await;
    let _relay_host_again = greeted(&harness, "192.0.2.99:2").await;
    drop(first);
    let mut proxy = greeted(&harness, CLIENT).await;
    // XCLIENT gives up the proxy's slot and takes the real client's: 192.0.2.11 has one already.
    let (code, text) = proxy.command("XCLIENT ADDR=192.0.2.11").await;
    assert_eq!((code, text[0].as_str()), (421, "4.7.0 mx.test too many connections from your address"));
    let _again = greeted(&harness, CLIENT).await;
}

#[tokio::test]
async fn the_connection_rate_per_client_address_is_limited() {
    let harness = plain(json!({"hostname": "mx.test", "max_connection_rate_per_client": "2/hour"}));
    for _ in 0..2 {
        let mut client = greeted(&harness, CLIENT).await;
        client.command("QUIT").await;
    }
    let mut third = Client::new(harness.connect(CLIENT, LOCAL));
    assert_eq!(third.reply().await.0, 421);
    let _other = greeted(&harness, "192.0.2.11:1").await;
}

#[tokio::test]
async fn the_message_rate_per_client_address_is_limited() {
    let harness = plain(json!({"hostname": "mx.test", "max_message_rate_per_client": "2/hour"}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    for _ in 0..2 {
        assert_eq!(client.code("MAIL FROM:<a@b.test>").await.0, 250);
        assert_eq!(client.code("RSET").await.0, 250);
    }
    let refused = (452, "4.7.0 too many messages from your address, try again later".into());
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await, refused);
    let mut again = greeted(&harness, CLIENT).await;
    again.command("EHLO client.test").await;
    assert_eq!(again.code("MAIL FROM:<a@b.test>").await, refused, "counted per address, not per session");
    let mut other = greeted(&harness, "192.0.2.11:1").await;
    other.command("EHLO client.test").await;
    assert_eq!(other.code("MAIL FROM:<a@b.test>").await.0, 250);
}

/// Every connection holds its session's future, sized by the largest state
/// it can be in: the rare or heavy commands are boxed so that an idle
/// connection does not pay for them (3,040 bytes before the body budget,
/// BDAT and LMTP; 5,184 with them unboxed; 2,800 boxed).
#[tokio::test]
async fn an_idle_sessions_future_stays_small() {
    let harness = plain(json!({"hostname": "mx.test"}));
    let (_client, server) = tokio::io::duplex(1024);
    let (remote, local) = ("192.0.2.1:1".parse().unwrap(), "192.0.2.2:25".parse().unwrap());
    let future = crate::session::run(server, remote, local, harness.context.clone());
    assert!(std::mem::size_of_val(&future) <= 3 * 1024, "{} bytes", std::mem::size_of_val(&future));
}
