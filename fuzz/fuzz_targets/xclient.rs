//! XCLIENT on arbitrary UTF-8: `parse_xclient` and `decode_xtext` never
//! panic; what they accept holds no control characters and their error
//! texts are fit to echo in a reply. Any string, xtext-encoded by the tiny
//! encoder below, decodes back to itself, and as a NAME/HELO/LOGIN value
//! comes back from `parse_xclient` as it was (or is refused for the reasons
//! the parser documents: empty, over 255 characters encoded, control
//! characters).

#![no_main]

use kumo_listener::protocol::xclient::{parse_xclient, XClientError, XClientRequest};
use kumo_listener::protocol::xtext::decode_xtext;
use libfuzzer_sys::fuzz_target;

const MAX_VALUE_LEN: usize = 255;

fuzz_target!(|text: &str| {
    match parse_xclient(text) {
        Ok(request) => check_request(&request),
        Err(error) => check_error(&error),
    }
    match decode_xtext(text) {
        Ok(decoded) => {
            assert!(text.bytes().all(|byte| (b'!'..=b'~').contains(&byte) && byte != b'='), "accepted {text:?}");
            assert_eq!(decode_xtext(&encode(&decoded)).as_deref(), Ok(decoded.as_str()));
        }
        Err(reason) => check_error_text(reason),
    }

    let encoded = encode(text);
    assert!(encoded.bytes().all(|byte| (b'!'..=b'~').contains(&byte) && byte != b'='), "encoded {encoded:?}");
    assert_eq!(decode_xtext(&encoded).as_deref(), Ok(text), "encoded as {encoded:?}");

    for attribute in ["NAME", "helo", "Login"] {
        let line = format!("{attribute}={encoded}");
        let parsed = parse_xclient(&line);
        let refused = text.is_empty() || encoded.len() > MAX_VALUE_LEN || text.chars().any(char::is_control);
        if refused {
            assert!(parsed.is_err(), "{line:?} accepted as {parsed:?}");
            continue;
        }
        let request = parsed.unwrap_or_else(|error| panic!("{line:?} refused: {error:?}"));
        let value = match attribute {
            "NAME" => &request.name,
            "helo" => &request.helo,
            _ => &request.login,
        };
        let unknown = ["[UNAVAILABLE]", "[TEMPUNAVAIL]"].iter().any(|word| word.eq_ignore_ascii_case(text));
        let expected = if unknown { None } else { Some(text) };
        assert_eq!(value.as_deref(), expected, "{line:?}");
    }
});

/// RFC 3461 xtext: printable ASCII but `+` and `=` as itself, every other byte as `+XX`.
fn encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (b'!'..=b'~').contains(&byte) && byte != b'+' && byte != b'=' {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("+{byte:02X}"));
        }
    }
    encoded
}

fn check_request(request: &XClientRequest) {
    for text in [&request.helo, &request.name, &request.login].into_iter().flatten() {
        assert!(!text.is_empty() && !text.chars().any(char::is_control), "{request:?}");
    }
    if let Some(proto) = &request.proto {
        assert!(proto == "SMTP" || proto == "ESMTP", "{request:?}");
    }
    for address in [request.addr, request.destaddr].into_iter().flatten() {
        assert_eq!(address, address.to_canonical(), "IPv4-mapped address in {request:?}");
    }
}

fn check_error(XClientError(text): &XClientError) {
    check_error_text(text);
}

fn check_error_text(text: &str) {
    assert!(!text.is_empty() && !text.chars().any(char::is_control), "error text {text:?}");
}
