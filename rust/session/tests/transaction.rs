//! EHLO, MAIL, RCPT, DATA and the policy events of a transaction.

use super::*;

#[tokio::test]
async fn ehlo_lists_extensions_and_helo_does_not() {
    let harness = plain(json!({"hostname": "mx.test", "max_message_size": 1000}));
    let mut client = greeted(&harness, CLIENT).await;
    let (code, lines) = client.command("EHLO client.test").await;
    assert_eq!(code, 250);
    assert_eq!(lines[0], "mx.test Hello client.test");
    let offered =
        ["PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8", "SIZE 1000", "DSN", "CHUNKING", "BINARYMIME"];
    for extension in offered.into_iter().chain(["STARTTLS"]) {
        assert!(lines.contains(&extension.to_string()), "{extension} not in {lines:?}");
    }
    assert!(!lines.iter().any(|line| line.starts_with("REQUIRETLS")), "REQUIRETLS in {lines:?}");
    assert!(!lines.iter().any(|line| line.starts_with("AUTH")), "no AUTH before TLS: {lines:?}");
    assert_eq!(client.command("HELO client.test").await, (250, vec!["mx.test Hello client.test".into()]));
    // After HELO, replies carry no enhanced status codes.
    assert_eq!(client.code("NOOP").await, (250, "OK".into()));
}

#[tokio::test]
async fn the_ehlo_handler_replaces_extensions_or_refuses() {
    let script = |event: &Event| match event {
        Event::Ehlo { domain, .. } if domain == "bad.test" => {
            Outcome::Reject { code: 550, text: "5.7.1 go away".into() }
        }
        Event::Ehlo { .. } => Outcome::Done(Response::Extensions(vec!["PIPELINING".into()])),
        _ => nothing(event),
    };
    let harness = harness(json!({"hostname": "mx.test"}), &[EventKind::Ehlo], script);
    let mut client = greeted(&harness, CLIENT).await;
    assert_eq!(client.command("EHLO good.test").await.1, ["mx.test Hello good.test", "PIPELINING"]);
    assert_eq!(client.code("EHLO bad.test").await, (550, "5.7.1 go away".into()));
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await.0, 503, "no HELO is in force after a refused one");
}

#[tokio::test]
async fn a_pipelined_transaction_is_answered_in_order_and_handed_to_policy() {
    let seen = Seen::default();
    let recorder = seen.clone();
    let script = move |event: &Event| {
        if let Event::MessageReceived { message, .. } = event {
            let body = String::from_utf8_lossy(&message.data.to_vec().unwrap()).into_owned();
            // The Received: header, in the head or at the start of the data, names this message's id.
            let whole = String::from_utf8_lossy(&[message.head.as_ref(), &message.data.to_vec().unwrap()].concat())
                .into_owned();
            assert!(whole.contains(&format!(" id {}\r\n", message.id)), "{whole:?}");
            recorder.push(format!("{} {}", message.recipients[0], body.rsplit("\r\n\r\n").next().unwrap_or_default()));
            recorder.push(message.id.clone());
        }
        nothing(event)
    };
    let harness = harness(json!({"relay_hosts": ["192.0.2.0/24"]}), &[EventKind::MessageReceived], script);
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\nDATA\r\n").await;
    for expected in [250, 250, 250, 354] {
        assert_eq!(client.reply().await.0, expected);
    }
    client.send(b"Subject: hi\r\n\r\n..dot\r\n.\r\n").await;
    let (code, text) = client.reply().await;
    assert_eq!(code, 250, "{text:?}");
    let seen = seen.take();
    assert_eq!([seen[0].as_str(), &seen[2]], ["x@d.test .dot\r\n", "y@d.test .dot\r\n"]);
    // One id per stored message, as its Received: header says.
    assert_eq!(text[0], format!("2.0.0 OK ids={},{}", seen[1], seen[3]));
    // A second transaction on the same connection.
    client.send(b"MAIL FROM:<>\r\nRCPT TO:<x@d.test>\r\nDATA\r\n").await;
    for expected in [250, 250, 354] {
        assert_eq!(client.reply().await.0, expected);
    }
    client.send(b"\r\nbody\r\n.\r\n").await;
    assert_eq!(client.reply().await.0, 250);
}

#[tokio::test]
async fn commands_out_of_sequence() {
    let harness = plain(json!({}));
    let mut client = greeted(&harness, CLIENT).await;
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await, (503, "send EHLO or HELO first".into()));
    client.command("EHLO client.test").await;
    assert_eq!(client.code("RCPT TO:<x@d.test>").await, (503, "5.5.1 need MAIL command first".into()));
    assert_eq!(client.code("DATA").await, (503, "5.5.1 need MAIL command first".into()));
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await.0, 250);
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await, (503, "5.5.1 nested MAIL command".into()));
    assert_eq!(client.code("DATA").await, (503, "5.5.1 need RCPT command first".into()));
    assert_eq!(client.code("RSET").await, (250, "2.0.0 OK".into()));
    assert_eq!(client.code("FOO").await, (500, "5.5.2 command not recognized".into()));
}

#[tokio::test]
async fn relaying_is_refused_outside_relay_hosts() {
    let harness = plain(json!({}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.command("MAIL FROM:<a@b.test>").await;
    assert_eq!(client.code("RCPT TO:<x@d.test>").await, (550, "5.7.1 relaying not permitted".into()));
}

#[tokio::test]
async fn get_listener_domain_opens_a_domain() {
    let script = |event: &Event| match event {
        Event::GetListenerDomain { domain, .. } if domain == "open.test" => {
            Outcome::Done(Response::ListenerDomain(crate::params::ListenerDomain {
                relay_to: true,
                ..Default::default()
            }))
        }
        _ => nothing(event),
    };
    let harness = harness(json!({}), &[EventKind::GetListenerDomain], script);
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.command("MAIL FROM:<a@b.test>").await;
    assert_eq!(client.code("RCPT TO:<x@open.test>").await.0, 250);
    assert_eq!(client.code("RCPT TO:<x@closed.test>").await.0, 550);
}

#[tokio::test]
async fn limits_on_recipients_size_lines_and_errors() {
    let harness = plain(json!({
        "hostname": "mx.test", "relay_hosts": ["192.0.2.0/24"], "max_recipients_per_message": 1,
        "max_message_size": 100, "line_length_hard_limit": 600,
    }));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    assert_eq!(client.code("MAIL FROM:<a@b.test> SIZE=101").await.0, 552);
    client.command("MAIL FROM:<a@b.test>").await;
    assert_eq!(client.code("RCPT TO:<x@d.test>").await.0, 250);
    assert_eq!(client.code("RCPT TO:<y@d.test>").await, (452, "4.5.3 too many recipients".into()));
    assert_eq!(client.code("DATA").await.0, 354);
    client.send(&[b"x".repeat(200).as_slice(), b"\r\n.\r\n"].concat()).await;
    assert_eq!(client.reply().await, (552, vec!["5.3.4 message size exceeds fixed maximum message size".into()]));
    assert_eq!(client.code(&"N".repeat(700)).await, (500, "5.2.3 line too long".into()));
    for _ in 0..17 {
        assert_eq!(client.code("BOGUS").await.0, 500);
    }
    assert_eq!(client.reply().await, (421, vec!["4.7.0 mx.test too many errors".into()]));
    client.expect_closed().await;
}

#[tokio::test]
async fn bare_line_endings_in_data_are_refused_after_the_terminator() {
    let harness = plain(json!({"relay_hosts": ["192.0.2.0/24"]}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nDATA\r\n").await;
    for expected in [250, 250, 354] {
        assert_eq!(client.reply().await.0, expected);
    }
    client.send(b"smuggled\n.\nMAIL FROM:<evil@x>\r\n.\r\n").await;
    assert_eq!(client.reply().await.0, 550);
    assert_eq!(client.code("NOOP").await.0, 250, "the smuggled command was part of the message");
}

#[tokio::test]
async fn policy_refusals_and_failures_at_each_stage() {
    let script = |event: &Event| match event {
        Event::MailFrom { sender, .. } if sender.local_part == "fail" => Outcome::Failed("broken".into()),
        Event::MailFrom { sender, .. } if sender.local_part == "bye" => {
            Outcome::Reject { code: 421, text: "later".into() }
        }
        Event::MailFrom { .. } => Outcome::Reject { code: 550, text: "no senders".into() },
        _ => nothing(event),
    };
    let harness = harness(json!({"hostname": "mx.test"}), &[EventKind::MailFrom], script);
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await, (550, "5.0.0 no senders".into()));
    assert_eq!(
        client.code("MAIL FROM:<fail@b.test>").await,
        (451, "4.3.0 temporary policy failure, try again later".into())
    );
    assert_eq!(client.code("MAIL FROM:<bye@b.test>").await, (421, "4.0.0 later".into()));
    client.expect_closed().await;
}

/// Each parameter as `KEY=value` or `KEY`, in order.
fn shown(params: &crate::protocol::parser::EsmtpParams) -> String {
    let shown: Vec<String> = params
        .iter()
        .map(|(keyword, value)| match value {
            Some(value) => format!("{keyword}={value}"),
            None => keyword.to_string(),
        })
        .collect();
    shown.join(" ")
}

#[tokio::test]
async fn esmtp_parameters_reach_every_event_and_message() {
    let seen = Seen::default();
    let recorder = seen.clone();
    let script = move |event: &Event| {
        match event {
            Event::MailFrom { sender, .. } => recorder.push(format!("mail <{sender}> {}", shown(&sender.params))),
            Event::RcptTo { recipient, .. } => {
                recorder.push(format!("rcpt <{recipient}> {}", shown(&recipient.params)))
            }
            Event::Data { message, .. } | Event::MessageReceived { message, .. } => {
                let recipients: Vec<String> =
                    message.recipients.iter().map(|r| format!("<{r}> {}", shown(&r.params))).collect();
                recorder.push(format!("{} {}", shown(&message.sender.params), recipients.join(", ")));
            }
            _ => {}
        }
        nothing(event)
    };
    let registered = [EventKind::MailFrom, EventKind::RcptTo, EventKind::Data, EventKind::MessageReceived];
    let harness = harness(json!({"relay_hosts": ["192.0.2.0/24"]}), &registered, script);
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client
        .send(
            b"MAIL FROM:<> RET=HDRS ENVID=QQ+2B1 SIZE=10\r\n\
              RCPT TO:<x@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+2By@d.test\r\n\
              RCPT TO:<y@d.test>\r\nDATA\r\n",
        )
        .await;
    for expected in [250, 250, 250, 354] {
        assert_eq!(client.reply().await.0, expected);
    }
    client.send(b"\r\nbody\r\n.\r\n").await;
    assert_eq!(client.reply().await.0, 250);
    let mail = "RET=HDRS ENVID=QQ+1 SIZE=10";
    let x = "<x@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+y@d.test";
    assert_eq!(
        seen.take(),
        [
            format!("mail <> {mail}"),
            "rcpt <x@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+y@d.test".into(),
            "rcpt <y@d.test> ".into(),
            format!("{mail} {x}, <y@d.test> "),
            format!("{mail} {x}"),
            format!("{mail} <y@d.test> "),
        ]
    );
    assert_eq!(client.code("MAIL FROM:<a@b.test> NOTIFY=NEVER").await.0, 555);
    assert_eq!(client.code("MAIL FROM:<a@b.test> BODY=BINARY").await.0, 501);
    assert_eq!(client.code("MAIL FROM:<a@b.test> RET=ALL").await.0, 501);
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await.0, 250);
    assert_eq!(client.code("RCPT TO:<x@d.test> NOTIFY=NEVER,DELAY").await.0, 501);
    assert_eq!(client.code("RCPT TO:<x@d.test> RET=FULL").await.0, 555);
}

#[tokio::test]
async fn help_lists_what_is_available_and_expn_is_not_implemented() {
    let harness = harness(json!({"hostname": "mx.test", "allow_xclient": true}), &[EventKind::AuthPlain], nothing);
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    let (code, help) = client.code("HELP").await;
    assert_eq!(code, 214);
    assert!(help.ends_with("VRFY HELP STARTTLS XCLIENT"), "{help}");
    for command in ["EXPN staff", "ETRN d.test", "TURN"] {
        assert_eq!(client.code(command).await, (502, "5.5.1 command not implemented".into()));
    }
    let mut client = starttls(&harness).await;
    client.command("EHLO client.test").await;
    assert!(client.code("HELP").await.1.ends_with("VRFY HELP AUTH XCLIENT"));
    let plain_harness = plain(json!({}));
    let mut client = greeted(&plain_harness, CLIENT).await;
    assert!(client.code("HELP").await.1.ends_with("VRFY HELP STARTTLS"));
}

#[tokio::test]
async fn the_maildir_keeps_the_envelope_and_each_part_its_for_clause() {
    let root = std::env::temp_dir().join(format!("kumo-session-envelope-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for (handling, files) in [("BifurcateAlways", 3), ("BatchByDomain", 2)] {
        let params = json!({"hostname": "mx.test", "relay_hosts": ["192.0.2.0/24"], "batch_handling": handling});
        let harness =
            Harness::new(params, &[], nothing, Sink::Maildir(Arc::new(crate::sink::Maildir::open(&root).unwrap())))
                .unwrap();
        let mut client = greeted(&harness, CLIENT).await;
        client.command("EHLO client.test").await;
        client
            .send(b"MAIL FROM:<>\r\nRCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\nRCPT TO:<z@e.test>\r\nDATA\r\n")
            .await;
        for code in [250, 250, 250, 250, 354] {
            assert_eq!(client.reply().await.0, code);
        }
        client.send(b"Subject: s\r\n\r\nbody\r\n.\r\n").await;
        assert_eq!(client.reply().await.0, 250);
        let new = root.join("new");
        let mut stored: Vec<String> = std::fs::read_dir(&new)
            .unwrap()
            .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap())
            .collect();
        stored.sort();
        assert_eq!(stored.len(), files, "{handling}");
        for file in &stored {
            assert!(file.starts_with("Return-Path: <>\r\nDelivered-To: "), "{file:?}");
            assert!(file.ends_with("\r\nSubject: s\r\n\r\nbody\r\n"), "{file:?}");
            let delivered: Vec<&str> = file.lines().filter_map(|line| line.strip_prefix("Delivered-To: ")).collect();
            let received = &file[file.find("Received: ").unwrap()..];
            match delivered.as_slice() {
                [only] => assert!(received.contains(&format!("\tfor <{only}>;")), "{file:?}"),
                _ => assert!(!received.contains("for <"), "{file:?}"),
            }
        }
        if handling == "BatchByDomain" {
            assert!(stored.iter().any(|file| file.contains("Delivered-To: x@d.test\r\nDelivered-To: y@d.test\r\n")));
        }
        for entry in std::fs::read_dir(&new).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
    }
    std::fs::remove_dir_all(root).unwrap();
}

#[tokio::test]
async fn one_recipient_keeps_the_received_header_in_the_body() {
    let seen = Seen::default();
    let recorder = seen.clone();
    let script = move |event: &Event| {
        if let Event::MessageReceived { message, .. } = event {
            let data = message.data.to_vec().unwrap();
            let data = String::from_utf8_lossy(&data);
            recorder.push(format!("{} {}", message.head.len(), data.contains("for <x@d.test>;")));
        }
        nothing(event)
    };
    let harness = harness(json!({"relay_hosts": ["192.0.2.0/24"]}), &[EventKind::MessageReceived], script);
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nDATA\r\n").await;
    for code in [250, 250, 354] {
        assert_eq!(client.reply().await.0, code);
    }
    client.send(b"\r\nbody\r\n.\r\n").await;
    assert_eq!(client.reply().await.0, 250);
    assert_eq!(seen.take(), ["0 true"], "no separate head: the header was read into the body's buffer");
}

/// Sends `commands` in one write and gives the code of each reply.
async fn pipelined<S: AsyncRead + AsyncWrite + Unpin>(client: &mut Client<S>, commands: &[String]) -> Vec<u16> {
    client.send(commands.iter().map(|command| format!("{command}\r\n")).collect::<String>().as_bytes()).await;
    let mut codes = Vec::with_capacity(commands.len());
    for _ in commands {
        codes.push(client.reply().await.0);
    }
    codes
}

/// A body of `size` octets or a little more, in lines of 1,000.
fn body_of(size: usize) -> Vec<u8> {
    let mut body = b"\r\n".to_vec();
    while body.len() < size {
        body.extend_from_slice(&[b"y".repeat(998).as_slice(), b"\r\n"].concat());
    }
    body
}

/// A recipient of `RFC 5321`'s longest path, 256 octets, numbered `n`.
fn longest_recipient(n: usize) -> String {
    let domain = format!("{}.{}.{}", "d".repeat(63), "d".repeat(63), "d".repeat(61));
    format!("RCPT TO:<{n:0>64}@{domain}>")
}

#[tokio::test]
async fn recipients_hold_the_memory_budget_until_the_transaction_ends() {
    let harness = plain(json!({"hostname": "mx.test", "relay_hosts": ["192.0.2.0/24"], "body_memory_limit": "96 KiB"}));
    let spool = harness.context.spool.clone();
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    let mut transaction = vec!["MAIL FROM:<a@b.test>".to_string()];
    transaction.extend((0..400).map(longest_recipient));
    let codes = pipelined(&mut client, &transaction).await;
    let accepted = codes.iter().filter(|code| **code == 250).count() - 1;
    assert!((100..300).contains(&accepted), "{accepted} recipients of 256 octets in 96 KiB");
    assert!(codes[1..].iter().skip(accepted).all(|code| *code == 452), "{codes:?}");
    assert!(spool.in_memory_bytes() <= 96 * 1024);
    // The connection goes on; the refusal is the storage one.
    assert_eq!(client.code(&longest_recipient(400)).await, (452, "4.3.1 insufficient system storage".into()));
    // With the budget used up, a new session could hold nothing: shed.
    let mut shed = Client::new(harness.connect("192.0.2.11:1", LOCAL));
    assert_eq!(shed.reply().await, (421, vec!["4.3.2 mx.test service busy, try again later".into()]));
    // RSET gives it all back.
    assert_eq!(client.code("RSET").await.0, 250);
    assert_eq!(spool.in_memory_bytes(), 0);
    greeted(&harness, "192.0.2.11:1").await;
    // So does the end of the message.
    let message: Vec<String> = ["MAIL FROM:<a@b.test>", "RCPT TO:<x@d.test>", "RCPT TO:<y@d.test>", "DATA"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(pipelined(&mut client, &message).await, [250, 250, 250, 354]);
    assert!(spool.in_memory_bytes() > 0);
    assert_eq!(client.command("\r\nbody\r\n.").await.0, 250);
    assert_eq!(spool.in_memory_bytes(), 0);
    // And the end of the session.
    assert_eq!(pipelined(&mut client, &message[..3]).await, [250, 250, 250]);
    assert!(spool.in_memory_bytes() > 0);
    drop(client);
    for _ in 0..100 {
        if spool.in_memory_bytes() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} bytes still held after the session ended", spool.in_memory_bytes());
}

#[tokio::test]
async fn over_long_recipients_are_refused_and_hold_nothing() {
    let harness = plain(json!({"relay_hosts": ["192.0.2.0/24"]}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.command("MAIL FROM:<a@b.test>").await;
    let held = harness.context.spool.in_memory_bytes();
    let (code, text) = client.code(&format!("RCPT TO:<{}@d.test>", "a".repeat(976))).await;
    assert_eq!((code, &text[..5]), (501, "5.1.3"), "{text}");
    assert_eq!(client.code(&longest_recipient(1)).await.0, 250);
    assert!(harness.context.spool.in_memory_bytes() > held);
}

#[tokio::test]
async fn a_full_spool_refuses_only_the_messages_that_need_it() {
    // No file system behind the spool: it has no room at all.
    let missing = std::env::temp_dir().join(format!("kumo-no-spool-{}", std::process::id())).join("missing");
    let harness = plain(json!({
        "hostname": "mx.test", "relay_hosts": ["192.0.2.0/24"], "body_spool_path": missing,
        "body_spill_threshold": "64 KiB",
    }));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    let small = ["MAIL FROM:<a@b.test> SIZE=1000", "RCPT TO:<x@d.test>", "DATA"].map(String::from);
    assert_eq!(pipelined(&mut client, &small).await, [250, 250, 354]);
    assert_eq!(client.command("\r\nsmall\r\n.").await.0, 250, "a small message stays in memory");
    let announced = client.code("MAIL FROM:<a@b.test> SIZE=70000").await;
    assert_eq!(announced, (452, "4.3.1 insufficient system storage".into()));
    let unannounced = ["MAIL FROM:<a@b.test>", "RCPT TO:<x@d.test>", "DATA"].map(String::from);
    assert_eq!(pipelined(&mut client, &unannounced).await, [250, 250, 354]);
    client.send(&[body_of(100_000).as_slice(), b".\r\n"].concat()).await;
    assert_eq!(client.reply().await, (452, vec!["4.3.1 insufficient system storage".into()]));
    assert_eq!(pipelined(&mut client, &small).await, [250, 250, 354]);
    assert_eq!(client.command("\r\nsmall again\r\n.").await.0, 250);
    assert_eq!(harness.context.spool.in_memory_bytes(), 0);
}

#[tokio::test]
async fn a_clients_spilled_bytes_are_capped_across_its_sessions() {
    let script = |event: &Event| match event {
        Event::GetListenerDomain { .. } => Outcome::Done(Response::ListenerDomain(crate::params::ListenerDomain {
            relay_to: true,
            ..Default::default()
        })),
        _ => nothing(event),
    };
    let params = json!({
        "hostname": "mx.test", "body_spill_threshold": "4 KiB", "max_spilled_bytes_per_client": "40 KiB",
        "relay_hosts": ["192.0.2.12"],
    });
    let harness = harness(params, &[EventKind::GetListenerDomain], script);
    let open = ["MAIL FROM:<a@b.test>", "RCPT TO:<x@d.test>", "DATA"].map(String::from);
    let body = body_of;
    let mut stalled = greeted(&harness, CLIENT).await;
    stalled.command("EHLO client.test").await;
    assert_eq!(pipelined(&mut stalled, &open).await, [250, 250, 354]);
    stalled.send(&body(30_000)).await;
    let mut same = greeted(&harness, "192.0.2.10:40001").await;
    same.command("EHLO client.test").await;
    let refused = (452, "4.7.0 too much mail from your address is waiting here, try again later".into());
    // Known at MAIL from SIZE= (once the stalled body is counted).
    for _ in 0..100 {
        if same.code("MAIL FROM:<a@b.test> SIZE=20000").await == refused {
            break;
        }
        same.command("RSET").await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(same.code("MAIL FROM:<a@b.test> SIZE=20000").await, refused);
    assert_eq!(same.code("MAIL FROM:<a@b.test> SIZE=2000").await.0, 250, "it would stay in memory");
    same.command("RSET").await;
    // Found as the body arrives otherwise.
    assert_eq!(pipelined(&mut same, &open).await, [250, 250, 354]);
    same.send(&[body(20_000).as_slice(), b".\r\n"].concat()).await;
    assert_eq!(same.reply().await, (refused.0, vec![refused.1.clone()]));
    // Another address has its own count.
    let mut other = greeted(&harness, "192.0.2.11:1").await;
    other.command("EHLO client.test").await;
    assert_eq!(pipelined(&mut other, &open).await, [250, 250, 354]);
    other.send(&[body(20_000).as_slice(), b".\r\n"].concat()).await;
    assert_eq!(other.reply().await.0, 250);
    // relay_hosts are exempt, as from the other per-client limits.
    let mut relay = greeted(&harness, "192.0.2.12:1").await;
    relay.command("EHLO client.test").await;
    assert_eq!(relay.code("MAIL FROM:<a@b.test> SIZE=60000").await.0, 250);
    assert_eq!(pipelined(&mut relay, &open[1..]).await, [250, 354]);
    relay.send(&[body(60_000).as_slice(), b".\r\n"].concat()).await;
    assert_eq!(relay.reply().await.0, 250);
    // Once the stalled body is done, the client may spill again.
    stalled.send(b".\r\n").await;
    assert_eq!(stalled.reply().await.0, 250);
    assert_eq!(pipelined(&mut same, &open).await, [250, 250, 354]);
    same.send(&[body(20_000).as_slice(), b".\r\n"].concat()).await;
    assert_eq!(same.reply().await.0, 250);
}

#[tokio::test(start_paused = true)]
async fn a_body_may_take_no_longer_than_max_data_duration_whatever_its_pace() {
    let harness = plain(json!({
        "hostname": "mx.test", "relay_hosts": ["192.0.2.0/24"], "client_timeout": 60, "max_data_duration": "30s",
    }));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    let open = ["MAIL FROM:<a@b.test>", "RCPT TO:<x@d.test>", "DATA"].map(String::from);
    assert_eq!(pipelined(&mut client, &open).await, [250, 250, 354]);
    // 4 KB a second: far above the 500 bytes/s rule, never idle.
    for _ in 0..29 {
        client.send(&[b"x".repeat(3998).as_slice(), b"\r\n"].concat()).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(client.reply().await, (421, vec!["4.4.2 mx.test data timeout, closing connection".into()]));
    client.expect_closed().await;
}

#[tokio::test]
async fn rewrite_response_changes_what_the_client_is_told() {
    let seen = Seen::default();
    let recorder = seen.clone();
    let script = move |event: &Event| match event {
        Event::RewriteResponse { status, response, command, .. } => {
            recorder.push(format!("{status} {command:?} {response}"));
            match (*status, command.as_deref()) {
                (220, None) => {
                    Outcome::Done(Response::Rewritten { status: None, response: Some("hello there".into()) })
                }
                (550, Some("RCPT")) => {
                    Outcome::Done(Response::Rewritten { status: Some(450), response: Some("4.7.1 later".into()) })
                }
                (250, Some("NOOP")) => Outcome::Failed("the handler raised".into()),
                _ => Outcome::Done(Response::Nothing),
            }
        }
        _ => nothing(event),
    };
    let params = json!({"relay_hosts": []});
    let harness = harness(params, &[EventKind::RewriteResponse], script);
    let mut client = Client::new(harness.connect(CLIENT, LOCAL));
    assert_eq!(client.reply().await, (220, vec!["hello there".to_string()]));
    client.command("EHLO client.test").await;
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await, (250, "2.1.0 OK".into()));
    assert_eq!(client.code("RCPT TO:<c@elsewhere.test>").await, (450, "4.7.1 later".into()));
    assert_eq!(client.code("NOOP").await, (250, "2.0.0 OK".into()), "a failing handler changes nothing");
    let seen = seen.take();
    assert!(seen[0].starts_with("220 None ") && seen[0].ends_with(" ESMTP kumo_listener"), "{seen:?}");
    assert!(seen.contains(&"550 Some(\"RCPT\") 5.7.1 relaying not permitted".to_string()), "{seen:?}");
}

#[tokio::test]
async fn split_transaction_groups_the_recipients_as_policy_says() {
    let maildir = TestMaildir::new("split-groups");
    let script = |event: &Event| match event {
        Event::SplitTransaction { message, .. } if message.recipients.len() == 3 => {
            Outcome::Done(Response::Groups(vec![vec!["x@a.test".into(), "z@c.test".into()], vec!["y@b.test".into()]]))
        }
        Event::SplitTransaction { .. } => Outcome::Done(Response::Groups(vec![vec!["x@a.test".into()]])),
        _ => nothing(event),
    };
    let params = lmtp(json!({"relay_hosts": ["192.0.2.0/24"]}));
    let harness = Harness::new(params, &[EventKind::SplitTransaction], script, maildir.sink()).unwrap();
    let mut client = greeted(&harness, CLIENT).await;
    client.command("LHLO client.test").await;
    let (_, replies) = send_message(&mut client, &["x@a.test", "y@b.test", "z@c.test"]).await;
    let ids: Vec<&str> = replies.iter().map(|reply| reply.rsplit('=').next().unwrap()).collect();
    assert_eq!(ids[0], ids[2], "x and z are one part: {replies:?}");
    assert_ne!(ids[0], ids[1]);
    assert_eq!(maildir.recipients(), ["x@a.test", "y@b.test", "z@c.test"]);
    // Groups that leave a recipient out are a policy failure: 451 for each.
    let (_, replies) = send_message(&mut client, &["x@a.test", "y@b.test"]).await;
    assert_eq!(replies, ["451 4.3.0 temporary policy failure, try again later"; 2]);
}
