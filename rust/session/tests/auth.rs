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
