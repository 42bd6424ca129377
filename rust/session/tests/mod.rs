//! Dialogues with a real session over an in-memory pipe, one or more per
//! command family, against a scripted policy.
//!
//! One file per phase, mirroring `rust/session/`; the client, the
//! harnesses and the scripted policies they share are here.

use super::testing::Harness;
use crate::events::{Event, EventKind, Outcome, Response};
use crate::sink::Sink;
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsConnector;

mod auth;
mod chunking;
mod connect;
mod forward;
mod lmtp;
mod record;
mod transaction;
mod xclient;

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
    starttls_from(harness, CLIENT, hello).await
}

/// [`starttls_after`] for a client connecting from `remote`.
async fn starttls_from(
    harness: &Harness,
    remote: &str,
    hello: &str,
) -> Client<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>> {
    let mut client = greeted(harness, remote).await;
    client.command(&format!("{hello} client.test")).await;
    client.send(b"STARTTLS\r\nMAIL FROM:<smuggled@x.test>\r\n").await;
    assert_eq!(client.reply().await, (220, vec!["2.0.0 Ready to start TLS".into()]));
    assert!(client.buffer.is_empty());
    let connector = TlsConnector::from(crate::forward::tls::unverified());
    let tls = connector.connect(ServerName::try_from("mx.test").unwrap(), client.stream).await.expect("a handshake");
    Client::new(tls)
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
