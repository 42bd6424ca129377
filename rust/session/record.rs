//! What a session logs, as Postfix's smtpd does: a line per refusal, and
//! one when the connection ends with the count of each command.

use super::Session;
use crate::log::{LOG_INFO, LOG_WARNING};
use crate::parser::Command;
use crate::reply::Reply;
use crate::stream::Transport;
use std::fmt::Write as _;
use std::time::Instant;

/// Command names in the order Postfix lists them; `unknown` counts lines
/// that did not parse.
const VERBS: [&str; 14] = [
    "helo", "ehlo", "starttls", "auth", "xclient", "mail", "rcpt", "data", "rset", "noop", "vrfy", "help", "quit",
    "unknown",
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

fn slot(parsed: Result<&Command, ()>) -> usize {
    match parsed {
        Ok(Command::Helo(_)) => 0,
        Ok(Command::Ehlo(_)) => 1,
        Ok(Command::StartTls) => 2,
        Ok(Command::Auth { .. }) => 3,
        Ok(Command::XClient(_)) => 4,
        Ok(Command::MailFrom { .. }) => 5,
        Ok(Command::RcptTo { .. }) => 6,
        Ok(Command::Data) => 7,
        Ok(Command::Rset) => 8,
        Ok(Command::Noop) => 9,
        Ok(Command::Vrfy(_)) => 10,
        Ok(Command::Help) => 11,
        Ok(Command::Quit) => 12,
        Err(()) => UNKNOWN,
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

    /// A command line came: `Err` when it did not parse.
    pub(super) fn begin<E>(&mut self, parsed: &Result<Command, E>) {
        self.end();
        let index = slot(parsed.as_ref().map_err(drop));
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
    /// accepted/tried when some were refused.
    fn counts(&mut self) -> String {
        self.end();
        let mut text = String::new();
        let (mut tried, mut refused) = (0, 0);
        for (index, verb) in VERBS.iter().enumerate() {
            let (count, bad) = (self.tried[index], self.refused[index]);
            tried += count;
            refused += bad;
            if count > 0 {
                let _ = write!(text, "{verb}={} ", fraction(count, bad));
            }
        }
        let _ = write!(text, "commands={}", fraction(tried, refused));
        text
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
        let message = || format!("reject: {verb} from {remote}: {} {enhanced} {}; helo={helo}", reply.code, reply.text);
        self.context.policy.log(level, message);
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
        let counts = self.tally.counts();
        let message = || format!("disconnect from {remote} to {local} ({hostname}){tls} time={seconds:.3}s {counts}");
        self.context.policy.log(LOG_INFO, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::parse_command;

    #[test]
    fn counts_name_the_commands_tried_and_how_many_were_refused() {
        let mut tally = Tally::new();
        for (line, refused) in
            [("EHLO x", false), ("MAIL FROM:<a@b>", true), ("MAIL FROM:<a@b>", false), ("BOGUS", true)]
        {
            tally.begin(&parse_command(line.as_bytes()));
            if refused {
                tally.refused();
            }
        }
        tally.begin(&parse_command(b"QUIT"));
        assert_eq!(tally.counts(), "ehlo=1 mail=1/2 quit=1 unknown=0/1 commands=3/5");
        assert_eq!(Tally::new().counts(), "commands=0");
    }
}
