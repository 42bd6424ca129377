//! LMTP (RFC 2033): LHLO and one reply per recipient.

use super::*;

#[tokio::test]
async fn lmtp_takes_lhlo_instead_of_ehlo_and_helo() {
    let harness = plain(lmtp(json!({"hostname": "mx.test"})));
    let mut client = Client::new(harness.connect(CLIENT, LOCAL));
    assert_eq!(client.reply().await, (220, vec!["mx.test LMTP kumo_listener".to_string()]));
    // No enhanced code before LHLO, as before EHLO in SMTP (RFC 2034).
    let refused = (500, "this is LMTP: say LHLO, not EHLO or HELO".to_string());
    assert_eq!(client.code("EHLO client.test").await, refused);
    assert_eq!(client.code("HELO client.test").await, refused);
    let (code, lines) = client.command("LHLO client.test").await;
    assert_eq!((code, lines[0].as_str()), (250, "mx.test Hello client.test"));
    assert!(lines.contains(&"PIPELINING".to_string()) && lines.contains(&"STARTTLS".to_string()), "{lines:?}");
    assert!(client.code("HELP").await.1.starts_with("2.0.0 commands: LHLO MAIL"));
    assert_eq!(client.code("EHLO client.test").await.0, 500, "not after LHLO either");
    let smtp = plain(json!({}));
    let mut client = greeted(&smtp, CLIENT).await;
    assert_eq!(client.code("LHLO client.test").await, (500, "command not recognized".into()));
}

fn refuse_recipient(refused: &'static str, code: u16) -> impl Fn(&Event) -> Outcome + Send + Sync + 'static {
    move |event: &Event| match event {
        Event::RcptTo { recipient, .. } if recipient.local_part == "unknown" => {
            Outcome::Reject { code: 550, text: "5.1.1 no such user".into() }
        }
        Event::MessageReceived { message, .. } if message.recipients.iter().any(|r| r.local_part == refused) => {
            Outcome::Reject { code, text: format!("{}.7.1 not for {refused}", code / 100) }
        }
        _ => nothing(event),
    }
}

#[tokio::test]
async fn lmtp_answers_each_recipient_with_its_parts_outcome() {
    let maildir = TestMaildir::new("lmtp-each");
    let registered = [EventKind::RcptTo, EventKind::MessageReceived];
    let params = lmtp(json!({"relay_hosts": ["192.0.2.0/24"]}));
    let harness = Harness::new(params, &registered, refuse_recipient("y", 550), maildir.sink()).unwrap();
    let mut client = greeted(&harness, CLIENT).await;
    client.command("LHLO client.test").await;
    let (rcpt, replies) = send_message(&mut client, &["x@d.test", "unknown@d.test", "y@d.test", "z@e.test"]).await;
    assert_eq!(rcpt, [250, 550, 250, 250]);
    assert_eq!(replies.len(), 3, "one reply per accepted recipient: {replies:?}");
    assert!(replies[0].starts_with("250 2.0.0 OK id="), "{replies:?}");
    assert_eq!(replies[1], "550 5.7.1 not for y");
    assert!(replies[2].starts_with("250 2.0.0 OK id=") && replies[2] != replies[0], "{replies:?}");
    assert_eq!(maildir.recipients(), ["x@d.test", "z@e.test"], "the refused part is not stored");
}

#[tokio::test]
async fn lmtp_batch_by_domain_answers_a_domains_recipients_alike() {
    let maildir = TestMaildir::new("lmtp-domain");
    let params = lmtp(json!({"relay_hosts": ["192.0.2.0/24"], "batch_handling": "BatchByDomain"}));
    let harness = Harness::new(params, &[EventKind::MessageReceived], refuse_recipient("y", 450), maildir.sink());
    let harness = harness.unwrap();
    let mut client = greeted(&harness, CLIENT).await;
    client.command("LHLO client.test").await;
    let (_, replies) = send_message(&mut client, &["x@d.test", "w@e.test", "y@D.TEST"]).await;
    let refused = "450 4.7.1 not for y";
    assert_eq!([replies[0].as_str(), &replies[2]], [refused, refused]);
    assert!(replies[1].starts_with("250 2.0.0 OK id="), "{replies:?}");
    assert_eq!(maildir.recipients(), ["w@e.test"]);
}

#[tokio::test]
async fn smtp_still_refuses_the_whole_message_for_one_refused_part() {
    let maildir = TestMaildir::new("smtp-whole");
    let params = json!({"relay_hosts": ["192.0.2.0/24"]});
    let harness = Harness::new(params, &[EventKind::MessageReceived], refuse_recipient("y", 550), maildir.sink());
    let harness = harness.unwrap();
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    let (_, replies) = send_message_smtp(&mut client, &["x@d.test", "y@d.test", "z@e.test"]).await;
    assert_eq!(replies, "550 5.7.1 not for y");
    assert_eq!(maildir.recipients(), Vec::<String>::new());
}

#[tokio::test]
async fn lmtp_a_refusal_before_the_split_answers_every_recipient() {
    let script = |event: &Event| match event {
        Event::Data { .. } => Outcome::Reject { code: 554, text: "5.7.1 spam".into() },
        _ => nothing(event),
    };
    let harness = harness(lmtp(json!({"relay_hosts": ["192.0.2.0/24"]})), &[EventKind::Data], script);
    let mut client = greeted(&harness, CLIENT).await;
    client.command("LHLO client.test").await;
    let (_, replies) = send_message(&mut client, &["x@d.test", "y@d.test"]).await;
    assert_eq!(replies, ["554 5.7.1 spam", "554 5.7.1 spam"]);
}

#[tokio::test]
async fn lmtp_a_message_too_big_is_refused_for_every_recipient() {
    let harness = plain(lmtp(json!({"relay_hosts": ["192.0.2.0/24"], "max_message_size": 10})));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("LHLO client.test").await;
    let (_, replies) = send_message(&mut client, &["x@d.test", "y@d.test"]).await;
    assert_eq!(replies.len(), 2);
    assert!(replies.iter().all(|reply| reply.starts_with("552 5.3.4")), "{replies:?}");
}

#[tokio::test]
async fn lmtp_a_sink_failure_answers_each_stored_recipient_451() {
    let maildir = TestMaildir::new("lmtp-sink");
    // Bodies are spooled apart from the Maildir that is about to go.
    let params = lmtp(json!({"relay_hosts": ["192.0.2.0/24"], "body_spool_path": std::env::temp_dir()}));
    let harness = Harness::new(params, &[EventKind::MessageReceived], refuse_recipient("y", 550), maildir.sink());
    std::fs::remove_dir_all(&maildir.0).unwrap();
    let harness = harness.unwrap();
    let mut client = greeted(&harness, CLIENT).await;
    client.command("LHLO client.test").await;
    let (_, replies) = send_message(&mut client, &["x@d.test", "y@d.test", "z@e.test"]).await;
    let failed = "451 4.3.0 temporary failure storing the message, try again later";
    assert_eq!(replies, [failed, "550 5.7.1 not for y", failed]);
}

#[tokio::test]
async fn lmtp_is_the_reception_protocol_and_in_the_received_header() {
    let seen = Seen::default();
    let recorder = seen.clone();
    let script = move |event: &Event| {
        if let Event::MessageReceived { message, .. } = event {
            let whole = String::from_utf8_lossy(&[message.head.as_ref(), &message.data.to_vec().unwrap()].concat())
                .into_owned();
            let with = whole.split(" with ").nth(1).and_then(|rest| rest.split(' ').next()).unwrap_or_default();
            let meta = message.meta.get_str("reception_protocol").unwrap_or_default();
            recorder.push(format!("{meta} {with}"));
        }
        nothing(event)
    };
    let harness = harness(lmtp(json!({"relay_hosts": ["192.0.2.0/24"]})), &[EventKind::MessageReceived], script);
    let mut client = greeted(&harness, CLIENT).await;
    client.command("LHLO client.test").await;
    send_message(&mut client, &["x@d.test"]).await;
    client.send(b"MAIL FROM:<a@b.test> SMTPUTF8\r\nRCPT TO:<x@d.test>\r\nDATA\r\n").await;
    for code in [250, 250, 354] {
        assert_eq!(client.reply().await.0, code);
    }
    client.send(b"Subject: s\r\n\r\nbody\r\n.\r\n").await;
    assert_eq!(client.reply().await.0, 250);
    assert_eq!(seen.take(), ["LMTP LMTP", "UTF8LMTP UTF8LMTP"]);
}

#[tokio::test]
async fn lmtp_with_starttls_and_auth_is_lmtpsa() {
    let seen = Seen::default();
    let recorder = seen.clone();
    let script = move |event: &Event| match event {
        Event::AuthPlain { .. } => Outcome::Done(Response::Authenticated(true)),
        Event::MessageReceived { message, .. } => {
            recorder.push(message.meta.get_str("reception_protocol").unwrap_or_default());
            nothing(event)
        }
        _ => nothing(event),
    };
    let registered = [EventKind::AuthPlain, EventKind::MessageReceived];
    let harness = harness(lmtp(json!({"hostname": "mx.test"})), &registered, script);
    let mut client = starttls_after(&harness, "LHLO").await;
    assert_eq!(client.code("EHLO client.test").await.0, 500);
    let (_, extensions) = client.command("LHLO client.test").await;
    assert!(extensions.contains(&"AUTH PLAIN LOGIN".to_string()), "{extensions:?}");
    assert_eq!(client.code("AUTH PLAIN AHVzZXIAc2VjcmV0").await.0, 235);
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@anywhere.test>\r\nRCPT TO:<y@anywhere.test>\r\nDATA\r\n").await;
    for code in [250, 250, 250, 354] {
        assert_eq!(client.reply().await.0, code);
    }
    client.send(b"\r\nbody\r\n.\r\n").await;
    assert_eq!([client.reply().await.0, client.reply().await.0], [250, 250]);
    assert_eq!(seen.take(), ["LMTPSA", "LMTPSA"]);
}

#[tokio::test]
async fn lmtp_behind_a_proxy_header_and_with_xclient() {
    let params = lmtp(
        json!({"hostname": "mx.test", "require_proxy_protocol": true, "peer": {"10.9.8.7": {"allow_xclient": true}}}),
    );
    let (harness, seen) = recording_clients(params);
    let mut client = Client::new(harness.connect(CLIENT, LOCAL));
    client.send(b"PROXY TCP4 10.9.8.7 203.0.113.5 1234 25\r\n").await;
    assert_eq!(client.reply().await.1[0], "mx.test LMTP kumo_listener");
    let (_, extensions) = client.command("LHLO proxy.test").await;
    assert!(extensions.iter().any(|e| e.starts_with("XCLIENT ")), "{extensions:?}");
    let (code, text) = client.command("XCLIENT ADDR=10.1.1.1 PORT=5555").await;
    assert_eq!((code, text[0].as_str()), (220, "mx.test LMTP kumo_listener"));
    assert_eq!(client.code("EHLO real-client.test").await.0, 500);
    assert_eq!(client.command("LHLO real-client.test").await.0, 250);
    assert_eq!(seen.take(), ["10.9.8.7:1234", "10.1.1.1:5555"]);
}
