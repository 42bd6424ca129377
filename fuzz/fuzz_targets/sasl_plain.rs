//! SASL PLAIN on arbitrary UTF-8: `decode_plain` never panics; what it
//! accepts has a non-empty authc and no NUL in any field, and encodes back
//! to a response that decodes to the same credentials. Any (authz, authc,
//! password) without NUL, taken from the input split at NULs, round-trips
//! through base64 of `authz NUL authc NUL password` (with or without
//! trailing whitespace); an empty authc is refused as Malformed.
//!
//! AUTH LOGIN's fields on the same input: `decode_login_username` and
//! `decode_login_password` never panic; what they accept has no NUL (and a
//! user name is not empty) and encodes back to itself; any text without NUL
//! round-trips through base64; `*` cancels.

#![no_main]

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use kumo_listener::protocol::sasl::{decode_login_password, decode_login_username, decode_plain, PlainCredentials, PlainError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match decode_plain(text) {
        Ok(credentials) => {
            let PlainCredentials { authz, authc, password } = &credentials;
            assert!(!authc.is_empty(), "{credentials:?}");
            assert!(![authz, authc, password].iter().any(|field| field.contains('\0')), "{credentials:?}");
            assert_eq!(decode_plain(&encode(authz, authc, password)), Ok(credentials.clone()));
        }
        Err(error) => {
            let kumo_listener::protocol::reply::Reply { code, enhanced, text: reply } = error.reply();
            let enhanced = enhanced.unwrap_or_default();
            assert_eq!(code, 501);
            assert!(enhanced.starts_with("5.") && !reply.is_empty());
            if error == PlainError::Cancelled {
                assert_eq!(text.trim_end(), "*");
            }
        }
    }

    let mut fields = text.split('\0');
    let authz = fields.next().unwrap_or_default();
    let authc = fields.next().unwrap_or("user");
    let password = fields.next().unwrap_or_default();
    let expected = if authc.is_empty() {
        Err(PlainError::Malformed)
    } else {
        Ok(PlainCredentials { authz: authz.into(), authc: authc.into(), password: password.into() })
    };
    let response = encode(authz, authc, password);
    assert_eq!(decode_plain(&response), expected, "{response:?}");
    assert_eq!(decode_plain(&format!("{response} \t\r\n")), expected, "{response:?} with trailing whitespace");

    check_login(text);
});

fn check_login(text: &str) {
    for (decoded, is_username) in [(decode_login_username(text), true), (decode_login_password(text), false)] {
        match decoded {
            Ok(field) => {
                assert!(!field.contains('\0') && !(is_username && field.is_empty()), "{field:?} from {text:?}");
                if !field.is_empty() {
                    assert_eq!(decode_login_password(&BASE64.encode(&field)), Ok(field.clone()));
                }
            }
            Err(error) => {
                assert_eq!(error.reply().code, 501);
                assert_ne!(error, PlainError::Malformed, "LOGIN has its own malformed reply");
                if error == PlainError::Cancelled {
                    assert_eq!(text.trim_end(), "*");
                }
            }
        }
    }
    let field = text.split('\0').next().unwrap_or_default();
    let encoded = BASE64.encode(field);
    let expected = if field.is_empty() { Err(PlainError::MalformedLogin) } else { Ok(field.to_owned()) };
    assert_eq!(decode_login_username(&encoded), expected, "{encoded:?}");
    assert_eq!(decode_login_password(&format!("{encoded}\r\n")), Ok(field.to_owned()), "{encoded:?}");
}

fn encode(authz: &str, authc: &str, password: &str) -> String {
    BASE64.encode(format!("{authz}\0{authc}\0{password}"))
}
