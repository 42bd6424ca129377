//! Reply formatting on arbitrary codes and text, as the session formats a
//! policy's reply (`split_enhanced`, then `write_reply`): never panics, and
//! whatever the text holds, every line written is `^\d{3}[ -]` with the
//! code clamped to 200..=599 (451 outside) and any enhanced code of its
//! class, `-` on all lines but the last, no control characters, CRLF at the
//! end; one line per `\n` of the text.
//!
//! Input: `[code (2 bytes, little-endian), flags, text...]`.

#![no_main]

use kumo_listener::protocol::reply::{generic_enhanced, split_enhanced, write_reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&[low, high, flags], text)) = input.split_first_chunk::<3>() else { return };
    let code = u16::from_le_bytes([low, high]);
    let text = String::from_utf8_lossy(text);

    let shown = if (200..=599).contains(&code) { code } else { 451 };
    let class = b'0' + (shown / 100) as u8;
    let (enhanced, rest) = split_enhanced(code, &text);
    match enhanced {
        Some(enhanced) => {
            assert!(text.starts_with(enhanced), "{enhanced:?} split from {text:?}");
            assert!(rest.len() < text.len());
            assert_eq!(enhanced.as_bytes()[0], class, "{enhanced:?} for {code}");
        }
        None => assert_eq!(rest, text),
    }
    // RFC 3463 has classes 2, 4 and 5 only.
    if class != b'3' {
        assert_eq!(generic_enhanced(code).as_bytes()[0], class, "generic code for {code}");
    }
    let enhanced = match flags % 3 {
        0 => None,
        1 => Some(enhanced.unwrap_or_else(|| generic_enhanced(code))),
        _ => Some(generic_enhanced(code)),
    };

    let mut out = b"previous reply\r\n".to_vec();
    let before = out.len();
    write_reply(&mut out, code, enhanced, rest);
    let written = std::str::from_utf8(&out[before..]).expect("reply is not UTF-8");
    assert!(written.ends_with("\r\n"), "{written:?}");
    let lines: Vec<&str> = written.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), rest.split('\n').count(), "{written:?}");
    for (index, line) in lines.iter().enumerate() {
        let separator = if index + 1 == lines.len() { ' ' } else { '-' };
        assert!(line.starts_with(&format!("{shown}{separator}")), "line {line:?} of {written:?}");
        assert!(!line.chars().any(char::is_control), "control character in {line:?}");
        if let Some(enhanced) = enhanced {
            assert!(line[4..].starts_with(&format!("{enhanced} ")), "{line:?}");
        }
    }
});
