//! SMTP replies: the one type every refusal and answer is made of, and its
//! formatting. Pure: no I/O.
//!
//! Reply text can come from configuration or from Python policy, so it is
//! sanitised here: whatever it contains, every line written matches
//! `^\d{3}[ -]` and ends in CRLF.

use std::borrow::Cow;

/// A reply: code, RFC 3463 enhanced status code, text (`\n` separates lines).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Written only to clients that said EHLO, unless the reply closes the connection.
    pub enhanced: Option<Cow<'static, str>>,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub const fn new(code: u16, enhanced: &'static str, text: &'static str) -> Self {
        Self { code, enhanced: Some(Cow::Borrowed(enhanced)), text: Cow::Borrowed(text) }
    }

    pub fn with_text(code: u16, enhanced: &'static str, text: impl Into<Cow<'static, str>>) -> Self {
        Self { code, enhanced: Some(Cow::Borrowed(enhanced)), text: text.into() }
    }

    /// A reply that never carries an enhanced code (greeting, EHLO, 354, 334).
    pub fn bare(code: u16, text: impl Into<Cow<'static, str>>) -> Self {
        Self { code, enhanced: None, text: text.into() }
    }

    /// What a policy `Reject(code, text)` says: an enhanced code at the start
    /// of `text` is used when its class matches `code`, else the generic one.
    pub fn from_policy(code: u16, text: &str) -> Self {
        let (enhanced, text) = split_enhanced(code, text);
        let enhanced = enhanced.unwrap_or_else(|| generic_enhanced(code));
        Self { code, enhanced: Some(Cow::Owned(enhanced.to_owned())), text: Cow::Owned(text.to_owned()) }
    }

    /// Whether the connection should close after it (RFC 5321 §3.8).
    pub fn closes(&self) -> bool {
        self.code == 421
    }

    /// Append it to `out`; the enhanced code only `with_enhanced`.
    pub fn write(&self, out: &mut Vec<u8>, with_enhanced: bool) {
        let enhanced = self.enhanced.as_deref().filter(|_| with_enhanced);
        write_reply(out, self.code, enhanced, &self.text);
    }
}

/// Append one (possibly multi-line) reply to `out`.
///
/// `enhanced` is the RFC 3463 status code (`"5.5.2"`), written only when the
/// client asked for it with EHLO. Each `\n` in `text` starts a new reply line.
pub fn write_reply(out: &mut Vec<u8>, code: u16, enhanced: Option<&str>, text: &str) {
    let code = clamp_code(code);
    let mut lines = text.split('\n').peekable();
    while let Some(line) = lines.next() {
        let separator = if lines.peek().is_some() { b'-' } else { b' ' };
        out.extend_from_slice(code.to_string().as_bytes());
        out.push(separator);
        if let Some(enhanced) = enhanced {
            out.extend_from_slice(enhanced.as_bytes());
            out.push(b' ');
        }
        push_printable(out, line);
        out.extend_from_slice(b"\r\n");
    }
}

/// Split policy text like `"5.7.1 go away"` into its enhanced code and the rest.
/// Returns `None` for the code when the text does not start with one whose
/// class matches the reply code.
pub fn split_enhanced(code: u16, text: &str) -> (Option<&str>, &str) {
    let (head, rest) = text.split_once(' ').unwrap_or((text, ""));
    if is_enhanced_code(head) && head.as_bytes()[0] == reply_class(code) {
        (Some(head), rest)
    } else {
        (None, text)
    }
}

/// The generic enhanced code for a reply class: `2.0.0`, `4.0.0`, `5.0.0`.
pub fn generic_enhanced(code: u16) -> &'static str {
    match reply_class(code) {
        b'2' => "2.0.0",
        b'4' => "4.0.0",
        _ => "5.0.0",
    }
}

/// The class digit of the code as written (see [`clamp_code`]).
pub fn reply_class(code: u16) -> u8 {
    b'0' + (clamp_code(code) / 100) as u8
}

pub fn is_enhanced_code(s: &str) -> bool {
    let mut parts = s.split('.');
    let class_ok = matches!(parts.next(), Some("2" | "4" | "5"));
    let rest: Vec<&str> = parts.collect();
    class_ok
        && rest.len() == 2
        && rest.iter().all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

fn clamp_code(code: u16) -> u16 {
    if (200..=599).contains(&code) {
        code
    } else {
        451
    }
}

fn push_printable(out: &mut Vec<u8>, line: &str) {
    for ch in line.chars() {
        if ch.is_control() {
            out.push(b' ');
        } else {
            let mut buf = [0u8; 4];
            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(code: u16, enhanced: Option<&str>, text: &str) -> String {
        let mut out = Vec::new();
        write_reply(&mut out, code, enhanced, text);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn single_line_with_and_without_enhanced_code() {
        assert_eq!(render(250, Some("2.0.0"), "OK"), "250 2.0.0 OK\r\n");
        assert_eq!(render(250, None, "OK"), "250 OK\r\n");
    }

    #[test]
    fn multi_line_uses_dashes_until_the_last_line() {
        assert_eq!(render(220, None, "mx.example\nwelcome"), "220-mx.example\r\n220 welcome\r\n");
    }

    #[test]
    fn control_characters_never_break_a_reply_line() {
        let text = render(550, Some("5.7.1"), "bad\r\nSMTP 250 injected\0");
        for line in text.split_terminator("\r\n") {
            assert!(line.starts_with("550"), "{line:?}");
            assert!(!line.contains('\r') && !line.contains('\0'));
        }
    }

    #[test]
    fn out_of_range_codes_become_451() {
        assert_eq!(render(999, None, "x"), "451 x\r\n");
    }

    #[test]
    fn a_policy_reply_keeps_a_matching_enhanced_code_or_gets_the_generic_one() {
        assert_eq!(Reply::from_policy(550, "5.7.1 go away"), Reply::new(550, "5.7.1", "go away"));
        assert_eq!(Reply::from_policy(450, "5.7.1 go away"), Reply::new(450, "4.0.0", "5.7.1 go away"));
        let mut out = Vec::new();
        Reply::from_policy(421, "bye").write(&mut out, false);
        assert_eq!(out, b"421 bye\r\n");
    }

    #[test]
    fn enhanced_code_is_split_only_when_the_class_matches() {
        assert_eq!(split_enhanced(550, "5.7.1 go away"), (Some("5.7.1"), "go away"));
        assert_eq!(split_enhanced(450, "5.7.1 go away"), (None, "5.7.1 go away"));
        assert_eq!(split_enhanced(550, "go away"), (None, "go away"));
        assert_eq!(split_enhanced(550, "5.1234.1 x"), (None, "5.1234.1 x"));
    }
}
