//! Client text made safe to show: in the text log lines, where no value may
//! pass for another field, and in trace headers, where no character may hide
//! or reorder what a reader sees. Pure: no I/O, nothing from the rest of the
//! crate. Nothing is allocated for text that needs no escaping.

use std::fmt::{self, Write as _};

/// Format characters (Unicode `Cf`: U+200B zero width space, U+202E
/// right-to-left override, U+2066 left-to-right isolate, U+FEFF…), and the
/// line and paragraph separators (`Zl` U+2028, `Zp` U+2029), as of Unicode 15.
const FORMAT_OR_SEPARATOR: [(u32, u32); 21] = [
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x2028, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
];

/// A character that shows as nothing, or moves or breaks the text around
/// it: a control (`Cc`), a format character (`Cf`), a line or paragraph
/// separator (`Zl`, `Zp`). Escaped wherever client text is shown.
pub fn is_hidden(c: char) -> bool {
    if c.is_control() {
        return true;
    }
    let code = u32::from(c);
    code >= 0xAD && FORMAT_OR_SEPARATOR.iter().any(|&(first, last)| (first..=last).contains(&code))
}

/// How a character is written inside a quoted log value: `\"`, `\\`,
/// `\x3d` for `=` (so that no `name=` can appear in one), `\xNN` for an ASCII
/// control, `\u{…}` for a hidden character or any other white space.
fn write_quoted_char(out: &mut impl fmt::Write, c: char) -> fmt::Result {
    match c {
        '"' => out.write_str("\\\""),
        '\\' => out.write_str("\\\\"),
        '=' => out.write_str("\\x3d"),
        c if c.is_ascii_control() => write!(out, "\\x{:02x}", u32::from(c)),
        ' ' => out.write_char(' '),
        c if is_hidden(c) || c.is_whitespace() => write!(out, "\\u{{{:x}}}", u32::from(c)),
        c => out.write_char(c),
    }
}

fn write_quoted(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    out.write_char('"')?;
    for c in text.chars() {
        write_quoted_char(out, c)?;
    }
    out.write_char('"')
}

/// Non-ASCII text may stay bare unless it holds a hidden character or white space.
fn is_plain_non_ascii(c: char) -> bool {
    !c.is_ascii() && !is_hidden(c) && !c.is_whitespace()
}

/// Whether a log value may be written bare: printable, without space, `"`,
/// `\`, `<`, `>` or `=`.
pub fn value_is_plain(text: &str) -> bool {
    let plain_byte = |byte: u8| byte.is_ascii_graphic() && !matches!(byte, b'"' | b'\\' | b'<' | b'>' | b'=');
    if text.bytes().all(plain_byte) {
        return true;
    }
    text.chars().all(|c| if c.is_ascii() { plain_byte(c as u8) } else { is_plain_non_ascii(c) })
}

/// Whether free text (a reply's) may be written bare: printable, spaces
/// allowed, without `"`, `\`, `=` or `;`.
pub fn text_is_plain(text: &str) -> bool {
    let plain_byte =
        |byte: u8| (byte == b' ' || byte.is_ascii_graphic()) && !matches!(byte, b'"' | b'\\' | b'=' | b';');
    if text.bytes().all(plain_byte) {
        return true;
    }
    text.chars().all(|c| if c.is_ascii() { plain_byte(c as u8) } else { is_plain_non_ascii(c) })
}

/// A value in a text log line (`helo=VALUE`): as it is when
/// [`value_is_plain`], else a double-quoted string (see [`write_quoted_char`]).
pub struct LogValue<'a>(pub &'a str);

impl fmt::Display for LogValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if value_is_plain(self.0) {
            f.write_str(self.0)
        } else {
            write_quoted(f, self.0)
        }
    }
}

/// An address in a text log line: `<VALUE>` when the address is plain,
/// else the double-quoted string alone.
pub struct LogAddress<'a>(pub &'a str);

impl fmt::Display for LogAddress<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if value_is_plain(self.0) {
            write!(f, "<{}>", self.0)
        } else {
            write_quoted(f, self.0)
        }
    }
}

/// The free text of a log line (a reply's): as it is when [`text_is_plain`],
/// else a double-quoted string.
pub struct LogText<'a>(pub &'a str);

impl fmt::Display for LogText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if text_is_plain(self.0) {
            f.write_str(self.0)
        } else {
            write_quoted(f, self.0)
        }
    }
}

/// Escape the hidden characters of `out[from..]` as `\u{…}`, in place (a
/// copy only when there is one): text for a header.
pub fn escape_hidden_from(out: &mut String, from: usize) {
    if !out[from..].chars().any(is_hidden) {
        return;
    }
    let tail = out.split_off(from);
    for c in tail.chars() {
        if is_hidden(c) {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
}

/// Cut `out` to at most `len` octets, at a character boundary that is not
/// inside a `\u{…}` escape written by [`escape_hidden_from`] after `from`.
pub fn truncate_escaped(out: &mut String, from: usize, len: usize) {
    if out.len() <= len {
        return;
    }
    let mut end = len;
    while !out.is_char_boundary(end) {
        end -= 1;
    }
    // An escape cut in two: drop what was written of it.
    if let Some(start) = out[from..end].rfind("\\u{") {
        if !out[from + start..end].contains('}') {
            end = from + start;
        }
    }
    out.truncate(end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_characters_are_controls_format_characters_and_separators() {
        for c in ['\0', '\t', '\u{7f}', '\u{85}', '\u{ad}', '\u{200b}', '\u{200e}', '\u{2028}', '\u{2029}', '\u{202e}']
        {
            assert!(is_hidden(c), "{c:?}");
        }
        for c in ['\u{2066}', '\u{2069}', '\u{feff}', '\u{e0001}', '\u{e007f}', '\u{1343f}'] {
            assert!(is_hidden(c), "{c:?}");
        }
        for c in ['a', ' ', 'é', '\u{a0}', '\u{2027}', '\u{202f}', '\u{2070}', '漢', '😀'] {
            assert!(!is_hidden(c), "{c:?}");
        }
    }

    #[test]
    fn plain_values_are_bare_others_quoted() {
        let shown = |text: &str| LogValue(text).to_string();
        assert_eq!(shown("client.example"), "client.example");
        assert_eq!(shown("müller.example"), "müller.example");
        assert_eq!(shown(""), "");
        assert_eq!(shown("a b"), "\"a b\"");
        assert_eq!(shown("a=b"), "\"a\\x3db\"");
        assert_eq!(shown("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(shown("<x>"), "\"<x>\"");
        assert_eq!(shown("a\tb\u{7f}"), "\"a\\x09b\\x7f\"");
        assert_eq!(shown("a\u{2028}b\u{202e}c\u{a0}d\u{3000}"), "\"a\\u{2028}b\\u{202e}c\\u{a0}d\\u{3000}\"");
    }

    #[test]
    fn addresses_keep_their_brackets_unless_quoted() {
        assert_eq!(LogAddress("a@b.example").to_string(), "<a@b.example>");
        assert_eq!(LogAddress("").to_string(), "<>");
        let forged = "\"a> to=<victim@example.com> size=1 client=203.0.113.66:1 x\"@b.example";
        assert_eq!(
            LogAddress(forged).to_string(),
            "\"\\\"a> to\\x3d<victim@example.com> size\\x3d1 client\\x3d203.0.113.66:1 x\\\"@b.example\""
        );
    }

    #[test]
    fn free_text_keeps_its_spaces() {
        assert_eq!(LogText("relaying not permitted").to_string(), "relaying not permitted");
        assert_eq!(LogText("<a@b>: no such user").to_string(), "<a@b>: no such user");
        assert_eq!(LogText("x; helo=evil").to_string(), "\"x; helo\\x3devil\"");
        assert_eq!(LogText("line\u{2028}two").to_string(), "\"line\\u{2028}two\"");
    }

    #[test]
    fn headers_get_hidden_characters_escaped_and_cut_outside_escapes() {
        let mut out = String::from("from a\u{202e}b\u{200b}");
        escape_hidden_from(&mut out, 5);
        assert_eq!(out, "from a\\u{202e}b\\u{200b}");
        let mut plain = String::from("from ok");
        escape_hidden_from(&mut plain, 0);
        assert_eq!(plain, "from ok");
        let mut cut = out.clone();
        truncate_escaped(&mut cut, 5, 10);
        assert_eq!(cut, "from a");
        let mut cut = String::from("ab\u{e9}");
        truncate_escaped(&mut cut, 0, 3);
        assert_eq!(cut, "ab");
    }
}
