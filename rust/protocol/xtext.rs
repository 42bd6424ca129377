//! RFC 3461 xtext, the encoding of XCLIENT values and of the DSN
//! parameters `ENVID`, `ORCPT` and `AUTH=`. Pure logic.

/// RFC 3461 xtext: `+XX` (two UPPER-CASE hex digits) encodes a byte; other
/// chars must be printable ASCII 33..=126 except `+` and `=`. The decoded
/// bytes must be UTF-8.
pub fn decode_xtext(text: &str) -> Result<String, &'static str> {
    let mut decoded = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(byte) = bytes.next() {
        match byte {
            b'+' => {
                let escaped = upper_hex_digit(bytes.next()).zip(upper_hex_digit(bytes.next()));
                let (high, low) = escaped.ok_or("bad xtext escape (+ and two upper-case hex digits)")?;
                decoded.push((high << 4) | low);
            }
            b'=' => return Err("= must be escaped as +3D in xtext"),
            b'!'..=b'~' => decoded.push(byte),
            _ => return Err("xtext allows only printable ASCII, other bytes as +XX"),
        }
    }
    String::from_utf8(decoded).map_err(|_| "xtext does not decode to UTF-8")
}

/// Encode `text` as xtext: printable ASCII but `+` and `=` as it is, every
/// other byte as `+XX`.
pub fn encode_xtext(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if matches!(byte, b'!'..=b'~') && byte != b'+' && byte != b'=' {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("+{byte:02X}"));
        }
    }
    encoded
}

fn upper_hex_digit(byte: Option<u8>) -> Option<u8> {
    match byte? {
        digit @ b'0'..=b'9' => Some(digit - b'0'),
        letter @ b'A'..=b'F' => Some(letter - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_round_trip() {
        assert_eq!(decode_xtext("+2B"), Ok("+".into()));
        assert_eq!(decode_xtext("+3D"), Ok("=".into()));
        assert_eq!(decode_xtext("a+2Bb+3Dc+20d"), Ok("a+b=c d".into()));
        assert_eq!(decode_xtext("caf+C3+A9"), Ok("caf\u{e9}".into()));
        assert_eq!(decode_xtext(""), Ok(String::new()));
        for text in ["a+b=c d", "caf\u{e9}", "", "<a@b.example>"] {
            assert_eq!(decode_xtext(&encode_xtext(text)).as_deref(), Ok(text));
        }
        assert_eq!(encode_xtext("a+b=c d"), "a+2Bb+3Dc+20d");
    }
}
