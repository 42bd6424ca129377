//! SASL PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login) as carried
//! by SMTP AUTH (RFC 4954). Pure logic.

use super::reply::Reply;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlainCredentials {
    /// The identity to act as; empty means the same as `authc`.
    pub authz: String,
    pub authc: String,
    pub password: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlainError {
    /// The client answered `*`.
    Cancelled,
    BadBase64,
    /// Not `authz NUL authc NUL password` in UTF-8 with a non-empty authc.
    Malformed,
    /// A LOGIN user name or password that is not UTF-8 without NUL, or an empty user name.
    MalformedLogin,
}

impl PlainError {
    pub fn reply(self) -> Reply {
        match self {
            PlainError::Cancelled => Reply::new(501, "5.0.0", "authentication cancelled"),
            PlainError::BadBase64 => Reply::new(501, "5.5.2", "cannot decode the base64 response"),
            PlainError::Malformed => Reply::new(501, "5.5.2", "malformed PLAIN response"),
            PlainError::MalformedLogin => Reply::new(501, "5.5.2", "malformed LOGIN response"),
        }
    }
}

/// Decode a client's PLAIN response: the base64 text after `AUTH PLAIN` or
/// sent after the `334` continuation (`=` stands for an empty response).
pub fn decode_plain(response: &str) -> Result<PlainCredentials, PlainError> {
    let response = response.trim_end();
    if response == "*" {
        return Err(PlainError::Cancelled);
    }
    let decoded = match response {
        "=" => Vec::new(),
        encoded => BASE64.decode(encoded).map_err(|_| PlainError::BadBase64)?,
    };
    let text = String::from_utf8(decoded).map_err(|_| PlainError::Malformed)?;
    let mut fields = text.split('\0');
    let (Some(authz), Some(authc), Some(password), None) = (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(PlainError::Malformed);
    };
    if authc.is_empty() {
        return Err(PlainError::Malformed);
    }
    Ok(PlainCredentials { authz: authz.into(), authc: authc.into(), password: password.into() })
}

/// The `334` challenge of AUTH LOGIN for the user name: base64 of `Username:`.
pub const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";
/// The `334` challenge of AUTH LOGIN for the password: base64 of `Password:`.
pub const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

/// Decode the user name of AUTH LOGIN (given after `AUTH LOGIN` or after the
/// first `334`): base64 of non-empty UTF-8 text without NUL.
pub fn decode_login_username(response: &str) -> Result<String, PlainError> {
    let username = decode_login_field(response)?;
    if username.is_empty() {
        return Err(PlainError::MalformedLogin);
    }
    Ok(username)
}

/// Decode the password of AUTH LOGIN: base64 of UTF-8 text without NUL
/// (empty allowed, as PLAIN allows it).
pub fn decode_login_password(response: &str) -> Result<String, PlainError> {
    decode_login_field(response)
}

fn decode_login_field(response: &str) -> Result<String, PlainError> {
    let response = response.trim_end();
    if response == "*" {
        return Err(PlainError::Cancelled);
    }
    let decoded = match response {
        // An empty line, or RFC 4954's `=` for an empty initial response.
        "" | "=" => Vec::new(),
        encoded => BASE64.decode(encoded).map_err(|_| PlainError::BadBase64)?,
    };
    let text = String::from_utf8(decoded).map_err(|_| PlainError::MalformedLogin)?;
    if text.contains('\0') {
        return Err(PlainError::MalformedLogin);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(raw: &[u8]) -> String {
        BASE64.encode(raw)
    }

    #[test]
    fn decodes_the_three_fields() {
        let credentials = decode_plain(&encoded(b"admin\0user\0s3cret")).unwrap();
        assert_eq!(
            credentials,
            PlainCredentials { authz: "admin".into(), authc: "user".into(), password: "s3cret".into() }
        );
        assert_eq!(decode_plain(&encoded(b"\0user\0")).unwrap().password, "");
    }

    #[test]
    fn refusals() {
        assert_eq!(decode_plain("*"), Err(PlainError::Cancelled));
        assert_eq!(decode_plain("not base64!"), Err(PlainError::BadBase64));
        assert_eq!(decode_plain("="), Err(PlainError::Malformed));
        assert_eq!(decode_plain(&encoded(b"user\0secret")), Err(PlainError::Malformed));
        assert_eq!(decode_plain(&encoded(b"a\0b\0c\0d")), Err(PlainError::Malformed));
        assert_eq!(decode_plain(&encoded(b"a\0\0secret")), Err(PlainError::Malformed));
        assert_eq!(decode_plain(&encoded(b"\0\xff\0x")), Err(PlainError::Malformed));
    }

    #[test]
    fn login_decodes_each_field() {
        assert_eq!(decode_login_username(&encoded(b"user")), Ok("user".into()));
        assert_eq!(decode_login_username(&format!("{} \r\n", encoded("jörg".as_bytes()))), Ok("jörg".into()));
        assert_eq!(decode_login_password(&encoded(b"s3cret")), Ok("s3cret".into()));
        assert_eq!(decode_login_password(""), Ok(String::new()));
        assert_eq!(decode_login_password("="), Ok(String::new()));
        assert_eq!(BASE64.decode(LOGIN_USERNAME_PROMPT).unwrap(), b"Username:");
        assert_eq!(BASE64.decode(LOGIN_PASSWORD_PROMPT).unwrap(), b"Password:");
    }

    #[test]
    fn login_refusals() {
        for decode in [decode_login_username, decode_login_password] {
            assert_eq!(decode("*"), Err(PlainError::Cancelled));
            assert_eq!(decode("* "), Err(PlainError::Cancelled));
            assert_eq!(decode("not base64!"), Err(PlainError::BadBase64));
            assert_eq!(decode(&encoded(b"a\0b")), Err(PlainError::MalformedLogin));
            assert_eq!(decode(&encoded(b"\xff")), Err(PlainError::MalformedLogin));
        }
        assert_eq!(decode_login_username("="), Err(PlainError::MalformedLogin));
        assert_eq!(decode_login_username(""), Err(PlainError::MalformedLogin));
        assert_eq!(PlainError::MalformedLogin.reply().code, 501);
        assert_eq!(PlainError::Cancelled.reply(), Reply::new(501, "5.0.0", "authentication cancelled"));
    }
}
