//! What a session logs, as Postfix's smtpd does: a line per refusal, and
//! one when the connection ends with the count of each command.

use super::Session;
use crate::log::{LogEntry, LOG_INFO, LOG_WARNING};
use crate::protocol::parser::Command;
use crate::protocol::reply::Reply;
use crate::stream::Transport;
use serde_json::{json, Map, Value};
use std::fmt::Write as _;
use std::time::Instant;

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
    fn verb(&self) -> String {
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
    /// Log a refusal about to be sent: INFO for a decision about the
    /// client, WARNING for a failure of ours (451, 454).
    pub(super) fn log_refusal(&mut self, reply: &Reply) {
        self.tally.refused();
        let level = if matches!(reply.code, 451 | 454) { LOG_WARNING } else { LOG_INFO };
        let verb = self.tally.verb();
        let (remote, helo) = (self.remote, self.helo.as_deref().unwrap_or_default());
        let enhanced = reply.enhanced.as_deref().unwrap_or_default();
        let entry = || {
            let message =
                format!("reject: {verb} from {remote}: {} {enhanced} {}; helo={helo}", reply.code, reply.text);
            self.log_entry(message, || {
                json!({
                    "event": "reject", "command": verb, "client": remote.to_string(), "via": self.local.to_string(),
                    "hostname": self.params.hostname, "code": reply.code, "enhanced": enhanced, "text": reply.text,
                    "helo": helo,
                })
            })
        };
        self.context.policy.log(level, entry);
    }

    /// Postfix's `disconnect from` line, when the session ends.
    pub(super) fn log_disconnect(&mut self) {
        let (remote, local) = (self.remote, self.local);
        let hostname = &self.params.hostname;
        let tls = match (self.meta.get_str("tls_protocol_version"), self.meta.get_str("tls_cipher")) {
            (Some(version), Some(cipher)) => format!(" tls={version}/{cipher}"),
            _ => String::new(),
        };
        let seconds = self.tally.started.elapsed().as_secs_f64();
        let (counts, commands) = self.tally.counts();
        let entry = || {
            let message = format!("disconnect from {remote} to {local} ({hostname}){tls} time={seconds:.3}s {counts}");
            self.log_entry(message, || {
                json!({
                    "event": "disconnect", "client": remote.to_string(), "via": local.to_string(), "hostname": hostname,
                    "tls_protocol_version": self.meta.get_str("tls_protocol_version"),
                    "tls_cipher": self.meta.get_str("tls_cipher"), "seconds": seconds, "commands": commands,
                })
            })
        };
        self.context.policy.log(LOG_INFO, entry);
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
