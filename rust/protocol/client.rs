//! The client side of SMTP and LMTP, as the forwarding client speaks it to
//! an upstream: its replies read from bytes, the capabilities its EHLO (or
//! LHLO) reply lists, the MAIL and RCPT commands with the ESMTP parameters
//! it advertised, and the DATA body with its transparency dots. Pure logic.
//!
//! An upstream is trusted less than a configuration file: its replies are
//! bounded (line length, line count) and their text is sanitised by
//! [`Reply`] when relayed to our own client.

use super::parser::{BodyType, MailParams, Mailbox};
use super::reply::{generic_enhanced, is_enhanced_code, reply_class, Reply};
use super::xtext::encode_xtext;
use std::borrow::Cow;

/// The longest reply line read from an upstream (RFC 5321 allows 512 octets).
pub const MAX_REPLY_LINE: usize = 4096;
/// The most lines one reply may have (an EHLO reply lists each extension).
pub const MAX_REPLY_LINES: usize = 100;

/// One reply of an upstream: its code, its RFC 3463 enhanced code when it
/// gave one, and its text lines (without code or enhanced code).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamReply {
    pub code: u16,
    pub enhanced: Option<String>,
    pub lines: Vec<String>,
}

impl UpstreamReply {
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The text, its lines joined by `\n` as [`Reply`] takes them.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The reply our own client gets for it. An upstream's `421` closes the
    /// upstream's connection, not our client's: it becomes `451`.
    pub fn to_reply(&self) -> Reply {
        let code = if self.code == 421 { 451 } else { self.code };
        let enhanced = self.enhanced.clone().unwrap_or_else(|| generic_enhanced(code).to_owned());
        Reply { code, enhanced: Some(Cow::Owned(enhanced)), text: Cow::Owned(self.text()) }
    }

    /// `code enhanced text` on one line, for logs.
    pub fn summary(&self) -> String {
        let mut summary = self.code.to_string();
        if let Some(enhanced) = &self.enhanced {
            summary.push(' ');
            summary.push_str(enhanced);
        }
        for line in &self.lines {
            summary.push(' ');
            summary.push_str(line);
        }
        summary
    }
}

/// Why bytes from an upstream are not a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyError {
    Malformed,
    TooLong,
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplyError::Malformed => "malformed reply",
            ReplyError::TooLong => "reply too long",
        })
    }
}

/// One whole reply at the start of `input`, and the bytes it took; `None`
/// while it is incomplete. Lines end in CRLF (a bare LF is taken too).
pub fn parse_reply(input: &[u8]) -> Result<Option<(UpstreamReply, usize)>, ReplyError> {
    let mut consumed = 0;
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        let rest = &input[consumed..];
        let Some(end) = memchr::memchr(b'\n', rest) else {
            let too_long = rest.len() > MAX_REPLY_LINE || lines.len() >= MAX_REPLY_LINES;
            return if too_long { Err(ReplyError::TooLong) } else { Ok(None) };
        };
        if end > MAX_REPLY_LINE || lines.len() >= MAX_REPLY_LINES {
            return Err(ReplyError::TooLong);
        }
        let line = rest[..end].strip_suffix(b"\r").unwrap_or(&rest[..end]);
        consumed += end + 1;
        let (line_code, last, text) = split_reply_line(line)?;
        if *code.get_or_insert(line_code) != line_code {
            return Err(ReplyError::Malformed);
        }
        lines.push(text);
        if last {
            return Ok(Some((with_enhanced_code(line_code, lines), consumed)));
        }
    }
}

/// `250-text` → (250, false, "text"); `250 text` or `250` → (250, true, …).
fn split_reply_line(line: &[u8]) -> Result<(u16, bool, String), ReplyError> {
    let digits = line.get(..3).ok_or(ReplyError::Malformed)?;
    if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) {
        return Err(ReplyError::Malformed);
    }
    let code = digits.iter().fold(0u16, |code, digit| code * 10 + u16::from(digit - b'0'));
    let last = match line.get(3) {
        None | Some(b' ') => true,
        Some(b'-') => false,
        Some(_) => return Err(ReplyError::Malformed),
    };
    let text = line.get(4..).unwrap_or_default();
    Ok((code, last, String::from_utf8_lossy(text).into_owned()))
}

/// Takes the enhanced code off every line, when the first line starts
/// with one of the reply's class (RFC 2034 repeats it on each line).
fn with_enhanced_code(code: u16, mut lines: Vec<String>) -> UpstreamReply {
    let enhanced = lines[0]
        .split(' ')
        .next()
        .filter(|head| is_enhanced_code(head) && head.as_bytes()[0] == reply_class(code))
        .map(str::to_owned);
    if let Some(enhanced) = &enhanced {
        for line in &mut lines {
            if let Some(rest) = line.strip_prefix(enhanced.as_str()) {
                *line = rest.trim_start_matches(' ').to_owned();
            }
        }
    }
    UpstreamReply { code, enhanced, lines }
}

/// What an upstream's EHLO (or LHLO) reply offers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    /// `SIZE` was advertised; `size_limit` is its number, when not 0.
    pub size: bool,
    pub size_limit: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub chunking: bool,
    pub binarymime: bool,
    pub dsn: bool,
    pub requiretls: bool,
    pub starttls: bool,
}

impl Capabilities {
    /// From the reply's lines after the first (which greets).
    pub fn from_ehlo(reply: &UpstreamReply) -> Self {
        let mut capabilities = Self::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let keyword = words.next().unwrap_or_default().to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => capabilities.pipelining = true,
                "SIZE" => {
                    capabilities.size = true;
                    capabilities.size_limit = words.next().and_then(|n| n.parse().ok()).filter(|&n| n > 0);
                }
                "8BITMIME" => capabilities.eight_bit_mime = true,
                "SMTPUTF8" => capabilities.smtputf8 = true,
                "CHUNKING" => capabilities.chunking = true,
                "BINARYMIME" => capabilities.binarymime = true,
                "DSN" => capabilities.dsn = true,
                "REQUIRETLS" => capabilities.requiretls = true,
                "STARTTLS" => capabilities.starttls = true,
                _ => {}
            }
        }
        capabilities
    }
}

/// An extension the transaction needs that the upstream did not offer:
/// passing the transaction on without it would change what was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    SmtpUtf8,
    RequireTls,
    BinaryMime,
}

impl Missing {
    /// The reply our client gets: RFC 6531 §3.5's for SMTPUTF8, RFC 8689
    /// §5's for REQUIRETLS, RFC 3030 §3's "cannot be converted" for BINARYMIME.
    pub fn reply(self) -> Reply {
        match self {
            Missing::SmtpUtf8 => Reply::new(553, "5.6.7", "the next hop does not support SMTPUTF8"),
            Missing::RequireTls => Reply::new(550, "5.7.30", "REQUIRETLS not supported by the next hop"),
            Missing::BinaryMime => Reply::new(554, "5.6.1", "the next hop does not take BINARYMIME"),
        }
    }
}

/// `EHLO name` (`LHLO name` for LMTP).
pub fn hello(lmtp: bool, name: &str) -> Vec<u8> {
    format!("{} {name}\r\n", if lmtp { "LHLO" } else { "EHLO" }).into_bytes()
}

/// `MAIL FROM:<sender>` with the parameters of our client's MAIL that the
/// upstream advertised: SIZE, BODY, SMTPUTF8, RET and ENVID (DSN), REQUIRETLS.
/// `AUTH=` is not passed on: the upstream did not authenticate our client.
pub fn mail_from(sender: &Mailbox, params: &MailParams, offered: &Capabilities) -> Result<Vec<u8>, Missing> {
    if params.smtputf8 && !offered.smtputf8 {
        return Err(Missing::SmtpUtf8);
    }
    if params.requiretls && !offered.requiretls {
        return Err(Missing::RequireTls);
    }
    if params.body == Some(BodyType::BinaryMime) && !offered.binarymime {
        return Err(Missing::BinaryMime);
    }
    let mut command = format!("MAIL FROM:<{sender}>");
    for (keyword, value) in sender.params.iter() {
        let passed = match keyword {
            "SIZE" => offered.size,
            "BODY" => offered.eight_bit_mime || offered.binarymime,
            "SMTPUTF8" => offered.smtputf8,
            "REQUIRETLS" => offered.requiretls,
            "RET" | "ENVID" => offered.dsn,
            _ => false,
        };
        if passed {
            push_parameter(&mut command, keyword, value);
        }
    }
    command.push_str("\r\n");
    Ok(command.into_bytes())
}

/// `RCPT TO:<recipient>` with NOTIFY and ORCPT when the upstream offers DSN.
pub fn rcpt_to(recipient: &Mailbox, offered: &Capabilities) -> Vec<u8> {
    let mut command = format!("RCPT TO:<{recipient}>");
    if offered.dsn {
        for (keyword, value) in recipient.params.iter() {
            if matches!(keyword, "NOTIFY" | "ORCPT") {
                push_parameter(&mut command, keyword, value);
            }
        }
    }
    command.push_str("\r\n");
    command.into_bytes()
}

/// ` KEYWORD` or ` KEYWORD=value`, the value xtext-encoded where RFC 3461
/// says so (ENVID, and ORCPT after its address type).
fn push_parameter(command: &mut String, keyword: &str, value: Option<&str>) {
    command.push(' ');
    command.push_str(keyword);
    let Some(value) = value else {
        return;
    };
    command.push('=');
    match keyword {
        "ENVID" => command.push_str(&encode_xtext(value)),
        "ORCPT" => match value.split_once(';') {
            Some((address_type, address)) => {
                command.push_str(address_type);
                command.push(';');
                command.push_str(&encode_xtext(address));
            }
            None => command.push_str(&encode_xtext(value)),
        },
        _ => command.push_str(value),
    }
}

/// Writes a message as DATA carries it: a dot doubled at the start of each
/// line (RFC 5321 §4.5.2), CRLF added at the end when the message lacks it,
/// then the terminating `.`. Fed in pieces, it keeps where lines start.
#[derive(Debug)]
pub struct DotStuffer {
    at_line_start: bool,
    last: u8,
}

impl Default for DotStuffer {
    fn default() -> Self {
        Self { at_line_start: true, last: b'\n' }
    }
}

impl DotStuffer {
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let mut rest = bytes;
        while !rest.is_empty() {
            if self.at_line_start && rest[0] == b'.' {
                out.push(b'.');
            }
            let (line, next) = match memchr::memchr(b'\n', rest) {
                Some(end) => rest.split_at(end + 1),
                None => (rest, &[][..]),
            };
            out.extend_from_slice(line);
            self.at_line_start = line.ends_with(b"\n");
            rest = next;
        }
        if let Some(&last) = bytes.last() {
            self.last = last;
        }
    }

    /// The end of the data: CRLF if the message did not end with one, then `.` CRLF.
    pub fn finish(self, out: &mut Vec<u8>) {
        if self.last != b'\n' {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::parser::{parse_command, Command};

    fn reply(text: &str) -> UpstreamReply {
        let (reply, consumed) = parse_reply(text.as_bytes()).unwrap().expect("complete");
        assert_eq!(consumed, text.len());
        reply
    }

    #[test]
    fn a_reply_is_read_whole_with_its_enhanced_code_taken_off() {
        let parsed = reply("250-2.1.0 first\r\n250 2.1.0 second\r\n");
        assert_eq!(parsed.code, 250);
        assert_eq!(parsed.enhanced.as_deref(), Some("2.1.0"));
        assert_eq!(parsed.lines, ["first", "second"]);
        assert_eq!(reply("354 go ahead\n").lines, ["go ahead"]);
        assert_eq!(reply("220\r\n").lines, [""]);
        assert_eq!(reply("550 5.1.1 no such user\r\n").to_reply(), Reply::with_text(550, "5.1.1", "no such user"));
    }

    #[test]
    fn an_incomplete_reply_waits_and_what_follows_is_left() {
        assert_eq!(parse_reply(b"250-a\r\n250 b"), Ok(None));
        let (_, consumed) = parse_reply(b"250 a\r\n354 b\r\n").unwrap().unwrap();
        assert_eq!(consumed, 7);
    }

    #[test]
    fn malformed_and_oversized_replies_are_errors() {
        for bad in ["25 x\r\n", "250x\r\n", "hello\r\n", "250-a\r\n251 b\r\n", "650 x\r\n"] {
            assert_eq!(parse_reply(bad.as_bytes()), Err(ReplyError::Malformed), "{bad:?}");
        }
        let long = format!("250 {}\r\n", "x".repeat(MAX_REPLY_LINE));
        assert_eq!(parse_reply(long.as_bytes()), Err(ReplyError::TooLong));
        assert_eq!(parse_reply("x".repeat(MAX_REPLY_LINE + 1).as_bytes()), Err(ReplyError::TooLong));
        let many = "250-x\r\n".repeat(MAX_REPLY_LINES + 1);
        assert_eq!(parse_reply(many.as_bytes()), Err(ReplyError::TooLong));
    }

    #[test]
    fn an_upstream_421_closes_its_connection_not_our_clients() {
        let relayed = reply("421 4.3.2 shutting down\r\n").to_reply();
        assert_eq!((relayed.code, relayed.enhanced.as_deref()), (451, Some("4.3.2")));
        assert!(!relayed.closes());
        assert_eq!(reply("452 too many\r\n").to_reply().enhanced.as_deref(), Some("4.0.0"));
    }

    #[test]
    fn capabilities_are_read_from_the_ehlo_reply() {
        let ehlo = reply(
            "250-mx.example Hello\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-dsn\r\n\
             250-SMTPUTF8\r\n250-CHUNKING\r\n250 STARTTLS\r\n",
        );
        let offered = Capabilities::from_ehlo(&ehlo);
        let expected = Capabilities {
            pipelining: true,
            size: true,
            size_limit: Some(10_240_000),
            eight_bit_mime: true,
            smtputf8: true,
            chunking: true,
            dsn: true,
            starttls: true,
            ..Capabilities::default()
        };
        assert_eq!(offered, expected);
        let unlimited = Capabilities::from_ehlo(&reply("250-x\r\n250 SIZE\r\n"));
        assert!(unlimited.size && unlimited.size_limit.is_none());
    }

    fn mail(line: &str) -> (Mailbox, MailParams) {
        match parse_command(line.as_bytes()) {
            Ok(Command::MailFrom { reverse_path, mut params }) => {
                let mut sender = match reverse_path {
                    crate::protocol::parser::ReversePath::Null => Mailbox::default(),
                    crate::protocol::parser::ReversePath::Mailbox(mailbox) => mailbox,
                };
                sender.params = std::mem::take(&mut params.all);
                (sender, params)
            }
            other => panic!("{other:?}"),
        }
    }

    fn rcpt(line: &str) -> Mailbox {
        match parse_command(line.as_bytes()) {
            Ok(Command::RcptTo { forward_path }) => forward_path,
            other => panic!("{other:?}"),
        }
    }

    fn everything() -> Capabilities {
        Capabilities {
            size: true,
            eight_bit_mime: true,
            smtputf8: true,
            binarymime: true,
            dsn: true,
            requiretls: true,
            ..Capabilities::default()
        }
    }

    #[test]
    fn mail_passes_on_the_parameters_the_upstream_offers() {
        let (sender, params) =
            mail("MAIL FROM:<\"a b\"@x.example> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=id+2Bone AUTH=<>");
        let command = mail_from(&sender, &params, &everything()).unwrap();
        assert_eq!(command, b"MAIL FROM:<\"a b\"@x.example> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=id+2Bone\r\n");
        let plain = mail_from(&sender, &params, &Capabilities::default()).unwrap();
        assert_eq!(plain, b"MAIL FROM:<\"a b\"@x.example>\r\n");
        let (null, params) = mail("MAIL FROM:<>");
        assert_eq!(mail_from(&null, &params, &everything()).unwrap(), b"MAIL FROM:<>\r\n");
    }

    #[test]
    fn mail_is_refused_when_the_upstream_lacks_what_it_needs() {
        let (sender, params) = mail("MAIL FROM:<a@x.example> SMTPUTF8");
        assert_eq!(mail_from(&sender, &params, &Capabilities::default()), Err(Missing::SmtpUtf8));
        let (sender, params) = mail("MAIL FROM:<a@x.example> REQUIRETLS");
        assert_eq!(mail_from(&sender, &params, &Capabilities::default()), Err(Missing::RequireTls));
        let (sender, params) = mail("MAIL FROM:<a@x.example> BODY=BINARYMIME");
        assert_eq!(mail_from(&sender, &params, &Capabilities::default()), Err(Missing::BinaryMime));
        assert_eq!(Missing::SmtpUtf8.reply().code, 553);
        let passed = mail_from(&sender, &params, &everything()).unwrap();
        assert_eq!(passed, b"MAIL FROM:<a@x.example> BODY=BINARYMIME\r\n");
    }

    #[test]
    fn rcpt_passes_on_notify_and_orcpt_with_dsn_only() {
        let recipient = rcpt("RCPT TO:<b@y.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx@y.example");
        assert_eq!(
            rcpt_to(&recipient, &everything()),
            b"RCPT TO:<b@y.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx@y.example\r\n"
        );
        assert_eq!(rcpt_to(&recipient, &Capabilities::default()), b"RCPT TO:<b@y.example>\r\n");
    }

    fn stuffed(pieces: &[&[u8]]) -> Vec<u8> {
        let mut stuffer = DotStuffer::default();
        let mut out = Vec::new();
        for piece in pieces {
            stuffer.feed(piece, &mut out);
        }
        stuffer.finish(&mut out);
        out
    }

    #[test]
    fn leading_dots_are_doubled_wherever_the_pieces_are_cut() {
        let body: &[u8] = b".first\r\nmid.dle\r\n..two\r\n.\r\nlast\r\n";
        let expected: &[u8] = b"..first\r\nmid.dle\r\n...two\r\n..\r\nlast\r\n.\r\n";
        assert_eq!(stuffed(&[body]), expected);
        for cut in 0..body.len() {
            assert_eq!(stuffed(&[&body[..cut], &body[cut..]]), expected, "cut at {cut}");
        }
    }

    #[test]
    fn a_message_without_a_final_crlf_gets_one() {
        assert_eq!(stuffed(&[b"no end"]), b"no end\r\n.\r\n");
        assert_eq!(stuffed(&[]), b".\r\n");
    }
}
