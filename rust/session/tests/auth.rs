//! STARTTLS, AUTH and REQUIRETLS.

use super::*;

#[tokio::test]
async fn auth_needs_a_handler_and_tls() {
    let harness = plain(json!({}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    assert_eq!(client.code("AUTH PLAIN AGEAYg==").await, (503, "5.5.1 authentication not enabled".into()));
    let harness = harness_with_auth();
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    assert_eq!(client.code("AUTH PLAIN AGEAYg==").await.0, 538);
}

#[tokio::test]
async fn starttls_discards_pipelined_commands_then_auth_plain_works() {
    let harness = harness_with_auth();
    let mut client = starttls(&harness).await;
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await.0, 503, "EHLO is needed again, nothing was kept");
    let (_, extensions) = client.command("EHLO client.test").await;
    assert!(extensions.contains(&"AUTH PLAIN LOGIN".to_string()) && !extensions.contains(&"STARTTLS".to_string()));
    assert!(extensions.contains(&"REQUIRETLS".to_string()), "{extensions:?}");
    assert_eq!(client.code("STARTTLS").await, (503, "5.5.1 TLS already active".into()));
    // base64 of "\0user\0wrong", then of "\0user\0secret".
    assert_eq!(client.code("AUTH PLAIN AHVzZXIAd3Jvbmc=").await.0, 535);
    assert_eq!(client.code("AUTH MAGIC").await.0, 504);
    assert_eq!(client.command("AUTH PLAIN").await, (334, vec![String::new()]));
    assert_eq!(client.code("AHVzZXIAc2VjcmV0").await, (235, "2.7.0 authentication successful".into()));
    assert_eq!(client.code("AUTH PLAIN AHVzZXIAc2VjcmV0").await.0, 503, "only once");
    client.command("MAIL FROM:<a@b.test>").await;
    assert_eq!(client.code("RCPT TO:<x@anywhere.test>").await.0, 250, "authenticated clients relay");
}

#[tokio::test]
async fn requiretls_needs_tls_and_marks_the_message() {
    let seen = Seen::default();
    let recorder = seen.clone();
    let script = move |event: &Event| {
        if let Event::MessageReceived { message, .. } = event {
            recorder.push(format!(
                "{:?} {:?}",
                message.meta.get("requiretls"),
                message.meta.get_str("reception_protocol")
            ));
        }
        nothing(event)
    };
    let harness =
        harness(json!({"hostname": "mx.test", "relay_hosts": ["192.0.2.0/24"]}), &[EventKind::MessageReceived], script);
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    assert_eq!(
        client.code("MAIL FROM:<a@b.test> REQUIRETLS").await,
        (530, "5.7.10 REQUIRETLS needs TLS, issue STARTTLS first".into())
    );
    let mut client = starttls(&harness).await;
    let (_, extensions) = client.command("EHLO client.test").await;
    assert!(extensions.contains(&"REQUIRETLS".to_string()), "{extensions:?}");
    for (mail, expected) in [
        ("MAIL FROM:<a@b.test> REQUIRETLS", r#"Some(Bool(true)) Some("ESMTPS")"#),
        ("MAIL FROM:<a@b.test> SMTPUTF8", r#"None Some("UTF8SMTPS")"#),
    ] {
        client.send(format!("{mail}\r\nRCPT TO:<x@d.test>\r\nDATA\r\n").as_bytes()).await;
        for code in [250, 250, 354] {
            assert_eq!(client.reply().await.0, code, "{mail}");
        }
        client.send(b"\r\nbody\r\n.\r\n").await;
        assert_eq!(client.reply().await.0, 250);
        assert_eq!(seen.take(), [expected]);
    }
}

#[tokio::test]
async fn auth_login_with_and_without_the_initial_response() {
    let harness = harness_with_auth();
    let mut client = starttls(&harness).await;
    client.command("EHLO client.test").await;
    // "user" is dXNlcg==, "secret" c2VjcmV0, "wrong" d3Jvbmc=.
    assert_eq!(client.code("AUTH LOGIN dXNlcg==").await, (334, "UGFzc3dvcmQ6".into()));
    assert_eq!(client.code("d3Jvbmc=").await, (535, "5.7.8 authentication credentials invalid".into()));
    assert_eq!(client.code("AUTH LOGIN").await, (334, "VXNlcm5hbWU6".into()));
    assert_eq!(client.code("*").await, (501, "5.0.0 authentication cancelled".into()));
    assert_eq!(client.code("AUTH LOGIN").await, (334, "VXNlcm5hbWU6".into()));
    assert_eq!(client.code("dXNlcg==").await, (334, "UGFzc3dvcmQ6".into()));
    assert_eq!(client.code("*").await.0, 501, "cancelled at the password too");
    assert_eq!(client.code("AUTH LOGIN !!!").await, (501, "5.5.2 cannot decode the base64 response".into()));
    assert_eq!(client.code("AUTH LOGIN =").await, (501, "5.5.2 malformed LOGIN response".into()));
    assert_eq!(client.code("AUTH LOGIN").await.0, 334);
    assert_eq!(client.code("dXNlcg==").await.0, 334);
    assert_eq!(client.code(&"A".repeat(2000)).await, (500, "5.5.6 authentication exchange line is too long".into()));
    assert_eq!(client.code("AUTH LOGIN").await.0, 334);
    assert_eq!(client.code("dXNlcg==").await.0, 334);
    assert_eq!(client.code("c2VjcmV0").await, (235, "2.7.0 authentication successful".into()));
    assert_eq!(client.code("AUTH LOGIN dXNlcg==").await.0, 503, "only once");
    client.command("MAIL FROM:<a@b.test>").await;
    assert_eq!(client.code("RCPT TO:<x@anywhere.test>").await.0, 250, "authenticated clients relay");
}

#[tokio::test]
async fn auth_login_passes_an_empty_authz_and_needs_tls() {
    let seen = Seen::default();
    let recorder = seen.clone();
    let script = move |event: &Event| match event {
        Event::AuthPlain { credentials, .. } => {
            recorder.push(format!("{credentials:?}"));
            Outcome::Done(Response::Authenticated(true))
        }
        _ => nothing(event),
    };
    let harness = harness(json!({"hostname": "mx.test"}), &[EventKind::AuthPlain], script);
    let mut plaintext = greeted(&harness, CLIENT).await;
    plaintext.command("EHLO client.test").await;
    assert_eq!(plaintext.code("AUTH LOGIN dXNlcg==").await.0, 538);
    let mut client = starttls(&harness).await;
    client.command("EHLO client.test").await;
    client.command("AUTH LOGIN dXNlcg==").await;
    assert_eq!(client.code("").await.0, 235, "an empty password is the handler's to judge");
    assert_eq!(seen.take(), [r#"PlainCredentials { authz: "", authc: "user", password: "" }"#]);
}

/// Failed AUTH attempts per client across its sessions, as
/// `max_auth_failures_per_client` counts them; "\0user\0wrong" is
/// `AHVzZXIAd3Jvbmc=`, "\0user\0secret" `AHVzZXIAc2VjcmV0`.
#[tokio::test]
async fn failed_auth_is_limited_per_client_across_sessions() {
    let script = |event: &Event| match event {
        Event::AuthPlain { credentials, .. } if credentials.password == "later" => {
            Outcome::Reject { code: 454, text: "4.7.0 try again later".into() }
        }
        Event::AuthPlain { credentials, .. } => {
            Outcome::Done(Response::Authenticated(credentials.password == "secret"))
        }
        _ => nothing(event),
    };
    let params = json!({"hostname": "mx.test", "max_auth_failures_per_client": "3/hour", "relay_hosts": ["192.0.2.99"],
        "peer": {"2001:db8::/32": {"client_ipv6_prefix_length": 64}}});
    let harness = harness(params, &[EventKind::AuthPlain], script);
    for _ in 0..2 {
        let mut client = starttls_from(&harness, CLIENT, "EHLO").await;
        client.command("EHLO client.test").await;
        assert_eq!(client.code("AUTH PLAIN AHVzZXIAd3Jvbmc=").await.0, 535);
        // Neither a malformed response, a cancel, a success nor a 4xx counts as a failure.
        assert_eq!(client.code("AUTH PLAIN !!!").await.0, 501);
        assert_eq!(client.command("AUTH PLAIN").await.0, 334);
        assert_eq!(client.code("*").await.0, 501);
        // base64 of "\0user\0later".
        assert_eq!(client.code("AUTH PLAIN AHVzZXIAbGF0ZXI=").await.0, 454);
    }
    let mut last = starttls_from(&harness, "192.0.2.10:40001", "EHLO").await;
    last.command("EHLO client.test").await;
    assert_eq!(last.code("AUTH PLAIN AHVzZXIAc2VjcmV0").await.0, 235);
    let mut third = starttls_from(&harness, "192.0.2.10:40002", "EHLO").await;
    third.command("EHLO client.test").await;
    assert_eq!(third.code("AUTH PLAIN AHVzZXIAd3Jvbmc=").await.0, 535);
    let mut refused = starttls_from(&harness, "192.0.2.10:40003", "EHLO").await;
    refused.command("EHLO client.test").await;
    assert_eq!(
        refused.code("AUTH PLAIN AHVzZXIAc2VjcmV0").await,
        (421, "4.7.0 mx.test too many failed authentications from your address, try again later".into()),
        "refused before the credentials are looked at"
    );
    refused.expect_closed().await;
    let logged = harness.logs().into_iter().find(|line| line.starts_with("auth-limit: "));
    assert_eq!(
        logged.as_deref(),
        Some(
            "auth-limit: client=192.0.2.10 network=192.0.2.10/32 failures=3 within=3600s port=40003 \
             via=198.51.100.1:25: 421 4.7.0 too many failed AUTH attempts"
        )
    );
    assert_eq!(harness.context.metrics.auth_limit_refusals.load(std::sync::atomic::Ordering::Relaxed), 1);

    // Another address, and relay_hosts, are not held to it.
    let mut other = starttls_from(&harness, "192.0.2.11:1", "EHLO").await;
    other.command("EHLO client.test").await;
    assert_eq!(other.code("AUTH PLAIN AHVzZXIAc2VjcmV0").await.0, 235);
    for port in 1..=5 {
        let mut relay = starttls_from(&harness, &format!("192.0.2.99:{port}"), "EHLO").await;
        relay.command("EHLO client.test").await;
        assert_eq!(relay.code("AUTH PLAIN AHVzZXIAd3Jvbmc=").await.0, 535);
    }

    // IPv6 clients count by their network (here /64, from a peer block).
    for (n, code) in [(1, 535), (2, 535), (3, 535), (4, 421)] {
        let mut client = starttls_from(&harness, &format!("[2001:db8:0:7::{n}]:25000"), "EHLO").await;
        client.command("EHLO client.test").await;
        assert_eq!(client.code("AUTH PLAIN AHVzZXIAd3Jvbmc=").await.0, code);
    }
    let mut next_network = starttls_from(&harness, "[2001:db8:0:8::1]:25000", "EHLO").await;
    next_network.command("EHLO client.test").await;
    assert_eq!(next_network.code("AUTH PLAIN AHVzZXIAc2VjcmV0").await.0, 235);
}
