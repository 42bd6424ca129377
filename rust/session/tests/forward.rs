//! Forwarding (`forward_to`) to a scripted upstream on loopback: what the
//! upstream is sent, and what our client is answered.

use super::*;
use crate::forward::scripted::{self, Script};

const ALL: &[&str] = &["PIPELINING", "8BITMIME", "DSN", "SIZE 1000000"];

fn answers(script: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Script {
    Arc::new(script)
}

fn default_answers() -> Script {
    answers(|_| None)
}

fn forwarding(upstreams: &[&str], extra: Value) -> Value {
    let mut params = json!({"relay_hosts": ["192.0.2.0/24"], "hostname": "mx.test", "forward_to": upstreams,
        "forward_options": {"connect_timeout": 2, "command_timeout": 2, "data_timeout": 2, "backoff": 60}});
    for (key, value) in extra.as_object().unwrap() {
        params[key] = value.clone();
    }
    params
}

async fn client_of(params: Value) -> (Harness, Client<tokio::io::DuplexStream>) {
    let harness = plain(params);
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    (harness, client)
}

/// MAIL, RCPTs, DATA one at a time; the replies to the RCPTs and the reply to the data.
async fn deliver(
    client: &mut Client<tokio::io::DuplexStream>,
    mail: &str,
    rcpts: &[&str],
    body: &str,
) -> (Vec<(u16, String)>, (u16, String)) {
    assert_eq!(client.code(mail).await.0, 250);
    let mut replies = Vec::new();
    for rcpt in rcpts {
        replies.push(client.code(rcpt).await);
    }
    if !replies.iter().any(|(code, _)| *code == 250) {
        return (replies, client.code("RSET").await);
    }
    assert_eq!(client.code("DATA").await.0, 354);
    client.send(body.as_bytes()).await;
    let end = client.reply().await;
    (replies, (end.0, end.1.join("\n")))
}

#[tokio::test]
async fn the_envelope_its_parameters_and_the_body_reach_the_upstream() {
    let upstream = scripted::start(ALL, false, default_answers()).await;
    let (_harness, mut client) = client_of(forwarding(&[&upstream.url], json!({}))).await;
    let (rcpts, end) = deliver(
        &mut client,
        "MAIL FROM:<a@b.test> SIZE=100 RET=HDRS ENVID=x+2By",
        &["RCPT TO:<c@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@d.test", "RCPT TO:<e@d.test>"],
        "Subject: s\r\n\r\n..dotted\r\nbody\r\n.\r\n",
    )
    .await;
    assert_eq!(rcpts, [(250, "2.1.5 OK".into()), (250, "2.1.5 OK".into())]);
    assert_eq!(end.0, 250);
    assert!(end.1.starts_with("2.0.0 OK id=") && end.1.ends_with("queued as UP1"), "{end:?}");
    let (_, ehlo) = client.command("EHLO client.test").await;
    assert!(ehlo.contains(&"SIZE 1000000".to_string()), "the upstream's smaller limit: {ehlo:?}");
    assert!(!ehlo.contains(&"BINARYMIME".to_string()), "the upstream does not take it: {ehlo:?}");
    let seen = upstream.transcript;
    assert_eq!(seen.commands("EHLO"), ["EHLO mx.test"]);
    assert_eq!(seen.commands("MAIL"), ["MAIL FROM:<a@b.test> SIZE=100 RET=HDRS ENVID=x+2By"]);
    assert_eq!(
        seen.commands("RCPT"),
        ["RCPT TO:<c@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@d.test", "RCPT TO:<e@d.test>"]
    );
    let bodies = seen.bodies();
    assert_eq!(bodies.len(), 1);
    assert!(bodies[0].starts_with("Received: from client.test"), "{bodies:?}");
    assert!(bodies[0].ends_with("Subject: s\r\n\r\n.dotted\r\nbody\r\n"), "{bodies:?}");
}

#[tokio::test]
async fn the_upstreams_refusals_are_the_clients_replies() {
    let script = answers(|line| match line {
        "RCPT TO:<nobody@d.test>" => Some("550 5.1.1 no such user here".into()),
        line if line.starts_with("END ") && line.contains("spam") => Some("554 5.7.1 looks like spam".into()),
        _ => None,
    });
    let upstream = scripted::start(ALL, false, script).await;
    let (_harness, mut client) = client_of(forwarding(&[&upstream.url], json!({}))).await;
    let body = "Subject: spam\r\n\r\nspam\r\n.\r\n";
    let (rcpts, end) =
        deliver(&mut client, "MAIL FROM:<a@b.test>", &["RCPT TO:<nobody@d.test>", "RCPT TO:<c@d.test>"], body).await;
    assert_eq!(rcpts[0], (550, "5.1.1 no such user here".into()));
    assert_eq!(rcpts[1].0, 250);
    assert_eq!(end, (554, "5.7.1 looks like spam".into()));
    assert_eq!(client.code("NOOP").await.0, 250, "the session goes on");
}

#[tokio::test]
async fn no_upstream_up_is_a_quick_451_and_the_next_one_is_tried() {
    let closed = format!("smtp://127.0.0.1:{}", closed_port());
    let (_harness, mut client) = client_of(forwarding(&[&closed], json!({}))).await;
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await.0, 250);
    let started = std::time::Instant::now();
    assert_eq!(
        client.code("RCPT TO:<c@d.test>").await,
        (451, "4.4.1 no upstream server available, try again later".into())
    );
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

    let upstream = scripted::start(ALL, false, default_answers()).await;
    let (harness, mut client) = client_of(forwarding(&[&closed, &upstream.url], json!({}))).await;
    let (_, end) = deliver(&mut client, "MAIL FROM:<a@b.test>", &["RCPT TO:<c@d.test>"], "x\r\n.\r\n").await;
    assert_eq!(end.0, 250, "{end:?}");
    assert_eq!(upstream.transcript.bodies().len(), 1);
    drop(harness);
}

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn no_reply_after_the_data_is_a_451_and_a_possible_duplicate() {
    let script = answers(|line| line.starts_with("END ").then(|| "CLOSE".into()));
    let upstream = scripted::start(ALL, false, script).await;
    let (harness, mut client) = client_of(forwarding(&[&upstream.url], json!({}))).await;
    let (_, end) = deliver(&mut client, "MAIL FROM:<a@b.test>", &["RCPT TO:<c@d.test>"], "x\r\n.\r\n").await;
    assert_eq!(end.0, 451);
    assert!(end.1.starts_with("4.4.2 no reply from the upstream after the data"), "{end:?}");
    assert!(harness.logs().iter().any(|line| line.starts_with("possible duplicate: message ")), "{:?}", harness.logs());
}

#[tokio::test]
async fn connections_are_reused_and_an_abandoned_transaction_is_reset() {
    let upstream = scripted::start(ALL, false, default_answers()).await;
    let (_harness, mut client) = client_of(forwarding(&[&upstream.url], json!({}))).await;
    for _ in 0..3 {
        let (_, end) = deliver(&mut client, "MAIL FROM:<a@b.test>", &["RCPT TO:<c@d.test>"], "x\r\n.\r\n").await;
        assert_eq!(end.0, 250);
    }
    assert_eq!(upstream.transcript.commands("CONNECT").len(), 1, "{:?}", upstream.transcript.lines());
    assert!(upstream.transcript.commands("RSET").is_empty(), "a transaction answered after its data is over");
    // The client gives up after RCPT: the upstream's transaction is reset
    // (in the background, once the client has its reply).
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await.0, 250);
    assert_eq!(client.code("RCPT TO:<c@d.test>").await.0, 250);
    assert_eq!(client.code("RSET").await.0, 250);
    for _ in 0..100 {
        if upstream.transcript.commands("RSET").len() == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{:?}", upstream.transcript.lines());
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_replaced_not_refused() {
    let mails = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = mails.clone();
    // The second MAIL, on the pooled connection: the upstream is gone (restarted).
    let script = answers(move |line| {
        let second = line.starts_with("MAIL") && counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1;
        second.then(|| "CLOSE".into())
    });
    let upstream = scripted::start(ALL, false, script).await;
    let (_harness, mut client) = client_of(forwarding(&[&upstream.url], json!({}))).await;
    for _ in 0..2 {
        let (rcpts, end) = deliver(&mut client, "MAIL FROM:<a@b.test>", &["RCPT TO:<c@d.test>"], "x\r\n.\r\n").await;
        assert_eq!((rcpts[0].0, end.0), (250, 250), "{rcpts:?} {end:?}");
    }
    assert_eq!(upstream.transcript.commands("CONNECT").len(), 2);
}

#[tokio::test]
async fn bdat_goes_to_an_upstream_that_offers_chunking() {
    let upstream = scripted::start(&["PIPELINING", "CHUNKING", "BINARYMIME"], false, default_answers()).await;
    let (_harness, mut client) = client_of(forwarding(&[&upstream.url], json!({}))).await;
    let (_, end) = deliver(&mut client, "MAIL FROM:<a@b.test>", &["RCPT TO:<c@d.test>"], "..leading\r\n.\r\n").await;
    assert_eq!(end.0, 250);
    let bdat = upstream.transcript.commands("BDAT");
    assert_eq!(bdat.len(), 1);
    assert!(upstream.transcript.bodies()[0].ends_with("\r\n.leading\r\n"), "no dot-stuffing over BDAT");
}

#[tokio::test]
async fn what_the_upstream_lacks_is_refused_not_downgraded() {
    let upstream = scripted::start(&["PIPELINING"], false, default_answers()).await;
    let (_harness, mut client) = client_of(forwarding(&[&upstream.url], json!({}))).await;
    assert_eq!(client.code("MAIL FROM:<a@b.test> SMTPUTF8").await.0, 250);
    assert_eq!(client.code("RCPT TO:<c@d.test>").await, (553, "5.6.7 the next hop does not support SMTPUTF8".into()));
    assert!(upstream.transcript.commands("MAIL").is_empty());
}

#[tokio::test]
async fn an_lmtp_upstreams_refusal_after_the_data_is_kept_for_an_smtp_client() {
    let script = answers(|line| line.starts_with("END ").then(|| "250 2.0.0 ok|552 5.2.2 mailbox full".into()));
    let upstream = scripted::start(&["PIPELINING"], true, script).await;
    let maildir = TestMaildir::new("forward-kept");
    let params = forwarding(&[&upstream.url], json!({}));
    let harness = Harness::new(params, &[], nothing, maildir.sink()).unwrap();
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    let (_, end) =
        deliver(&mut client, "MAIL FROM:<a@b.test>", &["RCPT TO:<c@d.test>", "RCPT TO:<full@d.test>"], "x\r\n.\r\n")
            .await;
    assert_eq!(end.0, 250, "one recipient was delivered: no 4xx that would deliver it twice");
    assert_eq!(maildir.recipients(), ["full@d.test"], "the refused recipient's copy is kept");
    assert!(
        harness.logs().iter().any(|line| line.starts_with("kept: ") && line.contains("mailbox full")),
        "{:?}",
        harness.logs()
    );
}

#[tokio::test]
async fn an_lmtp_client_gets_each_recipients_reply_from_the_upstream() {
    let script = answers(|line| line.starts_with("END ").then(|| "250 2.0.0 ok|452 4.2.2 over quota".into()));
    let upstream = scripted::start(&["PIPELINING"], true, script).await;
    let harness = plain(lmtp(forwarding(&[&upstream.url], json!({}))));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("LHLO client.test").await;
    let (rcpt, replies) = send_message(&mut client, &["c@d.test", "q@d.test"]).await;
    assert_eq!(rcpt, [250, 250]);
    assert_eq!(replies, ["250 2.0.0 ok", "452 4.2.2 over quota"]);
    assert_eq!(upstream.transcript.commands("LHLO"), ["LHLO mx.test"]);
}

#[tokio::test]
async fn a_policy_refusal_sends_nothing_upstream() {
    let refuse = |event: &Event| match event {
        Event::MessageReceived { .. } => Outcome::Reject { code: 550, text: "5.7.1 not today".into() },
        _ => nothing(event),
    };
    let upstream = scripted::start(ALL, false, default_answers()).await;
    let harness = harness(forwarding(&[&upstream.url], json!({})), &[EventKind::MessageReceived], refuse);
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    let (_, end) = deliver(&mut client, "MAIL FROM:<a@b.test>", &["RCPT TO:<c@d.test>"], "x\r\n.\r\n").await;
    assert_eq!(end, (550, "5.7.1 not today".into()));
    assert!(upstream.transcript.bodies().is_empty());
    assert!(upstream.transcript.commands("DATA").is_empty());
}

#[tokio::test]
async fn a_hung_upstream_times_out_into_a_451() {
    let script = answers(|line| line.starts_with("RCPT").then(|| "HANG".into()));
    let upstream = scripted::start(ALL, false, script).await;
    let (_harness, mut client) = client_of(forwarding(&[&upstream.url], json!({}))).await;
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await.0, 250);
    let started = std::time::Instant::now();
    let (code, _) = client.code("RCPT TO:<c@d.test>").await;
    assert_eq!(code, 451);
    assert!(started.elapsed() < Duration::from_secs(6), "{:?}", started.elapsed());
}
