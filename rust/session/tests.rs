//! Dialogues with a real session over an in-memory pipe, one or more per
//! command family, against a scripted policy.

use super::testing::Harness;
use crate::events::{Event, EventKind, Outcome, Response};
use crate::sink::Sink;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsConnector;

const CLIENT: &str = "192.0.2.10:40000";
const LOCAL: &str = "198.51.100.1:25";

/// The client's end of a session.
struct Client<S> {
    stream: S,
    buffer: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(stream: S) -> Self {
        Self { stream, buffer: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("the session reads");
    }

    /// One reply line without CRLF; `None` once the session closed.
    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|pair| pair == b"\r\n") {
                let line = String::from_utf8(self.buffer[..end].to_vec()).expect("UTF-8 reply");
                self.buffer.drain(..end + 2);
                return Some(line);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// One whole reply: its code and the text of each line.
    async fn reply(&mut self) -> (u16, Vec<String>) {
        let mut texts = Vec::new();
        loop {
            let line = self.line().await.expect("a reply before the close");
            let bytes = line.as_bytes();
            assert!(bytes.len() >= 4 && bytes[..3].iter().all(u8::is_ascii_digit), "{line:?}");
            texts.push(line[4..].to_string());
            if bytes[3] == b' ' {
                return (line[..3].parse().expect("digits"), texts);
            }
            assert_eq!(bytes[3], b'-', "{line:?}");
        }
    }

    async fn command(&mut self, line: &str) -> (u16, Vec<String>) {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// The code and first line of the next reply.
    async fn code(&mut self, line: &str) -> (u16, String) {
        let (code, texts) = self.command(line).await;
        (code, texts.into_iter().next().unwrap_or_default())
    }

    async fn expect_closed(&mut self) {
        assert_eq!(self.line().await, None, "the session should have closed");
    }
}

fn nothing(_: &Event) -> Outcome {
    Outcome::Done(Response::Nothing)
}

fn harness(
    params: Value,
    registered: &[EventKind],
    script: impl Fn(&Event) -> Outcome + Send + Sync + 'static,
) -> Harness {
    Harness::new(params, registered, script, Sink::Discard).expect("valid parameters")
}

fn plain(params: Value) -> Harness {
    harness(params, &[], nothing)
}

async fn greeted(harness: &Harness, remote: &str) -> Client<tokio::io::DuplexStream> {
    let mut client = Client::new(harness.connect(remote, LOCAL));
    assert_eq!(client.reply().await.0, 220);
    client
}

/// What a scripted policy was asked, in order.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn push(&self, entry: String) {
        self.0.lock().unwrap().push(entry);
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

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
async fn ehlo_lists_extensions_and_helo_does_not() {
    let harness = plain(json!({"hostname": "mx.test", "max_message_size": 1000}));
    let mut client = greeted(&harness, CLIENT).await;
    let (code, lines) = client.command("EHLO client.test").await;
    assert_eq!(code, 250);
    assert_eq!(lines[0], "mx.test Hello client.test");
    for extension in ["PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8", "SIZE 1000", "DSN", "STARTTLS"] {
        assert!(lines.contains(&extension.to_string()), "{extension} not in {lines:?}");
    }
    for absent in ["REQUIRETLS", "CHUNKING", "BINARYMIME"] {
        assert!(!lines.iter().any(|line| line.starts_with(absent)), "{absent} in {lines:?}");
    }
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
async fn http_on_the_smtp_port() {
    let harness = plain(json!({}));
    let mut client = greeted(&harness, CLIENT).await;
    assert_eq!(client.code("GET / HTTP/1.1").await, (221, "2.7.0 Error: I can break rules, too. Goodbye.".into()));
    client.expect_closed().await;
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
async fn xclient_starts_the_session_over_for_the_real_client() {
    let seen = Seen::default();
    let recorder = seen.clone();
    let script = move |event: &Event| {
        if let Event::ConnectionAccepted { meta } = event {
            recorder.push(meta.get_str("received_from").unwrap_or_default());
        }
        nothing(event)
    };
    let params = json!({"peer": {"192.0.2.10": {"allow_xclient": true}, "10.1.1.1": {"hostname": "real.test"}}});
    let harness = harness(params, &[EventKind::ConnectionAccepted], script);
    let mut client = greeted(&harness, CLIENT).await;
    let (_, extensions) = client.command("EHLO proxy.test").await;
    assert!(extensions.iter().any(|e| e.starts_with("XCLIENT ")), "{extensions:?}");
    let (code, text) = client.command("XCLIENT ADDR=10.1.1.1 PORT=5555 LOGIN=someone").await;
    assert_eq!((code, text[0].as_str()), (220, "real.test ESMTP kumo_listener"));
    assert_eq!(seen.take(), ["192.0.2.10:40000", "10.1.1.1:5555"]);
    // The real client's parameters: no XCLIENT for it; LOGIN lets it relay.
    client.command("EHLO real-client.test").await;
    assert_eq!(client.code("XCLIENT ADDR=10.2.2.2").await, (550, "5.7.0 insufficient authorization".into()));
    client.command("MAIL FROM:<a@b.test>").await;
    assert_eq!(client.code("RCPT TO:<x@anywhere.test>").await.0, 250);

    let mut other = greeted(&harness, "192.0.2.99:1").await;
    assert_eq!(other.code("XCLIENT ADDR=10.1.1.1").await, (550, "insufficient authorization".into()));
}

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

fn harness_with_auth() -> Harness {
    let script = |event: &Event| match event {
        Event::AuthPlain { credentials, .. } => {
            Outcome::Done(Response::Authenticated(credentials.authc == "user" && credentials.password == "secret"))
        }
        _ => nothing(event),
    };
    harness(json!({"hostname": "mx.test"}), &[EventKind::AuthPlain], script)
}

/// STARTTLS with commands pipelined after it: they are discarded unread, so
/// the handshake that follows works and the client starts over with EHLO.
async fn starttls(harness: &Harness) -> Client<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>> {
    let mut client = greeted(harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"STARTTLS\r\nMAIL FROM:<smuggled@x.test>\r\n").await;
    assert_eq!(client.reply().await, (220, vec!["2.0.0 Ready to start TLS".into()]));
    assert!(client.buffer.is_empty());
    let connector = TlsConnector::from(Arc::new(trusting_client_config()));
    let tls = connector.connect(ServerName::try_from("mx.test").unwrap(), client.stream).await.expect("a handshake");
    Client::new(tls)
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

/// Each parameter as `KEY=value` or `KEY`, in order.
fn shown(params: &crate::parser::EsmtpParams) -> String {
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
    assert_eq!(client.code("MAIL FROM:<a@b.test> BODY=BINARYMIME").await.0, 555);
    assert_eq!(client.code("MAIL FROM:<a@b.test> RET=ALL").await.0, 501);
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await.0, 250);
    assert_eq!(client.code("RCPT TO:<x@d.test> NOTIFY=NEVER,DELAY").await.0, 501);
    assert_eq!(client.code("RCPT TO:<x@d.test> RET=FULL").await.0, 555);
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

fn trusting_client_config() -> ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustAnything(provider)))
        .with_no_client_auth()
}

/// The server's certificate is self-signed: these tests check the session, not the PKI.
#[derive(Debug)]
struct TrustAnything(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for TrustAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
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
