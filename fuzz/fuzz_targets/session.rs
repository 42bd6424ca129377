//! A whole session over an in-memory pipe: arbitrary client bytes, cut into
//! arbitrary reads, against a scripted policy chosen by the first byte (its
//! top two bits both set: an LMTP listener).
//! Invariants: no panic; every byte the server writes (up to STARTTLS's
//! `220`, after which it speaks TLS) is a reply line `^\d{3}[ -]` with no
//! control characters, ending in CRLF; nothing follows a final `221` or
//! `421` line; the server writes a bounded amount per byte received; the
//! session ends once the client has sent everything and closed.

#![no_main]

#[path = "common/chunks.rs"]
mod chunks;

use kumo_listener::events::{Event, EventKind, Outcome, Response};
use kumo_listener::session::testing::Harness;
use kumo_listener::sink::Sink;
use libfuzzer_sys::fuzz_target;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let (stream, chunks) = chunks::split(rest);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    let output = runtime.block_on(async {
        let harness = harness(mode);
        let mut client = harness.connect("192.0.2.10:40000", "198.51.100.1:25");
        let (mut reader, mut writer) = tokio::io::split(&mut client);
        let write = async {
            for chunk in &chunks {
                // The session may have closed: what is left is never read.
                if writer.write_all(chunk).await.is_err() {
                    break;
                }
            }
            let _ = writer.shutdown().await;
        };
        let read = async {
            let mut output = Vec::new();
            let _ = reader.read_to_end(&mut output).await;
            output
        };
        let session = async { tokio::join!(write, read).1 };
        // Paused time runs ahead whenever every task waits: only a session
        // that never ends takes this long.
        tokio::time::timeout(Duration::from_secs(24 * 3600), session).await.expect("the session ends")
    });
    check(&output, stream.len());
});

fn harness(mode: u8) -> Harness {
    let line_endings = ["Deny", "Allow", "Fix"][usize::from(mode >> 6) % 3];
    let protocol = if mode >> 6 == 3 { "lmtp" } else { "smtp" };
    let params = json!({
        "hostname": "mx.test", "relay_hosts": ["192.0.2.0/24"], "max_message_size": 2000,
        "max_recipients_per_message": 3, "max_messages_per_connection": 4, "line_length_hard_limit": 600,
        "client_timeout": 5, "allow_xclient": mode & 1 != 0, "require_proxy_protocol": mode & 2 != 0,
        "invalid_line_endings": line_endings, "protocol": protocol,
    });
    let registered = [
        EventKind::Ehlo,
        EventKind::MailFrom,
        EventKind::RcptTo,
        EventKind::Data,
        EventKind::MessageReceived,
        EventKind::AuthPlain,
    ];
    let script = move |event: &Event| match event {
        Event::MailFrom { sender, .. } if mode & 4 != 0 && sender.local_part.starts_with('r') => {
            Outcome::Reject { code: 550, text: "5.7.1 refused\r\n250 injected".into() }
        }
        Event::RcptTo { recipient, .. } if mode & 8 != 0 && recipient.local_part.starts_with('q') => {
            Outcome::Reject { code: 421, text: "bye".into() }
        }
        Event::Data { .. } if mode & 16 != 0 => Outcome::Failed("scripted failure".into()),
        Event::MessageReceived { message, .. } if message.recipients.iter().any(|r| r.local_part.starts_with('p')) => {
            Outcome::Reject { code: 550, text: "5.7.1 not this part".into() }
        }
        Event::Ehlo { .. } if mode & 32 != 0 => Outcome::Done(Response::Extensions(vec!["PIPELINING".into()])),
        Event::AuthPlain { .. } => Outcome::Done(Response::Authenticated(true)),
        _ => Outcome::Done(Response::Nothing),
    };
    Harness::new(params, &registered, script, Sink::Discard).unwrap()
}

fn check(output: &[u8], received: usize) {
    assert!(output.len() <= 4096 + 64 * received, "{} bytes written for {received} received", output.len());
    let mut rest = output;
    while !rest.is_empty() {
        let end = rest.windows(2).position(|pair| pair == b"\r\n").unwrap_or_else(|| panic!("unterminated {rest:?}"));
        let line = &rest[..end];
        rest = &rest[end + 2..];
        assert!(line.len() >= 4 && line[..3].iter().all(u8::is_ascii_digit), "not a reply line: {line:?}");
        assert!(matches!(line[3], b' ' | b'-'), "not a reply line: {line:?}");
        let text = std::str::from_utf8(line).unwrap_or_else(|_| panic!("not UTF-8: {line:?}"));
        assert!(!text.chars().any(char::is_control), "control character in {text:?}");
        if text.starts_with("220 2.0.0 Ready to start TLS") || text.starts_with("220 Ready to start TLS") {
            return;
        }
        if text.starts_with("221 ") || text.starts_with("421 ") {
            assert!(rest.is_empty(), "{:?} after {text:?}", String::from_utf8_lossy(rest));
        }
    }
}
