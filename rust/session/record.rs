//! What a session logs, as Postfix's smtpd does: a line per refusal, one
//! when the session ends for something other than a command (`timeout after
//! RCPT from …`), and one when the connection ends with the count of each
//! command and why it ended.
//!
//! In the text lines, values the client chose (HELO names, addresses, reply
//! texts that may quote them) go through [`crate::escape`]: none can pass
//! for another field.

use super::replies::is_our_failure;
use super::Session;
use crate::escape::{value_is_plain, LogAddress, LogText, LogValue};
use crate::log::{LogEntry, LOG_INFO, LOG_WARNING};
use crate::protocol::parser::{Command, Mailbox};
use crate::protocol::reply::Reply;
use crate::stream::Transport;
use serde_json::{json, Map, Value};
use std::fmt::{self, Write as _};
use std::time::Instant;

/// Why a session ended, as the `disconnect` line's `reason=` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ending {
    /// The client said QUIT.
    Quit,
    /// The client closed the connection (or it failed) without QUIT.
    ClientClosed,
    /// `client_timeout`, or a message slower than the minimum data rate.
    Timeout,
    /// The server is stopping.
    Shutdown,
    /// Too many refused commands.
    ErrorLimit,
    /// Talking out of turn, an HTTP request, a malformed BDAT.
    ProtocolError,
    /// A reply that closes the connection: load shedding, a per-client
    /// limit, a policy refusal with 421 or at connect, a handler failure at connect.
    Refused,
    /// No TLS handshake, or no certificate for one.
    TlsFailed,
    /// No valid PROXY protocol header.
    ProxyError,
}

impl Ending {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Quit => "quit",
            Self::ClientClosed => "client-closed",
            Self::Timeout => "timeout",
            Self::Shutdown => "shutdown",
            Self::ErrorLimit => "error-limit",
            Self::ProtocolError => "protocol-error",
            Self::Refused => "refused",
            Self::TlsFailed => "tls-failed",
            Self::ProxyError => "proxy-error",
        }
    }

    /// The words of its line, and its `event`, for an ending that has one.
    fn line(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::Timeout => Some(("timeout", "timeout")),
            Self::Shutdown => Some(("shutdown", "shutdown")),
            Self::ErrorLimit => Some(("too many errors", "too_many_errors")),
            _ => None,
        }
    }
}

/// An address in a text line: `<a@b.example>`, or quoted and escaped
/// ([`LogAddress`]) when it holds anything else than a plain value may.
/// Formats with no copy when there is nothing to escape.
pub(super) struct Address<'a>(pub(super) &'a Mailbox);

impl fmt::Display for Address<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mailbox = self.0;
        let plain = mailbox.is_null()
            || (!mailbox.local_part_is_quoted()
                && value_is_plain(&mailbox.local_part)
                && value_is_plain(&mailbox.domain));
        if plain {
            write!(f, "<{mailbox}>")
        } else {
            LogAddress(&mailbox.to_string()).fmt(f)
        }
    }
}

/// ` from=<sender> to=<rcpt>,<rcpt>`, each address as [`Address`] writes it.
pub(super) fn write_envelope<'a>(
    text: &mut String,
    sender: &Mailbox,
    recipients: impl IntoIterator<Item = &'a Mailbox>,
) {
    use fmt::Write as _;
    let _ = write!(text, " from={} to=", Address(sender));
    for (index, recipient) in recipients.into_iter().enumerate() {
        let separator = if index == 0 { "" } else { "," };
        let _ = write!(text, "{separator}{}", Address(recipient));
    }
}

/// Command names in the order Postfix lists them (and LMTP's `lhlo`);
/// `unknown` counts lines that did not parse.
const VERBS: [&str; 16] = [
    "helo", "ehlo", "starttls", "auth", "xclient", "mail", "rcpt", "data", "bdat", "rset", "noop", "vrfy", "help",
    "quit", "lhlo", "unknown",
];
const UNKNOWN: usize = VERBS.len() - 1;

/// The commands of one session: how many of each, how many of those refused.
pub(super) struct Tally {
    started: Instant,
    tried: [u32; VERBS.len()],
    refused: [u32; VERBS.len()],
    /// The command being answered (`None` before the first).
    current: Option<usize>,
    /// Whether a refusal was sent to the current command.
    current_refused: bool,
}

/// The command a line was: the parsed one, or for a line that did not
/// parse, the verb it starts with if it is one we know (`VRFY` with no
/// argument is a refused `vrfy`, as Postfix counts it).
fn slot<E>(line: &[u8], parsed: &Result<Command, E>) -> usize {
    let Ok(command) = parsed else {
        let verb = line.split(|&byte| byte == b' ').next().unwrap_or_default();
        return VERBS[..UNKNOWN]
            .iter()
            .position(|known| verb.eq_ignore_ascii_case(known.as_bytes()))
            .unwrap_or(UNKNOWN);
    };
    match command {
        Command::Helo(_) => 0,
        Command::Ehlo(_) => 1,
        Command::StartTls => 2,
        Command::Auth { .. } => 3,
        Command::XClient(_) => 4,
        Command::MailFrom { .. } => 5,
        Command::RcptTo { .. } => 6,
        Command::Data => 7,
        Command::Bdat { .. } => 8,
        Command::Rset => 9,
        Command::Noop => 10,
        Command::Vrfy(_) => 11,
        Command::Help => 12,
        Command::Quit => 13,
        Command::Lhlo(_) => 14,
    }
}

impl Tally {
    pub(super) fn new() -> Self {
        Self {
            started: Instant::now(),
            tried: [0; VERBS.len()],
            refused: [0; VERBS.len()],
            current: None,
            current_refused: false,
        }
    }

    /// A command line came, and what it parsed to.
    pub(super) fn begin<E>(&mut self, line: &[u8], parsed: &Result<Command, E>) {
        self.end();
        let index = slot(line, parsed);
        self.tried[index] += 1;
        self.current = Some(index);
    }

    /// The current command got a refusal.
    pub(super) fn refused(&mut self) {
        self.current_refused = true;
    }

    fn end(&mut self) {
        if let Some(index) = self.current.take() {
            if std::mem::take(&mut self.current_refused) {
                self.refused[index] += 1;
            }
        }
    }

    /// The command being answered, as the log names it (`CONNECT` before any).
    /// The command being answered, upper-case; `None` before the first
    /// (the greeting) or for a line that was no command.
    pub(super) fn command(&self) -> Option<String> {
        self.current.filter(|&index| index != UNKNOWN).map(|index| VERBS[index].to_ascii_uppercase())
    }

    pub(super) fn verb(&self) -> String {
        self.current.map_or_else(|| "CONNECT".into(), |index| VERBS[index].to_ascii_uppercase())
    }

    /// `ehlo=1 mail=1/2 rcpt=1 data=1 quit=1 commands=5/6`: tried, or
    /// accepted/tried when some were refused; and the same as fields
    /// (`{"mail": {"tried": 2, "refused": 1}, …}`).
    fn counts(&mut self) -> (String, Value) {
        self.end();
        let mut text = String::new();
        let mut fields = Map::new();
        let (mut tried, mut refused) = (0, 0);
        for (index, verb) in VERBS.iter().enumerate() {
            let (count, bad) = (self.tried[index], self.refused[index]);
            tried += count;
            refused += bad;
            if count > 0 {
                let _ = write!(text, "{verb}={} ", fraction(count, bad));
                fields.insert((*verb).into(), json!({"tried": count, "refused": bad}));
            }
        }
        let _ = write!(text, "commands={}", fraction(tried, refused));
        fields.insert("commands".into(), json!({"tried": tried, "refused": refused}));
        (text, Value::Object(fields))
    }
}

impl<S: Transport> Session<S> {
    /// Log a record of this session. Its JSON fields carry the session's
    /// `session_id` (the connection metadata's), so that every record of a
    /// session can be found; text lines stay in Postfix's form.
    pub(super) fn log<E: Into<LogEntry>>(&self, level: u8, make: impl FnOnce() -> E) {
        let wanted = self.context.policy.log_fields_wanted();
        self.context.policy.log(level, || {
            let entry = make().into();
            if wanted {
                entry.with_field("session_id", &self.id)
            } else {
                entry
            }
        });
    }

    /// A record: its text, and the same as fields (a `json!` object) when
    /// something will read them (not the lines the core writes as text).
    pub(super) fn log_entry(&self, message: String, fields: impl FnOnce() -> Value) -> LogEntry {
        if !self.context.policy.log_fields_wanted() {
            return message.into();
        }
        match fields() {
            Value::Object(fields) => LogEntry::with_fields(message, fields),
            _ => message.into(),
        }
    }
}

fn fraction(tried: u32, refused: u32) -> String {
    if refused == 0 {
        tried.to_string()
    } else {
        format!("{}/{tried}", tried - refused)
    }
}

impl<S: Transport> Session<S> {
    /// Log a refusal about to be sent: INFO for a decision about the client
    /// (a policy `Reject` whatever its code), WARNING for a failure of ours
    /// (a handler failed, storage failed, TLS not available).
    pub(super) fn log_refusal(&mut self, reply: &Reply) {
        self.tally.refused();
        let level = if is_our_failure(reply) { LOG_WARNING } else { LOG_INFO };
        self.log_reply_line(level, "reject:", "reject", reply);
    }

    /// The line of a session that ends for `ending` (when it has one),
    /// after the command being answered: `timeout after RCPT from …`.
    pub(super) fn log_ending(&self, ending: Ending, reply: &Reply) {
        if let Some((words, event)) = ending.line() {
            self.log_reply_line(LOG_INFO, &format!("{words} after"), event, reply);
        }
    }

    /// `{words} {VERB} from {client}: {code} {enhanced} {text}; helo={helo}`.
    fn log_reply_line(&self, level: u8, words: &str, event: &str, reply: &Reply) {
        let verb = self.tally.verb();
        let (remote, helo) = (self.remote, self.helo.as_deref().unwrap_or_default());
        let enhanced = reply.enhanced.as_deref().unwrap_or_default();
        let entry = || {
            let (code, text) = (reply.code, LogText(&reply.text));
            let message = format!("{words} {verb} from {remote}: {code} {enhanced} {text}; helo={}", LogValue(helo));
            self.log_entry(message, || {
                json!({
                    "event": event, "command": verb, "client": remote.to_string(), "via": self.local.to_string(),
                    "hostname": self.params.hostname, "code": reply.code, "enhanced": enhanced, "text": reply.text,
                    "helo": helo,
                })
            })
        };
        self.log(level, entry);
    }

    /// From now on the session is ending for `ending`, unless it already was.
    pub(super) fn end_as(&mut self, ending: Ending) {
        self.ending.get_or_insert(ending);
    }

    /// Postfix's `disconnect from` line, when the session ends, with why
    /// (after the `lost connection after …` line of a client that went
    /// without QUIT). `closing`: a reply that ends the session was sent.
    pub(super) fn log_disconnect(&mut self, closing: bool) {
        let ending = *self.ending.get_or_insert(if closing { Ending::Refused } else { Ending::ClientClosed });
        if ending == Ending::ClientClosed {
            self.log_lost_connection();
        }
        let reason = ending.name();
        let (remote, local) = (self.remote, self.local);
        let hostname = &self.params.hostname;
        let tls = match (self.meta.get_str("tls_protocol_version"), self.meta.get_str("tls_cipher")) {
            (Some(version), Some(cipher)) => format!(" tls={version}/{cipher}"),
            _ => String::new(),
        };
        let seconds = self.tally.started.elapsed().as_secs_f64();
        let (counts, commands) = self.tally.counts();
        let entry = || {
            let message = format!(
                "disconnect from {remote} to {local} ({hostname}){tls} time={seconds:.3}s {counts} reason={reason}"
            );
            self.log_entry(message, || {
                json!({
                    "event": "disconnect", "client": remote.to_string(), "via": local.to_string(), "hostname": hostname,
                    "tls_protocol_version": self.meta.get_str("tls_protocol_version"),
                    "tls_cipher": self.meta.get_str("tls_cipher"), "seconds": seconds, "commands": commands,
                    "reason": reason,
                })
            })
        };
        self.log(LOG_INFO, entry);
    }

    /// Postfix's `lost connection after DATA from …`: no reply, so no code nor text.
    fn log_lost_connection(&self) {
        let verb = self.tally.verb();
        let (remote, helo) = (self.remote, self.helo.as_deref().unwrap_or_default());
        let entry = || {
            let message = format!("lost connection after {verb} from {remote}; helo={}", LogValue(helo));
            self.log_entry(message, || {
                json!({
                    "event": "lost_connection", "command": verb, "client": remote.to_string(),
                    "via": self.local.to_string(), "hostname": self.params.hostname, "helo": helo,
                })
            })
        };
        self.log(LOG_INFO, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::parser::parse_command;

    #[test]
    fn counts_name_the_commands_tried_and_how_many_were_refused() {
        let mut tally = Tally::new();
        let lines = [("EHLO x", false), ("MAIL FROM:<a@b>", true), ("MAIL FROM:<a@b>", false), ("BOGUS", true)];
        for (line, refused) in lines.into_iter().chain([("vrfy", true)]) {
            tally.begin(line.as_bytes(), &parse_command(line.as_bytes()));
            if refused {
                tally.refused();
            }
        }
        tally.begin(b"QUIT", &parse_command(b"QUIT"));
        let (text, fields) = tally.counts();
        assert_eq!(text, "ehlo=1 mail=1/2 vrfy=0/1 quit=1 unknown=0/1 commands=3/6");
        assert_eq!(fields["mail"], json!({"tried": 2, "refused": 1}));
        assert_eq!(fields["commands"], json!({"tried": 6, "refused": 3}));
        assert_eq!(Tally::new().counts().0, "commands=0");
    }
}
