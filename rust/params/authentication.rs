//! `authentication`: which message authentication methods run at reception
//! (SPF, DKIM, DMARC, ARC, iprev), and whether each only annotates or also
//! refuses. One table merged field by field, so that each `via` (each
//! virtual MTA) can have its own rules.

use super::parse::{expected, key_path, unknown_key, Errors};
use serde_json::Value;

/// What one method does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthMode {
    /// Not checked.
    #[default]
    Off,
    /// Checked: the result goes into `Authentication-Results:` and the
    /// metadata, and never refuses a message.
    Annotate,
    /// Checked and annotated, and a failure refuses the command or the message.
    Enforce,
}

impl AuthMode {
    pub const NAMES: [&str; 3] = ["off", "annotate", "enforce"];

    pub fn is_on(self) -> bool {
        self != AuthMode::Off
    }

    pub fn enforces(self) -> bool {
        self == AuthMode::Enforce
    }
}

fn auth_mode(value: &Value) -> Result<AuthMode, String> {
    let wanted = || format!("one of {}", AuthMode::NAMES.map(|name| format!("{name:?}")).join(", "));
    match value.as_str() {
        Some("off") => Ok(AuthMode::Off),
        Some("annotate") => Ok(AuthMode::Annotate),
        Some("enforce") => Ok(AuthMode::Enforce),
        _ => Err(expected(&wanted(), value)),
    }
}

field_table! {
    /// The methods checked on a connection's messages, each `off`,
    /// `annotate` or `enforce` (docs/operations/authentication.md).
    Authentication, AuthenticationLayer, authentication, "{spf = \"enforce\", dkim = \"annotate\"}" {
        /// The HELO identity at EHLO, the MAIL FROM identity at MAIL FROM (RFC 7208).
        spf: AuthMode = AuthMode::Off, auth_mode;
        /// Each DKIM signature (RFC 6376), at the end of the data.
        dkim: AuthMode = AuthMode::Off, auth_mode;
        /// The From domain's policy (RFC 7489), from the SPF and DKIM results.
        dmarc: AuthMode = AuthMode::Off, auth_mode;
        /// The ARC chain (RFC 8617).
        arc: AuthMode = AuthMode::Off, auth_mode;
        /// The client address's reverse name, confirmed forward (RFC 8601 §3).
        iprev: AuthMode = AuthMode::Off, auth_mode;
    }
}

impl Authentication {
    /// Some method is checked.
    pub fn any(&self) -> bool {
        [self.spf, self.dkim, self.dmarc, self.arc, self.iprev].into_iter().any(AuthMode::is_on)
    }

    /// Some method runs once the message's data is in.
    pub fn checks_message(&self) -> bool {
        self.dkim.is_on() || self.dmarc.is_on() || self.arc.is_on()
    }
}
