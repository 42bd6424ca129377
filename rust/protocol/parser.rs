//! SMTP command parser (RFC 5321, with RFC 6531 UTF-8 addresses).
//!
//! Pure logic: one command line (without its CRLF) in, a [`Command`] or a
//! [`ParseError`] carrying the reply to send out. No I/O and no session state:
//! whether a command is allowed right now (SMTPUTF8 negotiated, XCLIENT
//! authorised, ...) is for the session to decide.

use super::reply::Reply;
use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};

const LONGEST_VERB: usize = "STARTTLS".len();
const MAX_DOMAIN_LEN: usize = 255;
const MAX_LABEL_LEN: usize = 63;
/// RFC 5321 §4.5.3.1.3: a forward path, as sent, angle brackets (and any
/// source route) included.
pub const MAX_PATH_LEN: usize = 256;
/// RFC 5321 §4.5.3.1.1: a local part, as sent (quotes and escapes included).
pub const MAX_LOCAL_PART_LEN: usize = 64;

/// An address, with the ESMTP parameters of the `MAIL FROM`/`RCPT TO` that
/// gave it. `domain` is empty for the bare `<postmaster>` recipient.
/// A recipient is held to RFC 5321 §4.5.3.1's limits ([`MAX_PATH_LEN`],
/// [`MAX_LOCAL_PART_LEN`]); the sender is not, since real senders exceed
/// them (VERP and SRS return paths carry a whole address in the local part).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Mailbox {
    pub local_part: String,
    pub domain: String,
    pub params: EsmtpParams,
}

impl Mailbox {
    pub fn new(local_part: impl Into<String>, domain: impl Into<String>) -> Self {
        Self { local_part: local_part.into(), domain: domain.into(), params: EsmtpParams::default() }
    }

    /// The same address, ignoring parameters.
    pub fn same_address(&self, other: &Mailbox) -> bool {
        self.local_part == other.local_part && self.domain == other.domain
    }

    /// The null reverse path `<>`, as the session stores it.
    pub fn is_null(&self) -> bool {
        self.local_part.is_empty() && self.domain.is_empty()
    }

    pub fn is_ascii(&self) -> bool {
        self.local_part.is_ascii() && self.domain.is_ascii()
    }

    /// Whether its local part is shown as a quoted string (it is not a dot-string).
    pub fn local_part_is_quoted(&self) -> bool {
        !is_dot_string(&self.local_part)
    }
}

/// Shows `user@domain`, quoting the local part where RFC 5321 needs it; the
/// null reverse path shows as the empty string.
impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_null() {
            return Ok(());
        }
        if is_dot_string(&self.local_part) {
            f.write_str(&self.local_part)?;
        } else {
            write_quoted_string(f, &self.local_part)?;
        }
        if !self.domain.is_empty() {
            write!(f, "@{}", self.domain)?;
        }
        Ok(())
    }
}

fn write_quoted_string(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    f.write_char('"')?;
    for c in text.chars() {
        if matches!(c, '"' | '\\') {
            f.write_char('\\')?;
        }
        f.write_char(c)?;
    }
    f.write_char('"')
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReversePath {
    Null,
    Mailbox(Mailbox),
}

/// The `BODY=` parameter of MAIL FROM (RFC 6152, RFC 3030).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyType {
    SevenBit,
    EightBitMime,
    /// RFC 3030 §3: only with BDAT.
    BinaryMime,
}

/// The ESMTP parameters of one `MAIL FROM` or `RCPT TO`, in the order given:
/// keywords upper-case, values xtext-decoded (and upper-cased for the
/// keyword-valued `BODY`, `RET` and `NOTIFY`), `None` for a bare keyword.
/// A command without parameters has an empty list, which allocates nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct EsmtpParams(Vec<(&'static str, Option<Cow<'static, str>>)>);

impl EsmtpParams {
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, Option<&str>)> {
        self.0.iter().map(|(keyword, value)| (*keyword, value.as_deref()))
    }

    /// `Some(value)` when `keyword` (upper-case) was given.
    pub fn get(&self, keyword: &str) -> Option<Option<&str>> {
        self.iter().find(|(given, _)| *given == keyword).map(|(_, value)| value)
    }

    pub fn contains(&self, keyword: &str) -> bool {
        self.0.iter().any(|(given, _)| *given == keyword)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// What the session needs of `MAIL FROM`'s parameters, and all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    pub size: Option<u64>,
    pub body: Option<BodyType>,
    pub smtputf8: bool,
    /// RFC 8689 `REQUIRETLS`.
    pub requiretls: bool,
    /// Every parameter as given (the session moves them into the sender's [`Mailbox`]).
    pub all: EsmtpParams,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    /// RFC 2033's EHLO of LMTP.
    Lhlo(String),
    MailFrom {
        reverse_path: ReversePath,
        params: MailParams,
    },
    RcptTo {
        forward_path: Mailbox,
    },
    Data,
    /// RFC 3030 `BDAT chunk-size [LAST]`: `size` octets follow the line.
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy(String),
    Help,
    StartTls,
    /// `mechanism` is upper-cased.
    Auth {
        mechanism: String,
        initial_response: Option<String>,
    },
    /// The raw argument text; its meaning is decided by the session.
    XClient(String),
}

impl Command {
    /// RFC 2920 §3.1: a client may pipeline nothing after these commands
    /// before it has the reply (QUIT aside, which ends the session anyway).
    pub fn ends_pipelining_group(&self) -> bool {
        matches!(
            self,
            Command::Ehlo(_) | Command::Helo(_) | Command::Lhlo(_) | Command::Data | Command::Noop | Command::Vrfy(_)
        )
    }
}

/// Whether a line is the start of an HTTP request: a browser or proxy
/// pointed at the SMTP port, or a cross-protocol attack through one.
pub fn is_http_request(line: &[u8]) -> bool {
    const STARTS: [&[u8]; 7] = [b"GET ", b"POST ", b"HEAD ", b"PUT ", b"CONNECT ", b"HOST:", b"USER-AGENT:"];
    STARTS.iter().any(|start| line.len() >= start.len() && line[..start.len()].eq_ignore_ascii_case(start))
}

/// A rejected command line, with the reply the client should get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    code: u16,
    enhanced: &'static str,
    text: Cow<'static, str>,
}

impl ParseError {
    pub fn reply(&self) -> Reply {
        Reply::with_text(self.code, self.enhanced, self.text.clone())
    }

    fn new(code: u16, enhanced: &'static str, text: impl Into<Cow<'static, str>>) -> Self {
        Self { code, enhanced, text: text.into() }
    }

    fn control_characters() -> Self {
        Self::new(500, "5.5.2", "command contains control characters")
    }

    fn invalid_utf8() -> Self {
        Self::new(501, "5.5.2", "invalid UTF-8 in command")
    }

    pub fn unrecognized() -> Self {
        Self::new(500, "5.5.2", "command not recognized")
    }

    fn syntax(text: impl Into<Cow<'static, str>>) -> Self {
        Self::new(501, "5.5.4", text)
    }

    fn bad_sender() -> Self {
        Self::new(501, "5.1.7", "bad sender address syntax")
    }

    fn bad_recipient() -> Self {
        Self::new(501, "5.1.3", "bad recipient address syntax")
    }

    fn recipient_too_long() -> Self {
        Self::new(501, "5.1.3", "recipient address too long (RFC 5321 4.5.3.1: path 256, local part 64 octets)")
    }

    fn unsupported_parameter(command: &str, keyword: &str) -> Self {
        Self::new(555, "5.5.4", format!("unsupported {command} parameter {keyword}"))
    }

    fn not_implemented() -> Self {
        Self::new(502, "5.5.1", "command not implemented")
    }

    /// The session cannot go on after this error (a malformed `BDAT`).
    pub fn ends_session(&self) -> bool {
        self.code == 521
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.code, self.enhanced, self.text)
    }
}

impl std::error::Error for ParseError {}

/// Parses one command line, given without its CRLF.
pub fn parse_command(line: &[u8]) -> Result<Command, ParseError> {
    let line = decode_line(line)?;
    let (verb, args) = split_verb(line);
    let mut buffer = [0; LONGEST_VERB];
    let verb = upper_case_verb(verb, &mut buffer).ok_or_else(ParseError::unrecognized)?;
    match verb {
        b"EHLO" => parse_hello(args, "syntax: EHLO hostname").map(Command::Ehlo),
        b"HELO" => parse_hello(args, "syntax: HELO hostname").map(Command::Helo),
        b"LHLO" => parse_hello(args, "syntax: LHLO hostname").map(Command::Lhlo),
        b"MAIL" => parse_mail(args),
        b"RCPT" => parse_rcpt(args),
        b"DATA" => without_arguments(args, Command::Data, "syntax: DATA takes no arguments"),
        b"BDAT" => parse_bdat(args),
        b"RSET" => without_arguments(args, Command::Rset, "syntax: RSET takes no arguments"),
        b"QUIT" => without_arguments(args, Command::Quit, "syntax: QUIT takes no arguments"),
        b"STARTTLS" => without_arguments(args, Command::StartTls, "syntax: STARTTLS takes no arguments"),
        b"NOOP" => Ok(Command::Noop),
        b"HELP" => Ok(Command::Help),
        b"VRFY" => parse_vrfy(args),
        b"AUTH" => parse_auth(args),
        b"XCLIENT" => Ok(Command::XClient(args.to_owned())),
        b"EXPN" | b"ETRN" | b"TURN" => Err(ParseError::not_implemented()),
        _ => Err(ParseError::unrecognized()),
    }
}

/// Rejects control characters (C0 but tab, DEL, C1) and invalid UTF-8, and
/// drops trailing whitespace.
fn decode_line(line: &[u8]) -> Result<&str, ParseError> {
    if line.iter().any(|&byte| (byte < b' ' && byte != b'\t') || byte == 0x7f) {
        return Err(ParseError::control_characters());
    }
    let line = std::str::from_utf8(line).map_err(|_| ParseError::invalid_utf8())?;
    if !line.is_ascii() && line.chars().any(char::is_control) {
        return Err(ParseError::control_characters());
    }
    Ok(line.trim_end_matches(is_blank))
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn split_verb(line: &str) -> (&str, &str) {
    match line.split_once(is_blank) {
        Some((verb, args)) => (verb, args.trim_start_matches(is_blank)),
        None => (line, ""),
    }
}

/// Upper-cases the verb into `buffer` so it can be matched without allocating;
/// `None` when it is too long to be any known verb.
fn upper_case_verb<'b>(verb: &str, buffer: &'b mut [u8; LONGEST_VERB]) -> Option<&'b [u8]> {
    let upper = buffer.get_mut(..verb.len())?;
    upper.copy_from_slice(verb.as_bytes());
    upper.make_ascii_uppercase();
    Some(upper)
}

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(is_blank).filter(|word| !word.is_empty())
}

fn without_arguments(args: &str, command: Command, usage: &'static str) -> Result<Command, ParseError> {
    if args.is_empty() {
        Ok(command)
    } else {
        Err(ParseError::syntax(usage))
    }
}

/// Like Postfix, any token is accepted as the client's name, and extra words are ignored.
fn parse_hello(args: &str, usage: &'static str) -> Result<String, ParseError> {
    let domain = words(args).next().ok_or_else(|| ParseError::syntax(usage))?;
    Ok(domain.to_owned())
}

fn parse_vrfy(args: &str) -> Result<Command, ParseError> {
    if args.is_empty() {
        return Err(ParseError::syntax("syntax: VRFY address"));
    }
    Ok(Command::Vrfy(args.to_owned()))
}

fn parse_auth(args: &str) -> Result<Command, ParseError> {
    let usage = || ParseError::syntax("syntax: AUTH mechanism [initial-response]");
    let mut words = words(args);
    let mechanism = words.next().ok_or_else(usage)?.to_ascii_uppercase();
    let initial_response = words.next().map(str::to_owned);
    if words.next().is_some() {
        return Err(usage());
    }
    Ok(Command::Auth { mechanism, initial_response })
}

fn parse_mail(args: &str) -> Result<Command, ParseError> {
    let path = strip_path_keyword(args, "FROM:").ok_or_else(|| ParseError::syntax("syntax: MAIL FROM:<address>"))?;
    let (reverse_path, params) = parse_reverse_path(path).ok_or_else(ParseError::bad_sender)?;
    let params = parse_mail_params(params)?;
    Ok(Command::MailFrom { reverse_path, params })
}

fn parse_rcpt(args: &str) -> Result<Command, ParseError> {
    let path = strip_path_keyword(args, "TO:").ok_or_else(|| ParseError::syntax("syntax: RCPT TO:<address>"))?;
    let (mut forward_path, local_part_len, params) = parse_forward_path(path).ok_or_else(ParseError::bad_recipient)?;
    // What a client can make us hold per recipient is bounded by these, not by the line length.
    if path.len() - params.len() > MAX_PATH_LEN || local_part_len > MAX_LOCAL_PART_LEN {
        return Err(ParseError::recipient_too_long());
    }
    forward_path.params = parse_parameters(params, "RCPT", &RCPT_KEYWORDS)?;
    Ok(Command::RcptTo { forward_path })
}

/// Strips `FROM:` / `TO:` (any case) and the one space Postfix tolerates after
/// the colon; `None` if the keyword is missing or nothing follows it.
fn strip_path_keyword<'a>(args: &'a str, keyword: &str) -> Option<&'a str> {
    let (head, rest) = args.split_at_checked(keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let path = rest.strip_prefix(' ').unwrap_or(rest);
    (!path.is_empty()).then_some(path)
}

/// Returns the path and the parameter text after it.
fn parse_reverse_path(input: &str) -> Option<(ReversePath, &str)> {
    if let Some(rest) = input.strip_prefix("<>") {
        return Some((ReversePath::Null, end_of_path(rest)?));
    }
    let (mailbox, _, params) = parse_path(input)?;
    Some((ReversePath::Mailbox(mailbox), params))
}

/// Returns the path, the length of its local part as sent, and the parameter text after it.
fn parse_forward_path(input: &str) -> Option<(Mailbox, usize, &str)> {
    parse_bare_postmaster(input).or_else(|| parse_path(input))
}

/// `<postmaster>` without a domain is a valid recipient (RFC 5321 §4.5.1).
fn parse_bare_postmaster(input: &str) -> Option<(Mailbox, usize, &str)> {
    let (path, rest) = input.split_at_checked("<postmaster>".len())?;
    let local_part = path.strip_prefix('<')?.strip_suffix('>')?;
    if !local_part.eq_ignore_ascii_case("postmaster") {
        return None;
    }
    Some((Mailbox::new(local_part, ""), local_part.len(), end_of_path(rest)?))
}

/// `<[source-route:]local-part@domain>`, returning the length of the local
/// part as sent and the parameter text after the path.
fn parse_path(input: &str) -> Option<(Mailbox, usize, &str)> {
    let input = skip_source_route(input.strip_prefix('<')?)?;
    let (local_part, rest) = parse_local_part(input)?;
    let local_part_len = input.len() - rest.len();
    let (domain, rest) = parse_domain(rest.strip_prefix('@')?)?;
    let params = end_of_path(rest.strip_prefix('>')?)?;
    Some((Mailbox::new(local_part, domain), local_part_len, params))
}

/// A closed path must end the line or be followed by whitespace.
fn end_of_path(rest: &str) -> Option<&str> {
    (rest.is_empty() || rest.starts_with(is_blank)).then_some(rest)
}

/// Skips an obsolete `@a.example,@b.example:` source route, which RFC 5321
/// says must be accepted and ignored.
fn skip_source_route(input: &str) -> Option<&str> {
    if !input.starts_with('@') {
        return Some(input);
    }
    let mut rest = input;
    loop {
        let (_, after_domain) = parse_domain(rest.strip_prefix('@')?)?;
        if let Some(next) = after_domain.strip_prefix(',') {
            rest = next;
        } else {
            return after_domain.strip_prefix(':');
        }
    }
}

/// Returns the unquoted, unescaped local part and the text after it.
fn parse_local_part(input: &str) -> Option<(String, &str)> {
    match input.strip_prefix('"') {
        Some(quoted) => parse_quoted_string(quoted),
        None => parse_dot_string(input),
    }
}

fn parse_dot_string(input: &str) -> Option<(String, &str)> {
    let end = input.bytes().position(|byte| !is_atext_or_dot(byte)).unwrap_or(input.len());
    let (dot_string, rest) = input.split_at(end);
    has_valid_dots(dot_string).then(|| (dot_string.to_owned(), rest))
}

/// Parses the rest of a quoted string whose opening quote is already consumed,
/// copying unescaped runs in one go.
fn parse_quoted_string(input: &str) -> Option<(String, &str)> {
    let bytes = input.as_bytes();
    let mut content = String::new();
    let mut run_start = 0;
    let mut index = 0;
    loop {
        match *bytes.get(index)? {
            b'"' => {
                content.push_str(&input[run_start..index]);
                return Some((content, &input[index + 1..]));
            }
            b'\\' => {
                content.push_str(&input[run_start..index]);
                if !is_quotable(*bytes.get(index + 1)?) {
                    return None;
                }
                // The escaped character starts the next run.
                run_start = index + 1;
                index += 2;
            }
            byte if is_qtext(byte) => index += 1,
            _ => return None,
        }
    }
}

/// RFC 5321 qtextSMTP, plus any UTF-8 byte (RFC 6531).
fn is_qtext(byte: u8) -> bool {
    matches!(byte, b' ' | b'!' | b'#'..=b'[' | b']'..=b'~' | 0x80..)
}

/// What may follow a backslash in a quoted-pairSMTP.
fn is_quotable(byte: u8) -> bool {
    matches!(byte, b' '..=b'~')
}

/// RFC 5321 atext, plus any UTF-8 byte (RFC 6531).
fn is_atext(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || byte >= 0x80
        || matches!(
            byte,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'/'
                | b'='
                | b'?'
                | b'^'
                | b'_'
                | b'`'
                | b'{'
                | b'|'
                | b'}'
                | b'~'
        )
}

fn is_atext_or_dot(byte: u8) -> bool {
    is_atext(byte) || byte == b'.'
}

/// No leading, trailing or doubled dots (and not empty).
fn has_valid_dots(text: &str) -> bool {
    text.split('.').all(|atom| !atom.is_empty())
}

fn is_dot_string(text: &str) -> bool {
    text.bytes().all(is_atext_or_dot) && has_valid_dots(text)
}

/// A domain name or address literal, returned as given, and the text after it.
fn parse_domain(input: &str) -> Option<(&str, &str)> {
    if input.starts_with('[') {
        let end = input.find(']')? + 1;
        let (literal, rest) = input.split_at(end);
        is_valid_address_literal(&literal[1..end - 1]).then_some((literal, rest))
    } else {
        let end = input.bytes().position(|byte| !is_domain_byte(byte)).unwrap_or(input.len());
        let (domain, rest) = input.split_at(end);
        is_valid_domain_name(domain).then_some((domain, rest))
    }
}

/// Letters, digits, hyphens and dots; any non-ASCII character counts as a
/// letter so that U-labels (RFC 6531) pass without IDNA validation.
fn is_domain_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | 0x80..)
}

/// Lengths are counted in octets, also for U-labels.
fn is_valid_domain_name(domain: &str) -> bool {
    domain.len() <= MAX_DOMAIN_LEN && domain.split('.').all(is_valid_label)
}

fn is_valid_label(label: &str) -> bool {
    (1..=MAX_LABEL_LEN).contains(&label.len()) && !label.starts_with('-') && !label.ends_with('-')
}

/// `IPv4` or `IPv6:address` (the tag in any case); other tagged literals are refused.
fn is_valid_address_literal(content: &str) -> bool {
    match content.split_at_checked("IPv6:".len()) {
        Some((tag, address)) if tag.eq_ignore_ascii_case("IPv6:") => address.parse::<Ipv6Addr>().is_ok(),
        _ => content.parse::<Ipv4Addr>().is_ok(),
    }
}

fn parse_mail_params(text: &str) -> Result<MailParams, ParseError> {
    let all = parse_parameters(text, "MAIL", &MAIL_KEYWORDS)?;
    if all.is_empty() {
        return Ok(MailParams::default());
    }
    Ok(MailParams {
        // Validated as digits that fit a u64.
        size: all.get("SIZE").flatten().and_then(|digits| digits.parse().ok()),
        body: all.get("BODY").flatten().map(|body| match body {
            "7BIT" => BodyType::SevenBit,
            "BINARYMIME" => BodyType::BinaryMime,
            _ => BodyType::EightBitMime,
        }),
        smtputf8: all.contains("SMTPUTF8"),
        requiretls: all.contains("REQUIRETLS"),
        all,
    })
}

/// The ESMTP parameters this server knows, each with its value's syntax.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keyword {
    /// RFC 1870.
    Size,
    /// RFC 6152.
    Body,
    /// RFC 6531.
    SmtpUtf8,
    /// RFC 8689.
    RequireTls,
    /// RFC 3461 §4.3.
    Ret,
    /// RFC 3461 §4.4.
    EnvId,
    /// RFC 4954 §5.
    Auth,
    /// RFC 3461 §4.1.
    Notify,
    /// RFC 3461 §4.2.
    Orcpt,
}

const MAIL_KEYWORDS: [Keyword; 7] =
    [Keyword::Size, Keyword::Body, Keyword::SmtpUtf8, Keyword::RequireTls, Keyword::Ret, Keyword::EnvId, Keyword::Auth];
const RCPT_KEYWORDS: [Keyword; 2] = [Keyword::Notify, Keyword::Orcpt];

/// RFC 3461 §4.4: "the ENVID esmtp-value MUST NOT exceed 100 characters".
const MAX_ENVID_LEN: usize = 100;
/// RFC 3461 §4.2: "the ORCPT esmtp-value MUST NOT exceed 500 characters".
const MAX_ORCPT_LEN: usize = 500;

impl Keyword {
    const fn name(self) -> &'static str {
        match self {
            Keyword::Size => "SIZE",
            Keyword::Body => "BODY",
            Keyword::SmtpUtf8 => "SMTPUTF8",
            Keyword::RequireTls => "REQUIRETLS",
            Keyword::Ret => "RET",
            Keyword::EnvId => "ENVID",
            Keyword::Auth => "AUTH",
            Keyword::Notify => "NOTIFY",
            Keyword::Orcpt => "ORCPT",
        }
    }

    /// The value as policy sees it, or the refusal.
    fn parse_value(self, value: Option<&str>) -> Result<Option<Cow<'static, str>>, ParseError> {
        match self {
            Keyword::Size => parse_size(value).map(|digits| Some(Cow::Owned(digits.to_owned()))),
            Keyword::Body => parse_body(value).map(|body| Some(Cow::Borrowed(body))),
            Keyword::SmtpUtf8 | Keyword::RequireTls => match value {
                None => Ok(None),
                Some(_) => Err(ParseError::syntax(format!("syntax: {} takes no value", self.name()))),
            },
            Keyword::Ret => match value {
                Some(ret) if ret.eq_ignore_ascii_case("FULL") => Ok(Some(Cow::Borrowed("FULL"))),
                Some(ret) if ret.eq_ignore_ascii_case("HDRS") => Ok(Some(Cow::Borrowed("HDRS"))),
                _ => Err(ParseError::syntax("syntax: RET=FULL or RET=HDRS")),
            },
            Keyword::EnvId => value
                .filter(|envid| envid.len() <= MAX_ENVID_LEN)
                .and_then(xtext)
                .map(|envid| Some(Cow::Owned(envid)))
                .ok_or_else(|| ParseError::syntax("syntax: ENVID=<xtext of at most 100 characters>")),
            Keyword::Auth => value
                .and_then(xtext)
                .map(|mailbox| Some(Cow::Owned(mailbox)))
                .ok_or_else(|| ParseError::syntax("syntax: AUTH=<mailbox or <> in xtext>")),
            Keyword::Notify => value
                .and_then(parse_notify)
                .map(|notify| Some(Cow::Owned(notify)))
                .ok_or_else(|| ParseError::syntax("syntax: NOTIFY=NEVER or a list of SUCCESS, FAILURE, DELAY")),
            Keyword::Orcpt => value
                .and_then(parse_orcpt)
                .map(|orcpt| Some(Cow::Owned(orcpt)))
                .ok_or_else(|| ParseError::syntax("syntax: ORCPT=addr-type;xtext (at most 500 characters)")),
        }
    }
}

/// Every parameter in `text`, each once; unknown ones (not in `known`) get `555`.
fn parse_parameters(text: &str, command: &'static str, known: &[Keyword]) -> Result<EsmtpParams, ParseError> {
    let mut params = EsmtpParams::default();
    for word in words(text) {
        let (given, value) = split_parameter(word, command)?;
        let keyword = known
            .iter()
            .copied()
            .find(|keyword| keyword.name().eq_ignore_ascii_case(given))
            .ok_or_else(|| ParseError::unsupported_parameter(command, given))?;
        if params.contains(keyword.name()) {
            return Err(ParseError::syntax(format!("duplicate {command} parameter {given}")));
        }
        let value = keyword.parse_value(value)?;
        params.0.push((keyword.name(), value));
    }
    Ok(params)
}

/// Non-empty RFC 3461 xtext, decoded to UTF-8 text without control characters
/// (they would reach logs and headers).
fn xtext(text: &str) -> Option<String> {
    if text.is_empty() {
        return None;
    }
    let decoded = super::xtext::decode_xtext(text).ok()?;
    (!decoded.chars().any(char::is_control)).then_some(decoded)
}

/// `NEVER` alone, or SUCCESS, FAILURE and DELAY, each at most once, comma-separated.
fn parse_notify(value: &str) -> Option<String> {
    let notify = value.to_ascii_uppercase();
    if notify == "NEVER" {
        return Some(notify);
    }
    let mut seen = Vec::with_capacity(3);
    for item in notify.split(',') {
        if !matches!(item, "SUCCESS" | "FAILURE" | "DELAY") || seen.contains(&item) {
            return None;
        }
        seen.push(item);
    }
    Some(notify)
}

/// `addr-type;xtext`, returned as `addr-type;decoded`.
fn parse_orcpt(value: &str) -> Option<String> {
    if value.len() > MAX_ORCPT_LEN {
        return None;
    }
    let (addr_type, address) = value.split_once(';')?;
    let is_atom = !addr_type.is_empty() && addr_type.bytes().all(|byte| byte.is_ascii() && is_atext(byte));
    if !is_atom {
        return None;
    }
    Some(format!("{addr_type};{}", xtext(address)?))
}

/// Splits `KEYWORD[=value]`. The keyword is validated because it is echoed in replies.
fn split_parameter<'a>(word: &'a str, command: &str) -> Result<(&'a str, Option<&'a str>), ParseError> {
    let (keyword, value) = match word.split_once('=') {
        Some((keyword, value)) => (keyword, Some(value)),
        None => (word, None),
    };
    if !is_esmtp_keyword(keyword) {
        return Err(ParseError::syntax(format!("bad {command} parameter syntax")));
    }
    Ok((keyword, value))
}

fn is_esmtp_keyword(keyword: &str) -> bool {
    let mut bytes = keyword.bytes();
    bytes.next().is_some_and(|first| first.is_ascii_alphanumeric())
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
}

/// The digits of a `SIZE=` value that fits a u64.
fn parse_size(value: Option<&str>) -> Result<&str, ParseError> {
    // The digit check matters: `u64::from_str` would also accept a leading `+`.
    value
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit()))
        .filter(|digits| digits.parse::<u64>().is_ok())
        .ok_or_else(|| ParseError::syntax("syntax: SIZE=<number>"))
}

/// `7BIT`, `8BITMIME` or (RFC 3030) `BINARYMIME`.
fn parse_body(value: Option<&str>) -> Result<&'static str, ParseError> {
    match value {
        Some(value) if value.eq_ignore_ascii_case("7BIT") => Ok("7BIT"),
        Some(value) if value.eq_ignore_ascii_case("8BITMIME") => Ok("8BITMIME"),
        Some(value) if value.eq_ignore_ascii_case("BINARYMIME") => Ok("BINARYMIME"),
        _ => Err(ParseError::syntax("syntax: BODY=7BIT, BODY=8BITMIME or BODY=BINARYMIME")),
    }
}

/// RFC 3030 §2: `chunk-size [SP "LAST"]`, the size `1*DIGIT` (that fits a
/// u64), `LAST` in any case. Refused with `521` as Postfix does: with its size
/// unknown, the chunk that follows could only be misread as commands, so the
/// session ends.
fn parse_bdat(args: &str) -> Result<Command, ParseError> {
    let malformed = || ParseError::new(521, "5.5.4", "syntax: BDAT size [LAST]");
    let mut words = words(args);
    let size = words
        .next()
        .filter(|digits| digits.bytes().all(|byte| byte.is_ascii_digit()))
        .and_then(|digits| digits.parse().ok())
        .ok_or_else(malformed)?;
    let last = match words.next() {
        None => false,
        Some(word) if word.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(malformed()),
    };
    if words.next().is_some() {
        return Err(malformed());
    }
    Ok(Command::Bdat { size, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Command {
        parse_command(line.as_bytes()).unwrap_or_else(|error| panic!("{line:?} rejected: {error}"))
    }

    fn reply_to(line: &[u8]) -> (u16, &'static str, String) {
        match parse_command(line) {
            Ok(command) => panic!("{:?} accepted as {command:?}", String::from_utf8_lossy(line)),
            Err(error) => (error.code, error.enhanced, error.text.into_owned()),
        }
    }

    fn codes(line: &str) -> (u16, &'static str) {
        let (code, enhanced, _) = reply_to(line.as_bytes());
        (code, enhanced)
    }

    fn mailbox(local_part: &str, domain: &str) -> Mailbox {
        Mailbox::new(local_part, domain)
    }

    /// The parameters as policy sees them.
    fn listed(params: &EsmtpParams) -> Vec<(&'static str, Option<String>)> {
        params.iter().map(|(keyword, value)| (keyword, value.map(str::to_owned))).collect()
    }

    fn mail_params_of(line: &str) -> Vec<(&'static str, Option<String>)> {
        listed(&params(line).all)
    }

    fn rcpt_params_of(line: &str) -> Vec<(&'static str, Option<String>)> {
        listed(&recipient(line).params)
    }

    fn some(value: &str) -> Option<String> {
        Some(value.to_owned())
    }

    fn mail_from(line: &str) -> (ReversePath, MailParams) {
        match parse(line) {
            Command::MailFrom { reverse_path, params } => (reverse_path, params),
            other => panic!("{line:?} parsed as {other:?}"),
        }
    }

    fn sender(line: &str) -> Mailbox {
        match mail_from(line).0 {
            ReversePath::Mailbox(mailbox) => mailbox,
            ReversePath::Null => panic!("{line:?} parsed as the null sender"),
        }
    }

    fn params(line: &str) -> MailParams {
        mail_from(line).1
    }

    fn recipient(line: &str) -> Mailbox {
        match parse(line) {
            Command::RcptTo { forward_path } => forward_path,
            other => panic!("{line:?} parsed as {other:?}"),
        }
    }

    fn text(error: (u16, &'static str, String)) -> String {
        error.2
    }

    const BAD_SENDER: (u16, &str) = (501, "5.1.7");
    const BAD_RECIPIENT: (u16, &str) = (501, "5.1.3");
    const SYNTAX: (u16, &str) = (501, "5.5.4");
    const UNSUPPORTED: (u16, &str) = (555, "5.5.4");
    const UNRECOGNIZED: (u16, &str) = (500, "5.5.2");

    #[test]
    fn every_verb_is_case_insensitive() {
        let cases = [
            ("EHLO", " a.example", Command::Ehlo("a.example".into())),
            ("HELO", " a.example", Command::Helo("a.example".into())),
            ("LHLO", " a.example", Command::Lhlo("a.example".into())),
            ("MAIL", " FROM:<>", Command::MailFrom { reverse_path: ReversePath::Null, params: MailParams::default() }),
            ("RCPT", " TO:<a@b.example>", Command::RcptTo { forward_path: mailbox("a", "b.example") }),
            ("DATA", "", Command::Data),
            ("BDAT", " 5 LAST", Command::Bdat { size: 5, last: true }),
            ("RSET", "", Command::Rset),
            ("NOOP", "", Command::Noop),
            ("QUIT", "", Command::Quit),
            ("VRFY", " someone", Command::Vrfy("someone".into())),
            ("HELP", "", Command::Help),
            ("STARTTLS", "", Command::StartTls),
            ("AUTH", " PLAIN", Command::Auth { mechanism: "PLAIN".into(), initial_response: None }),
            ("XCLIENT", " NAME=x", Command::XClient("NAME=x".into())),
        ];
        for (verb, args, expected) in cases {
            let mixed: String = verb
                .chars()
                .enumerate()
                .map(|(index, c)| if index % 2 == 0 { c.to_ascii_lowercase() } else { c })
                .collect();
            for spelling in [verb.to_owned(), verb.to_ascii_lowercase(), mixed] {
                assert_eq!(parse(&format!("{spelling}{args}")), expected, "{spelling}{args}");
            }
        }
    }

    #[test]
    fn hello_keeps_its_argument_as_given() {
        assert_eq!(parse("EHLO Mail.Example"), Command::Ehlo("Mail.Example".into()));
        assert_eq!(parse("EHLO [1.2.3.4]"), Command::Ehlo("[1.2.3.4]".into()));
        assert_eq!(parse("HELO [IPv6:::1]"), Command::Helo("[IPv6:::1]".into()));
        assert_eq!(parse("HELO not_a_valid-name!"), Command::Helo("not_a_valid-name!".into()));
    }

    #[test]
    fn hello_ignores_extra_words_and_whitespace() {
        assert_eq!(parse("EHLO a.example extra words"), Command::Ehlo("a.example".into()));
        assert_eq!(parse("EHLO   a.example  "), Command::Ehlo("a.example".into()));
        assert_eq!(parse("EHLO\ta.example"), Command::Ehlo("a.example".into()));
    }

    #[test]
    fn hello_without_argument_is_rejected() {
        assert_eq!(reply_to(b"EHLO"), (501, "5.5.4", "syntax: EHLO hostname".into()));
        assert_eq!(reply_to(b"EHLO   "), (501, "5.5.4", "syntax: EHLO hostname".into()));
        assert_eq!(reply_to(b"HELO"), (501, "5.5.4", "syntax: HELO hostname".into()));
    }

    #[test]
    fn commands_without_arguments() {
        assert_eq!(parse("DATA"), Command::Data);
        assert_eq!(parse("RSET "), Command::Rset);
        assert_eq!(parse("QUIT"), Command::Quit);
        assert_eq!(parse("STARTTLS"), Command::StartTls);
    }

    #[test]
    fn commands_without_arguments_reject_one() {
        assert_eq!(reply_to(b"DATA now"), (501, "5.5.4", "syntax: DATA takes no arguments".into()));
        assert_eq!(reply_to(b"RSET x"), (501, "5.5.4", "syntax: RSET takes no arguments".into()));
        assert_eq!(reply_to(b"QUIT x"), (501, "5.5.4", "syntax: QUIT takes no arguments".into()));
        assert_eq!(reply_to(b"STARTTLS x"), (501, "5.5.4", "syntax: STARTTLS takes no arguments".into()));
    }

    #[test]
    fn noop_and_help_ignore_their_argument() {
        assert_eq!(parse("NOOP"), Command::Noop);
        assert_eq!(parse("NOOP anything at all"), Command::Noop);
        assert_eq!(parse("HELP"), Command::Help);
        assert_eq!(parse("HELP MAIL"), Command::Help);
    }

    #[test]
    fn vrfy_needs_an_argument() {
        assert_eq!(parse("VRFY John Smith"), Command::Vrfy("John Smith".into()));
        assert_eq!(codes("VRFY"), SYNTAX);
        assert_eq!(codes("VRFY  "), SYNTAX);
    }

    #[test]
    fn auth_upper_cases_the_mechanism_and_keeps_the_response() {
        assert_eq!(parse("AUTH login"), Command::Auth { mechanism: "LOGIN".into(), initial_response: None });
        assert_eq!(
            parse("AUTH plain AGFsaWNlAHNlY3JldA=="),
            Command::Auth { mechanism: "PLAIN".into(), initial_response: Some("AGFsaWNlAHNlY3JldA==".into()) }
        );
        assert_eq!(
            parse("AUTH PLAIN ="),
            Command::Auth { mechanism: "PLAIN".into(), initial_response: Some("=".into()) }
        );
    }

    #[test]
    fn auth_rejects_missing_or_extra_arguments() {
        assert_eq!(codes("AUTH"), SYNTAX);
        assert_eq!(codes("AUTH PLAIN abc def"), SYNTAX);
    }

    #[test]
    fn xclient_keeps_the_raw_rest_of_the_line() {
        assert_eq!(parse("XCLIENT NAME=x ADDR=192.0.2.1"), Command::XClient("NAME=x ADDR=192.0.2.1".into()));
        assert_eq!(parse("XCLIENT"), Command::XClient(String::new()));
        assert_eq!(parse("XCLIENT   "), Command::XClient(String::new()));
    }

    #[test]
    fn unknown_verbs_are_not_recognized() {
        for line in [
            "GET / HTTP/1.1",
            "POST /",
            "PROXY TCP4 1.2.3.4 5.6.7.8 1 2",
            "",
            "   ",
            " NOOP",
            "MAILFROM:<a@b>",
            "STARTTLSX",
        ] {
            assert_eq!(reply_to(line.as_bytes()), (500, "5.5.2", "command not recognized".into()), "{line:?}");
        }
    }

    #[test]
    fn control_characters_are_rejected() {
        let lines: [&[u8]; 9] = [
            b"NOOP\x00",
            b"NOOP\nRSET",
            b"NOOP\r",
            b"\x1bNOOP",
            b"MAIL FROM:<a\x01@b>",
            b"\x00\x80",
            b"VRFY p\x7fstmaster",
            b"EHLO mx\x7f",
            "EHLO mx\u{85}".as_bytes(),
        ];
        for line in lines {
            assert_eq!(reply_to(line), (500, "5.5.2", "command contains control characters".into()), "{line:?}");
        }
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        assert_eq!(reply_to(b"\x80\x81"), (501, "5.5.2", "invalid UTF-8 in command".into()));
        assert_eq!(reply_to(b"MAIL FROM:<\xff@b.example>"), (501, "5.5.2", "invalid UTF-8 in command".into()));
    }

    #[test]
    fn tab_is_whitespace_between_words_only() {
        let (reverse_path, params) = mail_from("MAIL\tFROM:<a@b.example>\tSIZE=1");
        assert_eq!(reverse_path, ReversePath::Mailbox(mailbox("a", "b.example")));
        assert_eq!(params.size, Some(1));
        assert_eq!(codes("MAIL FROM:<\"a\tb\"@b.example>"), BAD_SENDER);
    }

    #[test]
    fn mail_from_with_size_and_body() {
        let (reverse_path, params) = mail_from("MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME");
        assert_eq!(reverse_path, ReversePath::Mailbox(mailbox("a", "b.example")));
        assert_eq!((params.size, params.body, params.smtputf8), (Some(1000), Some(BodyType::EightBitMime), false));
        assert_eq!(listed(&params.all), [("SIZE", some("1000")), ("BODY", some("8BITMIME"))]);
    }

    #[test]
    fn mail_from_null_sender() {
        assert_eq!(mail_from("MAIL FROM:<>"), (ReversePath::Null, MailParams::default()));
        assert_eq!(mail_from("MAIL FROM:<> BODY=7BIT").1.body, Some(BodyType::SevenBit));
        assert_eq!(codes("MAIL FROM:<>x"), BAD_SENDER);
    }

    #[test]
    fn mail_from_keyword_is_case_insensitive_and_tolerates_one_space() {
        assert_eq!(sender("mail from:<a@b.example>"), mailbox("a", "b.example"));
        assert_eq!(sender("MAIL From: <a@b.example>"), mailbox("a", "b.example"));
        assert_eq!(sender("MAIL  FROM:<a@b.example>"), mailbox("a", "b.example"));
        assert_eq!(codes("MAIL FROM:  <a@b.example>"), BAD_SENDER);
    }

    #[test]
    fn mail_without_from_keyword_is_a_syntax_error() {
        for line in [
            "MAIL",
            "MAIL <a@b.example>",
            "MAIL FROM <a@b.example>",
            "MAIL FRM:<a@b.example>",
            "MAIL TO:<a@b.example>",
            "MAIL FROM:",
            "MAIL FROM: ",
        ] {
            assert_eq!(reply_to(line.as_bytes()), (501, "5.5.4", "syntax: MAIL FROM:<address>".into()), "{line:?}");
        }
    }

    #[test]
    fn mail_from_requires_a_well_formed_path() {
        assert_eq!(reply_to(b"MAIL FROM:a@b.example"), (501, "5.1.7", "bad sender address syntax".into()));
        for line in [
            "MAIL FROM:<a@b.example",
            "MAIL FROM:a@b.example>",
            "MAIL FROM:<a@b.example>SIZE=1",
            "MAIL FROM:<a>",
            "MAIL FROM:<postmaster>",
            "MAIL FROM:<@b.example>",
            "MAIL FROM:<a@>",
            "MAIL FROM:<a b@c.example>",
            "MAIL FROM:<<a@b.example>>",
        ] {
            assert_eq!(codes(line), BAD_SENDER, "{line:?}");
        }
    }

    #[test]
    fn mail_params_are_case_insensitive_and_tolerate_extra_spaces() {
        let given = params("MAIL FROM:<a@b.example>   size=42  body=7bit\tsmtputf8");
        assert_eq!((given.size, given.body, given.smtputf8), (Some(42), Some(BodyType::SevenBit), true));
        assert_eq!(listed(&given.all), [("SIZE", some("42")), ("BODY", some("7BIT")), ("SMTPUTF8", None)]);
        assert_eq!(params("MAIL FROM:<a@b.example> Body=8bitMime").body, Some(BodyType::EightBitMime));
    }

    #[test]
    fn size_must_be_a_u64() {
        assert_eq!(params("MAIL FROM:<a@b.example> SIZE=0").size, Some(0));
        assert_eq!(params("MAIL FROM:<a@b.example> SIZE=18446744073709551615").size, Some(u64::MAX));
        for value in ["SIZE", "SIZE=", "SIZE=abc", "SIZE=+5", "SIZE=-5", "SIZE=1k", "SIZE=18446744073709551616"] {
            assert_eq!(codes(&format!("MAIL FROM:<a@b.example> {value}")), SYNTAX, "{value}");
        }
    }

    #[test]
    fn body_must_be_7bit_8bitmime_or_binarymime() {
        for value in ["BODY", "BODY=", "BODY=8BIT", "BODY=BINARY"] {
            assert_eq!(codes(&format!("MAIL FROM:<a@b.example> {value}")), SYNTAX, "{value}");
        }
        let given = params("MAIL FROM:<a@b.example> BODY=binarymime");
        assert_eq!(given.body, Some(BodyType::BinaryMime));
        assert_eq!(listed(&given.all), [("BODY", some("BINARYMIME"))]);
    }

    #[test]
    fn bdat_takes_a_size_and_an_optional_last() {
        assert_eq!(parse("BDAT 0"), Command::Bdat { size: 0, last: false });
        assert_eq!(parse("bdat 1000 last"), Command::Bdat { size: 1000, last: true });
        assert_eq!(parse("BDAT  18446744073709551615\tLAST "), Command::Bdat { size: u64::MAX, last: true });
        let malformed = ["BDAT", "BDAT x", "BDAT 1x", "BDAT +5", "BDAT -1", "BDAT 18446744073709551616", "BDAT LAST"];
        for line in malformed.into_iter().chain(["BDAT 5 FIRST", "BDAT 5 LAST now", "BDAT 0x10"]) {
            assert_eq!(reply_to(line.as_bytes()), (521, "5.5.4", "syntax: BDAT size [LAST]".into()), "{line}");
            assert!(parse_command(line.as_bytes()).unwrap_err().ends_session(), "{line}");
        }
        assert!(!parse_command(b"DATA now").unwrap_err().ends_session());
    }

    #[test]
    fn smtputf8_takes_no_value() {
        assert!(params("MAIL FROM:<a@b.example> SMTPUTF8").smtputf8);
        assert_eq!(codes("MAIL FROM:<a@b.example> SMTPUTF8=yes"), SYNTAX);
        assert_eq!(codes("MAIL FROM:<a@b.example> SMTPUTF8="), SYNTAX);
    }

    #[test]
    fn mail_params_may_not_repeat() {
        for repeated in ["SIZE=1 SIZE=2", "BODY=7BIT body=7bit", "SMTPUTF8 SMTPUTF8"] {
            assert_eq!(codes(&format!("MAIL FROM:<a@b.example> {repeated}")), SYNTAX, "{repeated}");
        }
        assert_eq!(text(reply_to(b"MAIL FROM:<a@b.example> SIZE=1 size=1")), "duplicate MAIL parameter size");
    }

    #[test]
    fn unknown_mail_params_are_unsupported() {
        assert_eq!(reply_to(b"MAIL FROM:<a@b.example> FOO=1"), (555, "5.5.4", "unsupported MAIL parameter FOO".into()));
        assert_eq!(text(reply_to(b"MAIL FROM:<a@b.example> NOTIFY=NEVER")), "unsupported MAIL parameter NOTIFY");
        assert_eq!(
            text(reply_to(b"MAIL FROM:<a@b.example> SIZE=1 orcpt=rfc822;a")),
            "unsupported MAIL parameter orcpt"
        );
        assert_eq!(codes("MAIL FROM:<> X-CUSTOM"), UNSUPPORTED);
        assert_eq!(codes("MAIL FROM:<> MT-PRIORITY=3"), UNSUPPORTED);
    }

    #[test]
    fn malformed_parameter_keywords_are_syntax_errors() {
        for param in ["=1", "-X=1", "A_B=1", "Ü=1"] {
            assert_eq!(
                reply_to(format!("MAIL FROM:<a@b.example> {param}").as_bytes()),
                (501, "5.5.4", "bad MAIL parameter syntax".into()),
                "{param}"
            );
        }
        assert_eq!(reply_to(b"RCPT TO:<a@b.example> =1"), (501, "5.5.4", "bad RCPT parameter syntax".into()));
    }

    #[test]
    fn rcpt_to_accepts_a_mailbox() {
        assert_eq!(recipient("RCPT TO:<a@b.example>"), mailbox("a", "b.example"));
        assert_eq!(recipient("rcpt to: <a@b.example>"), mailbox("a", "b.example"));
        assert_eq!(recipient("RCPT TO:<a@b.example>   "), mailbox("a", "b.example"));
    }

    #[test]
    fn rcpt_to_accepts_bare_postmaster_as_given() {
        assert_eq!(recipient("RCPT TO:<postmaster>"), mailbox("postmaster", ""));
        assert_eq!(recipient("RCPT TO:<Postmaster>"), mailbox("Postmaster", ""));
        assert_eq!(recipient("RCPT TO:<Postmaster@b.example>"), mailbox("Postmaster", "b.example"));
        assert_eq!(codes("RCPT TO:<postmaster>x"), BAD_RECIPIENT);
        assert_eq!(codes("RCPT TO:<postmasters>"), BAD_RECIPIENT);
        assert_eq!(codes("RCPT TO:<\"postmaster\">"), BAD_RECIPIENT);
    }

    #[test]
    fn rcpt_to_rejects_bad_addresses() {
        assert_eq!(reply_to(b"RCPT TO:<>"), (501, "5.1.3", "bad recipient address syntax".into()));
        for line in ["RCPT TO:a@b.example", "RCPT TO:<user>", "RCPT TO:<a@-b.example>", "RCPT TO:<a@b.example"] {
            assert_eq!(codes(line), BAD_RECIPIENT, "{line:?}");
        }
    }

    #[test]
    fn rcpt_without_to_keyword_is_a_syntax_error() {
        for line in ["RCPT", "RCPT <a@b.example>", "RCPT FROM:<a@b.example>", "RCPT TO:"] {
            assert_eq!(reply_to(line.as_bytes()), (501, "5.5.4", "syntax: RCPT TO:<address>".into()), "{line:?}");
        }
    }

    #[test]
    fn unknown_rcpt_params_are_unsupported() {
        assert_eq!(reply_to(b"RCPT TO:<a@b> SIZE=1"), (555, "5.5.4", "unsupported RCPT parameter SIZE".into()));
        assert_eq!(codes("RCPT TO:<postmaster> RET=FULL"), UNSUPPORTED);
        assert_eq!(codes("RCPT TO:<a@b> NOTIFY=NEVER X-FOO"), UNSUPPORTED);
    }

    #[test]
    fn a_command_without_parameters_has_an_empty_list() {
        assert!(params("MAIL FROM:<a@b.example>").all.is_empty());
        assert!(recipient("RCPT TO:<a@b.example>").params.is_empty());
        assert_eq!(params("MAIL FROM:<a@b.example>").all.0.capacity(), 0, "nothing allocated");
    }

    #[test]
    fn dsn_parameters_of_mail() {
        assert_eq!(
            mail_params_of("MAIL FROM:<a@b.example> ret=hdrs ENVID=QQ314159+2B+3D"),
            [("RET", some("HDRS")), ("ENVID", some("QQ314159+="))]
        );
        assert_eq!(mail_params_of("MAIL FROM:<> RET=Full"), [("RET", some("FULL"))]);
        for value in ["RET", "RET=", "RET=ALL", "RET=FULL,HDRS"] {
            assert_eq!(codes(&format!("MAIL FROM:<a@b.example> {value}")), SYNTAX, "{value}");
        }
    }

    #[test]
    fn envid_is_xtext_of_at_most_100_characters() {
        let longest = "e".repeat(100);
        assert_eq!(mail_params_of(&format!("MAIL FROM:<> ENVID={longest}")), [("ENVID", some(&longest))]);
        let too_long = "e".repeat(101);
        // Escapes decode to fewer characters, but the limit is on the value as sent.
        let escaped = "+41".repeat(34);
        for value in ["ENVID", "ENVID=", "ENVID=a+2", "ENVID=a+2b", "ENVID=a+ZZ", "ENVID=+0D+0A", "ENVID=+FF"] {
            assert_eq!(codes(&format!("MAIL FROM:<> {value}")), SYNTAX, "{value}");
        }
        assert_eq!(codes(&format!("MAIL FROM:<> ENVID={too_long}")), SYNTAX);
        assert_eq!(codes(&format!("MAIL FROM:<> ENVID={escaped}")), SYNTAX);
        assert_eq!(mail_params_of("MAIL FROM:<> ENVID=+C3+A9"), [("ENVID", some("é"))]);
    }

    #[test]
    fn auth_of_mail_is_an_xtext_mailbox_or_null() {
        assert_eq!(mail_params_of("MAIL FROM:<a@b.example> AUTH=<>"), [("AUTH", some("<>"))]);
        assert_eq!(mail_params_of("MAIL FROM:<a@b.example> AUTH=e+2Bf@b.example"), [("AUTH", some("e+f@b.example"))]);
        for value in ["AUTH", "AUTH=", "AUTH=a+b"] {
            assert_eq!(codes(&format!("MAIL FROM:<a@b.example> {value}")), SYNTAX, "{value}");
        }
    }

    #[test]
    fn requiretls_takes_no_value() {
        let given = params("MAIL FROM:<a@b.example> RequireTLS");
        assert!(given.requiretls);
        assert_eq!(listed(&given.all), [("REQUIRETLS", None)]);
        assert!(!params("MAIL FROM:<a@b.example> SMTPUTF8").requiretls);
        assert_eq!(codes("MAIL FROM:<a@b.example> REQUIRETLS=yes"), SYNTAX);
        assert_eq!(codes("MAIL FROM:<a@b.example> REQUIRETLS REQUIRETLS"), SYNTAX);
    }

    #[test]
    fn notify_is_never_alone_or_a_list() {
        assert_eq!(rcpt_params_of("RCPT TO:<a@b> NOTIFY=never"), [("NOTIFY", some("NEVER"))]);
        assert_eq!(
            rcpt_params_of("RCPT TO:<a@b> NOTIFY=success,Failure,DELAY"),
            [("NOTIFY", some("SUCCESS,FAILURE,DELAY"))]
        );
        assert_eq!(rcpt_params_of("RCPT TO:<a@b> NOTIFY=DELAY"), [("NOTIFY", some("DELAY"))]);
        for value in [
            "NOTIFY",
            "NOTIFY=",
            "NOTIFY=NEVER,SUCCESS",
            "NOTIFY=SUCCESS,NEVER",
            "NOTIFY=SUCCESS,,DELAY",
            "NOTIFY=SUCCESS,",
            "NOTIFY=SUCCESS,SUCCESS",
            "NOTIFY=ALWAYS",
        ] {
            assert_eq!(codes(&format!("RCPT TO:<a@b> {value}")), SYNTAX, "{value}");
        }
    }

    #[test]
    fn orcpt_is_an_address_type_and_xtext() {
        assert_eq!(
            rcpt_params_of("RCPT TO:<a@b> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u+2Bx@example.com"),
            [("NOTIFY", some("SUCCESS,FAILURE")), ("ORCPT", some("rfc822;u+x@example.com"))]
        );
        assert_eq!(rcpt_params_of("RCPT TO:<postmaster> ORCPT=utf-8;j+C3+B6rg@b"), [("ORCPT", some("utf-8;jörg@b"))]);
        let longest = format!("rfc822;{}", "o".repeat(493));
        assert_eq!(rcpt_params_of(&format!("RCPT TO:<a@b> ORCPT={longest}")), [("ORCPT", some(&longest))]);
        for value in [
            "ORCPT",
            "ORCPT=",
            "ORCPT=rfc822",
            "ORCPT=;a@b",
            "ORCPT=rfc822;",
            "ORCPT=rfc 822;a@b",
            "ORCPT=rfc(822);a@b",
            "ORCPT=rfc822;a+b",
            "ORCPT=rfc822;+0A",
        ] {
            assert_eq!(codes(&format!("RCPT TO:<a@b> {value}")), SYNTAX, "{value}");
        }
        assert_eq!(codes(&format!("RCPT TO:<a@b> ORCPT={longest}o")), SYNTAX);
    }

    #[test]
    fn rcpt_params_may_not_repeat() {
        assert_eq!(
            reply_to(b"RCPT TO:<a@b> NOTIFY=NEVER notify=NEVER"),
            (501, "5.5.4", "duplicate RCPT parameter notify".into())
        );
        assert_eq!(codes("RCPT TO:<a@b> ORCPT=rfc822;a ORCPT=rfc822;a"), SYNTAX);
    }

    #[test]
    fn every_mail_parameter_at_once() {
        let given = params(
            "MAIL FROM:<a@b.example> SIZE=10 BODY=8BITMIME SMTPUTF8 REQUIRETLS RET=FULL ENVID=x AUTH=a@b.example",
        );
        assert_eq!(
            listed(&given.all),
            [
                ("SIZE", some("10")),
                ("BODY", some("8BITMIME")),
                ("SMTPUTF8", None),
                ("REQUIRETLS", None),
                ("RET", some("FULL")),
                ("ENVID", some("x")),
                ("AUTH", some("a@b.example")),
            ]
        );
        assert!(given.smtputf8 && given.requiretls);
        assert_eq!(given.all.get("ENVID"), Some(Some("x")));
        assert_eq!(given.all.get("SMTPUTF8"), Some(None));
        assert_eq!(given.all.get("NOTIFY"), None);
    }

    #[test]
    fn expn_etrn_and_turn_are_not_implemented() {
        for line in ["EXPN staff", "etrn example.com", "TURN", "EXPN"] {
            assert_eq!(reply_to(line.as_bytes()), (502, "5.5.1", "command not implemented".into()), "{line}");
        }
    }

    #[test]
    fn source_route_is_ignored() {
        assert_eq!(recipient("RCPT TO:<@a,@b:u@c>"), mailbox("u", "c"));
        assert_eq!(sender("MAIL FROM:<@a.example,@b.example:user@c.example>"), mailbox("user", "c.example"));
        assert_eq!(sender("MAIL FROM:<@a.example:user@c.example>"), mailbox("user", "c.example"));
    }

    #[test]
    fn malformed_source_routes_are_rejected() {
        for path in ["<@a>", "<@a:>", "<@:u@c>", "<@a,u@c>", "<@a,:u@c>", "<@-a:u@c>", "<@a;u@c>"] {
            assert_eq!(codes(&format!("RCPT TO:{path}")), BAD_RECIPIENT, "{path}");
        }
    }

    #[test]
    fn dot_string_local_parts() {
        assert_eq!(sender("MAIL FROM:<first.last@b.example>").local_part, "first.last");
        let every_atext = "!#$%&'*+-/=?^_`{|}~Az09";
        assert_eq!(sender(&format!("MAIL FROM:<{every_atext}@b.example>")).local_part, every_atext);
        for local_part in [".a", "a.", "a..b", "a(b", "a,b", "a\\b"] {
            assert_eq!(codes(&format!("MAIL FROM:<{local_part}@b.example>")), BAD_SENDER, "{local_part}");
        }
    }

    #[test]
    fn quoted_local_parts_are_unquoted_and_unescaped() {
        assert_eq!(sender("MAIL FROM:<\"a b\"@x.example>"), mailbox("a b", "x.example"));
        assert_eq!(sender(r#"MAIL FROM:<"a\"b\\c"@x.example>"#).local_part, r#"a"b\c"#);
        assert_eq!(sender(r#"MAIL FROM:<"\a>b"@x.example>"#).local_part, "a>b");
        assert_eq!(sender("MAIL FROM:<\"\"@x.example>").local_part, "");
        assert_eq!(sender("MAIL FROM:<\"jörg\"@x.example>").local_part, "jörg");
    }

    #[test]
    fn malformed_quoted_local_parts_are_rejected() {
        for local_part in [r#""a"#, r#""a\"#, r#""a\"@x.example"#, r#""a"b"#, "\"a\"\"b\""] {
            assert_eq!(codes(&format!("MAIL FROM:<{local_part}@x.example>")), BAD_SENDER, "{local_part}");
        }
        assert_eq!(codes("MAIL FROM:<\"a\\é\"@x.example>"), BAD_SENDER);
    }

    #[test]
    fn display_quotes_only_when_needed() {
        assert_eq!(sender("MAIL FROM:<\"a b\"@x.example>").to_string(), "\"a b\"@x.example");
        assert_eq!(sender("MAIL FROM:<a.b@x>").to_string(), "a.b@x");
        assert_eq!(sender("MAIL FROM:<\"ab\"@x>").to_string(), "ab@x");
        assert_eq!(sender("MAIL FROM:<\"a..b\"@x>").to_string(), "\"a..b\"@x");
        assert_eq!(mailbox(r#"a"b\c"#, "x").to_string(), r#""a\"b\\c"@x"#);
        assert_eq!(mailbox("", "x").to_string(), "\"\"@x");
        assert_eq!(recipient("RCPT TO:<Postmaster>").to_string(), "Postmaster");
    }

    #[test]
    fn display_round_trips_through_the_parser() {
        for address in ["\"a b\"@x.example", "a.b@x", r#""a\"b\\c"@x"#, "jörg@bücher.example", "u@[IPv6:::1]"] {
            let parsed = sender(&format!("MAIL FROM:<{address}>"));
            assert_eq!(parsed.to_string(), address);
            assert_eq!(sender(&format!("MAIL FROM:<{parsed}>")), parsed);
        }
    }

    #[test]
    fn address_literals() {
        assert_eq!(sender("MAIL FROM:<a@[127.0.0.1]>").domain, "[127.0.0.1]");
        assert_eq!(sender("MAIL FROM:<a@[IPv6:::1]>").domain, "[IPv6:::1]");
        assert_eq!(sender("MAIL FROM:<a@[ipv6:2001:db8::1]>").domain, "[ipv6:2001:db8::1]");
        assert_eq!(sender("MAIL FROM:<a@[IPv6:::ffff:192.0.2.1]>").domain, "[IPv6:::ffff:192.0.2.1]");
    }

    #[test]
    fn bad_address_literals_are_rejected() {
        for literal in
            ["[999.1.1.1]", "[1.2.3]", "[::1]", "[IPv6:1.2.3.4]", "[IPv6:zz::1]", "[x-tag:foo]", "[127.0.0.1", "[]"]
        {
            assert_eq!(codes(&format!("MAIL FROM:<a@{literal}>")), BAD_SENDER, "{literal}");
        }
    }

    #[test]
    fn utf8_addresses_are_accepted() {
        let address = sender("MAIL FROM:<jörg@bücher.example>");
        assert_eq!(address, mailbox("jörg", "bücher.example"));
        assert!(!address.is_ascii());
        assert!(!mailbox("a", "bücher.example").is_ascii());
        assert!(mailbox("a", "b.example").is_ascii());
    }

    #[test]
    fn domain_labels_are_validated() {
        let longest_label = "a".repeat(63);
        assert_eq!(
            sender(&format!("MAIL FROM:<a@{longest_label}.example>")).domain,
            format!("{longest_label}.example")
        );
        assert_eq!(sender("MAIL FROM:<a@x-1.B2.example>").domain, "x-1.B2.example");
        let too_long_label = "a".repeat(64);
        for domain in [
            "-a.example",
            "a-.example",
            "a.-b.example",
            "a..example",
            ".a.example",
            "a.example.",
            "a_b.example",
            too_long_label.as_str(),
        ] {
            assert_eq!(codes(&format!("MAIL FROM:<a@{domain}>")), BAD_SENDER, "{domain}");
        }
    }

    #[test]
    fn domain_is_at_most_255_octets() {
        let label = "a".repeat(63);
        let longest = format!("{label}.{label}.{label}.{}", "a".repeat(63));
        assert_eq!(longest.len(), 255);
        assert_eq!(sender(&format!("MAIL FROM:<a@{longest}>")).domain, longest);
        let one_too_long = format!("{label}.{label}.{label}.{}.a", "a".repeat(62));
        assert_eq!(one_too_long.len(), 256);
        assert_eq!(codes(&format!("MAIL FROM:<a@{one_too_long}>")), BAD_SENDER);
        assert_eq!(codes(&format!("MAIL FROM:<a@b.{longest}>")), BAD_SENDER);
    }

    #[test]
    fn a_recipient_is_held_to_rfc_5321_lengths_as_sent() {
        let local = "l".repeat(64);
        // `<` + 64 + `@` + 189 + `>` = 256 octets: the longest path.
        let domain = format!("{}.{}.{}", "d".repeat(63), "d".repeat(63), "d".repeat(61));
        assert_eq!(format!("<{local}@{domain}>").len(), MAX_PATH_LEN);
        assert_eq!(recipient(&format!("RCPT TO:<{local}@{domain}> NOTIFY=NEVER")).local_part, local);
        let too_long = (501, "5.1.3", ParseError::recipient_too_long().text.into_owned());
        assert_eq!(reply_to(format!("RCPT TO:<{local}@{domain}x>").as_bytes()), too_long, "path 257");
        assert_eq!(reply_to(format!("RCPT TO:<{local}x@b.example>").as_bytes()), too_long, "local part 65");
        // Quotes count: 62 octets inside them make 64.
        let quoted = format!("\"{}\"", "q".repeat(62));
        assert_eq!(recipient(&format!("RCPT TO:<{quoted}@b.example>")).local_part, "q".repeat(62));
        let quoted = format!("\"{}\\\"\"", "q".repeat(61));
        assert_eq!(reply_to(format!("RCPT TO:<{quoted}@b.example>").as_bytes()), too_long, "an escape counts");
        // A source route counts in the path.
        let route = format!("@{0}.{0},@{0}:", "r".repeat(63));
        let path = format!("<{route}{local}@{}>", "d".repeat(63));
        assert!(path.len() > MAX_PATH_LEN);
        assert_eq!(reply_to(format!("RCPT TO:{path}").as_bytes()), too_long);
        // What the issue's attack sent: 986-octet addresses.
        let attack = format!("RCPT TO:<{}@b.example>", "a".repeat(976));
        assert_eq!(reply_to(attack.as_bytes()), too_long);
        // The sender is not held to them (VERP, SRS).
        let verp = format!("bounces-{}={}", "x".repeat(60), "example.com");
        assert_eq!(sender(&format!("MAIL FROM:<{verp}@{domain}>")).local_part, verp);
        assert_eq!(recipient("RCPT TO:<Postmaster>").local_part, "Postmaster");
    }

    #[test]
    fn parse_error_display_has_codes_and_text() {
        let error = parse_command(b"DATA now").unwrap_err();
        assert_eq!(error.to_string(), "501 5.5.4 syntax: DATA takes no arguments");
        assert_eq!(codes("FOO"), UNRECOGNIZED);
    }

    #[test]
    fn commands_that_end_a_pipelining_group() {
        let ending = ["EHLO x", "HELO x", "LHLO x", "DATA", "NOOP", "VRFY x"];
        let not_ending =
            ["MAIL FROM:<a@b.example>", "RCPT TO:<a@b.example>", "RSET", "QUIT", "STARTTLS", "BDAT 5", "BDAT 0 LAST"];
        for line in ending {
            assert!(parse_command(line.as_bytes()).unwrap().ends_pipelining_group(), "{line}");
        }
        for line in not_ending {
            assert!(!parse_command(line.as_bytes()).unwrap().ends_pipelining_group(), "{line}");
        }
    }

    #[test]
    fn http_requests_are_recognised() {
        for line in
            ["GET / HTTP/1.1", "post /x HTTP/1.0", "CONNECT mx:25 HTTP/1.1", "Host: example.com", "User-Agent: x"]
        {
            assert!(is_http_request(line.as_bytes()), "{line}");
        }
        for line in ["EHLO GET", "GET", "HELO host:x", "NOOP"] {
            assert!(!is_http_request(line.as_bytes()), "{line}");
        }
    }
}
