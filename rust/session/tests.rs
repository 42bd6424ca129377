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

/// A harness that records the client address each connection's
/// `ConnectionAccepted` sees (again after XCLIENT or a PROXY header).
fn recording_clients(params: Value) -> (Harness, Seen) {
    let seen = Seen::default();
    let recorder = seen.clone();
    let script = move |event: &Event| {
        if let Event::ConnectionAccepted { meta } = event {
            recorder.push(meta.get_str("received_from").unwrap_or_default());
        }
        nothing(event)
    };
    (harness(params, &[EventKind::ConnectionAccepted], script), seen)
}

#[tokio::test]
async fn xclient_starts_the_session_over_for_the_real_client() {
    let params = json!({"peer": {"192.0.2.10": {"allow_xclient": true}, "10.1.1.1": {"hostname": "real.test"}}});
    let (harness, seen) = recording_clients(params);
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
    starttls_after(harness, "EHLO").await
}

/// [`starttls`] after `hello` (EHLO, or LMTP's LHLO).
async fn starttls_after(
    harness: &Harness,
    hello: &str,
) -> Client<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>> {
    let mut client = greeted(harness, CLIENT).await;
    client.command(&format!("{hello} client.test")).await;
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

/// A harness that records what each stored message holds after our
/// `Received:` header (at the start of its data, with one recipient).
fn recording_bodies(params: Value) -> (Harness, Seen) {
    let seen = Seen::default();
    let recorder = seen.clone();
    let script = move |event: &Event| {
        if let Event::MessageReceived { message, .. } = event {
            let data = message.data.to_vec().unwrap();
            // The header's last line is the one not followed by a folded one.
            let after_trace =
                data.windows(3).position(|three| three[..2] == *b"\r\n" && three[2] != b'\t').map_or(0, |end| end + 2);
            assert!(data.starts_with(b"Received: "), "{data:?}");
            recorder.push(String::from_utf8_lossy(&data[after_trace..]).into_owned());
        }
        nothing(event)
    };
    (harness(params, &[EventKind::MessageReceived], script), seen)
}

async fn codes_of<S: AsyncRead + AsyncWrite + Unpin>(client: &mut Client<S>, count: usize) -> Vec<(u16, String)> {
    let mut codes = Vec::new();
    for _ in 0..count {
        let (code, texts) = client.reply().await;
        codes.push((code, texts.into_iter().next().unwrap_or_default()));
    }
    codes
}

#[tokio::test]
async fn bdat_chunks_are_read_exactly_even_when_pipelined_with_commands() {
    let (harness, seen) = recording_bodies(json!({"relay_hosts": ["192.0.2.0/24"], "hostname": "mx.test"}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    // The chunks hold what would be commands, a DATA terminator and a dot line.
    let first = b"Subject: x\r\n\r\n.\r\nRSET\r\n";
    let second = b"QUIT\r\n..\r\n";
    let mut pipelined = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\n".to_vec();
    pipelined.extend_from_slice(format!("BDAT {}\r\n", first.len()).as_bytes());
    pipelined.extend_from_slice(first);
    pipelined.extend_from_slice(format!("BDAT {} LAST\r\n", second.len()).as_bytes());
    pipelined.extend_from_slice(second);
    pipelined.extend_from_slice(b"NOOP\r\n");
    client.send(&pipelined).await;
    let replies = codes_of(&mut client, 5).await;
    assert_eq!(
        replies[..3],
        [(250, "2.1.0 OK".into()), (250, "2.1.5 OK".into()), (250, "2.0.0 23 octets received".into())]
    );
    assert!(replies[3].0 == 250 && replies[3].1.starts_with("2.0.0 OK ids="), "{replies:?}");
    assert_eq!(replies[4], (250, "2.0.0 OK".into()));
    assert_eq!(seen.take(), ["Subject: x\r\n\r\n.\r\nRSET\r\nQUIT\r\n..\r\n"]);
    // BDAT 0 LAST ends a message; a later transaction may use DATA.
    client.send(b"MAIL FROM:<>\r\nRCPT TO:<x@d.test>\r\nBDAT 3\r\nabcBDAT 0 LAST\r\n").await;
    let replies = codes_of(&mut client, 4).await;
    assert_eq!(replies[2], (250, "2.0.0 3 octets received".into()));
    assert_eq!(replies[3].0, 250);
    assert_eq!(seen.take(), ["abc"]);
    assert_eq!(client.code("QUIT").await.0, 221);
}

#[tokio::test]
async fn bdat_out_of_sequence_is_refused_and_its_chunk_discarded() {
    let (harness, seen) = recording_bodies(json!({"relay_hosts": ["192.0.2.0/24"]}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"BDAT 6 LAST\r\nNOOP\r\nRSET\r\n").await;
    assert_eq!(client.reply().await, (503, vec!["5.5.1 need MAIL command first".into()]));
    assert_eq!(client.reply().await, (250, vec!["2.0.0 OK".into()]), "only RSET was a command");
    client.send(b"MAIL FROM:<a@b.test>\r\nBDAT 4\r\nNOOPRCPT TO:<x@d.test>\r\nBDAT 2\r\nabDATA\r\n").await;
    let replies = codes_of(&mut client, 5).await;
    assert_eq!(replies[1], (503, "5.5.1 need RCPT command first".into()));
    assert_eq!(replies[3], (250, "2.0.0 2 octets received".into()));
    // RFC 3030 §2: no DATA after BDAT in a transaction.
    assert_eq!(replies[4], (503, "5.5.1 DATA after BDAT, send RSET".into()));
    assert_eq!(client.code("RSET").await.0, 250);
    // RFC 3030 §3: BINARYMIME only with BDAT.
    client.send(b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<x@d.test>\r\nDATA\r\n").await;
    let replies = codes_of(&mut client, 3).await;
    assert_eq!(replies[2], (503, "5.5.1 BODY=BINARYMIME needs BDAT, not DATA".into()));
    let binary = b"\0\x80\xff\r\r\n\n.\r\n";
    client.send(format!("BDAT {} LAST\r\n", binary.len()).as_bytes()).await;
    client.send(binary).await;
    assert_eq!(client.reply().await.0, 250);
    assert_eq!(seen.take(), [String::from_utf8_lossy(binary)]);
    // A BDAT after LAST has no transaction.
    assert_eq!(client.code("BDAT 0 LAST").await.0, 503);
}

#[tokio::test]
async fn a_message_too_big_is_refused_at_its_chunk_and_discarded_until_last() {
    let (harness, seen) = recording_bodies(json!({"relay_hosts": ["192.0.2.0/24"], "max_message_size": 10}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nBDAT 6\r\n123456BDAT 5\r\n12345BDAT 2\r\n12").await;
    client.send(b"BDAT 1 LAST\r\n1MAIL FROM:<a@b.test>\r\n").await;
    let too_big = (552, "5.3.4 message size exceeds fixed maximum message size".into());
    let replies = codes_of(&mut client, 7).await;
    assert_eq!(replies[2], (250, "2.0.0 6 octets received".into()));
    assert_eq!(replies[3..6], [too_big.clone(), too_big.clone(), too_big]);
    assert_eq!(replies[6], (250, "2.1.0 OK".into()), "LAST ended the refused transaction");
    // SIZE= over the limit is refused up front; the limit counts every chunk.
    assert_eq!(client.code("RSET").await.0, 250);
    assert_eq!(client.code("MAIL FROM:<a@b.test> SIZE=11").await.0, 552);
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nBDAT 5\r\n12345BDAT 5 LAST\r\n12345").await;
    assert_eq!(codes_of(&mut client, 4).await[3].0, 250);
    assert_eq!(seen.take(), ["1234512345"]);
}

#[tokio::test]
async fn text_chunks_follow_invalid_line_endings_binarymime_does_not() {
    for (mode, expected) in [("Deny", None), ("Allow", Some("a\nb")), ("Fix", Some("a\r\nb"))] {
        let (harness, seen) = recording_bodies(json!({"relay_hosts": ["192.0.2.0/24"], "invalid_line_endings": mode}));
        let mut client = greeted(&harness, CLIENT).await;
        client.command("EHLO client.test").await;
        client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nBDAT 3 LAST\r\na\nb").await;
        let reply = codes_of(&mut client, 3).await.remove(2);
        match expected {
            None => assert_eq!(reply, (550, "5.6.0 message contains a bare CR or LF; lines must end in CRLF".into())),
            Some(body) => assert_eq!((reply.0, seen.take()), (250, vec![body.to_string()]), "{mode}"),
        }
        client.send(b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<x@d.test>\r\nBDAT 3 LAST\r\na\nb").await;
        assert_eq!(codes_of(&mut client, 3).await[2].0, 250, "{mode}");
        assert_eq!(seen.take(), ["a\nb"], "{mode}");
    }
}

#[tokio::test]
async fn a_malformed_bdat_ends_the_session() {
    let harness = plain(json!({"hostname": "mx.test"}));
    for line in ["BDAT", "BDAT 12x", "BDAT 5 FIRST", "BDAT -1 LAST"] {
        let mut client = greeted(&harness, CLIENT).await;
        client.command("EHLO client.test").await;
        assert_eq!(client.command(line).await, (521, vec!["5.5.4 mx.test syntax: BDAT size [LAST]".into()]), "{line}");
        client.expect_closed().await;
    }
}

#[tokio::test]
async fn a_chunk_cut_short_by_the_client_stores_nothing() {
    let (harness, seen) = recording_bodies(json!({"relay_hosts": ["192.0.2.0/24"]}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nBDAT 100 LAST\r\nonly a part").await;
    assert_eq!(codes_of(&mut client, 2).await.len(), 2);
    client.stream.shutdown().await.unwrap();
    client.expect_closed().await;
    let disconnected = || harness.logs().iter().any(|line| line.contains("disconnect from") && line.contains("bdat=1"));
    for _ in 0..100 {
        if disconnected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(disconnected(), "{:?}", harness.logs());
    assert!(seen.take().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_chunk_must_arrive_at_data_speed() {
    let harness = plain(json!({"hostname": "mx.test", "client_timeout": 5, "relay_hosts": ["192.0.2.0/24"]}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nBDAT 10\r\nabc").await;
    assert_eq!(codes_of(&mut client, 2).await.len(), 2);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(client.reply().await, (421, vec!["4.3.2 mx.test idle too long, closing connection".into()]));
    client.expect_closed().await;
}

// --- LMTP (RFC 2033) ---------------------------------------------------------------------

fn lmtp(params: Value) -> Value {
    let mut params = params;
    params["protocol"] = json!("lmtp");
    params
}

/// A Maildir under the temporary directory, empty, and its files in `new/`.
struct TestMaildir(std::path::PathBuf);

impl TestMaildir {
    fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("kumo-session-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        Self(root)
    }

    fn sink(&self) -> Sink {
        Sink::Maildir(Arc::new(crate::sink::Maildir::open(&self.0).unwrap()))
    }

    /// The recipient of each stored file (its `Delivered-To:`), sorted.
    fn recipients(&self) -> Vec<String> {
        let mut found: Vec<String> = std::fs::read_dir(self.0.join("new"))
            .unwrap()
            .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap())
            .flat_map(|file| {
                file.lines().filter_map(|l| l.strip_prefix("Delivered-To: ").map(String::from)).collect::<Vec<_>>()
            })
            .collect();
        found.sort();
        found
    }
}

impl Drop for TestMaildir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// MAIL, the RCPTs and DATA pipelined, then the body: the replies to the RCPTs and to the data.
async fn send_message(client: &mut Client<tokio::io::DuplexStream>, recipients: &[&str]) -> (Vec<u16>, Vec<String>) {
    let mut commands = String::from("MAIL FROM:<a@b.test>\r\n");
    for recipient in recipients {
        commands.push_str(&format!("RCPT TO:<{recipient}>\r\n"));
    }
    commands.push_str("DATA\r\n");
    client.send(commands.as_bytes()).await;
    assert_eq!(client.reply().await.0, 250);
    let mut rcpt = Vec::new();
    for _ in recipients {
        rcpt.push(client.reply().await.0);
    }
    assert_eq!(client.reply().await.0, 354);
    client.send(b"Subject: s\r\n\r\nbody\r\n.\r\n").await;
    let accepted = rcpt.iter().filter(|&&code| code == 250).count();
    let mut replies = Vec::new();
    for _ in 0..accepted {
        let (code, texts) = client.reply().await;
        replies.push(format!("{code} {}", texts[0]));
    }
    // Nothing more: the next reply is NOOP's.
    assert_eq!(client.code("NOOP").await.0, 250);
    (rcpt, replies)
}

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

/// Like [`send_message`], for SMTP's single reply to the data.
async fn send_message_smtp(client: &mut Client<tokio::io::DuplexStream>, recipients: &[&str]) -> (usize, String) {
    let mut commands = String::from("MAIL FROM:<a@b.test>\r\n");
    for recipient in recipients {
        commands.push_str(&format!("RCPT TO:<{recipient}>\r\n"));
    }
    commands.push_str("DATA\r\n");
    client.send(commands.as_bytes()).await;
    for _ in 0..=recipients.len() {
        assert_eq!(client.reply().await.0, 250);
    }
    assert_eq!(client.reply().await.0, 354);
    client.send(b"Subject: s\r\n\r\nbody\r\n.\r\n").await;
    let (code, texts) = client.reply().await;
    assert_eq!(client.code("NOOP").await.0, 250);
    (recipients.len(), format!("{code} {}", texts[0]))
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

/// Every connection holds its session's future, sized by the largest state
/// it can be in: the rare or heavy commands are boxed so that an idle
/// connection does not pay for them (3,040 bytes before the body budget,
/// BDAT and LMTP; 5,184 with them unboxed; 2,800 boxed).
#[tokio::test]
async fn an_idle_sessions_future_stays_small() {
    let harness = plain(json!({"hostname": "mx.test"}));
    let (_client, server) = tokio::io::duplex(1024);
    let (remote, local) = ("192.0.2.1:1".parse().unwrap(), "192.0.2.2:25".parse().unwrap());
    let future = super::run(server, remote, local, harness.context.clone());
    assert!(std::mem::size_of_val(&future) <= 3 * 1024, "{} bytes", std::mem::size_of_val(&future));
}
