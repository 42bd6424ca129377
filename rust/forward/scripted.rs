//! A scripted upstream for the tests: a real listener on loopback that
//! greets, answers each command as its script says, reads DATA and BDAT
//! bodies, and records everything it was sent.

use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// What the upstream answers to a command line (without CRLF): `None` for
/// the default (`250 2.0.0 OK`, `354` for DATA); an answer starting with
/// `CLOSE` drops the connection without a reply; `HANG` never answers.
pub type Script = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

#[derive(Clone, Default)]
pub struct Transcript(Arc<Mutex<Vec<String>>>);

impl Transcript {
    fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// The bodies received (after DATA or BDAT), as text.
    pub fn bodies(&self) -> Vec<String> {
        self.lines().iter().filter_map(|line| line.strip_prefix("BODY:").map(str::to_owned)).collect()
    }

    /// The lines starting with `prefix`.
    pub fn commands(&self, prefix: &str) -> Vec<String> {
        self.lines().into_iter().filter(|line| line.starts_with(prefix)).collect()
    }
}

pub struct ScriptedUpstream {
    pub url: String,
    pub transcript: Transcript,
}

/// A server offering `extensions` in its EHLO reply; `lmtp` answers after
/// the data once per accepted recipient.
pub async fn start(extensions: &[&str], lmtp: bool, script: Script) -> ScriptedUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let transcript = Transcript::default();
    let extensions: Vec<String> = extensions.iter().map(|e| (*e).to_owned()).collect();
    let recorder = transcript.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            recorder.push("CONNECT".into());
            tokio::spawn(serve(socket, extensions.clone(), lmtp, script.clone(), recorder.clone()));
        }
    });
    let scheme = if lmtp { "lmtp" } else { "smtp" };
    ScriptedUpstream { url: format!("{scheme}://127.0.0.1:{port}"), transcript }
}

async fn serve(socket: tokio::net::TcpStream, extensions: Vec<String>, lmtp: bool, script: Script, seen: Transcript) {
    let (reader, mut writer) = socket.into_split();
    let mut reader = BufReader::new(reader);
    let _ = writer.write_all(b"220 upstream.test ESMTP\r\n").await;
    let mut recipients = 0;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let command = line.trim_end().to_owned();
        seen.push(command.clone());
        let verb = command.split(' ').next().unwrap_or_default().to_ascii_uppercase();
        let answer = script(&command);
        if answer.as_deref().is_some_and(|a| a.starts_with("CLOSE")) {
            return;
        }
        if answer.as_deref() == Some("HANG") {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        }
        let reply = match (verb.as_str(), answer) {
            ("EHLO" | "LHLO", None) => {
                let mut reply = String::from("250-upstream.test\r\n");
                for extension in &extensions {
                    reply.push_str(&format!("250-{extension}\r\n"));
                }
                reply.push_str("250 ENHANCEDSTATUSCODES\r\n");
                reply
            }
            ("MAIL" | "RSET", None) => {
                recipients = 0;
                "250 2.0.0 OK\r\n".into()
            }
            ("RCPT", answer) => {
                let answer = answer.unwrap_or_else(|| "250 2.1.5 OK".into());
                if answer.starts_with('2') {
                    recipients += 1;
                }
                format!("{answer}\r\n")
            }
            ("DATA", None) => {
                let _ = writer.write_all(b"354 go ahead\r\n").await;
                let body = read_dotted(&mut reader).await;
                let after = script(&format!("END {body}"));
                if after.as_deref().is_some_and(|a| a.starts_with("CLOSE")) {
                    return;
                }
                seen.push(format!("BODY:{body}"));
                end_replies(after, lmtp, recipients)
            }
            ("BDAT", None) => {
                let size: usize = command.split(' ').nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
                let mut body = vec![0; size];
                let _ = reader.read_exact(&mut body).await;
                let body = String::from_utf8_lossy(&body).into_owned();
                let after = script(&format!("END {body}"));
                if after.as_deref().is_some_and(|a| a.starts_with("CLOSE")) {
                    return;
                }
                seen.push(format!("BODY:{body}"));
                end_replies(after, lmtp, recipients)
            }
            ("QUIT", _) => {
                let _ = writer.write_all(b"221 2.0.0 bye\r\n").await;
                return;
            }
            (_, Some(answer)) => format!("{answer}\r\n"),
            (_, None) => "250 2.0.0 OK\r\n".into(),
        };
        if writer.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// The reply (or, LMTP, replies `|`-separated in the script's answer) to the end of the data.
fn end_replies(answer: Option<String>, lmtp: bool, recipients: usize) -> String {
    let answers: Vec<String> = match answer {
        Some(answer) => answer.split('|').map(str::to_owned).collect(),
        None => vec!["250 2.0.0 queued as UP1".into(); if lmtp { recipients } else { 1 }],
    };
    answers.iter().map(|answer| format!("{answer}\r\n")).collect()
}

async fn read_dotted(reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> String {
    let mut body = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 || line == ".\r\n" {
            return body;
        }
        body.push_str(line.strip_prefix('.').unwrap_or(&line));
    }
}
