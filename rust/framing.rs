//! Byte framing for the SMTP stream: command lines and the DATA body.
//! Pure logic: no I/O, no Python.

/// What to do with a bare CR or bare LF inside message data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LineEndings {
    /// Refuse the message (after reading it to its terminator).
    #[default]
    Deny,
    /// Keep the bytes as sent.
    Allow,
    /// Normalise every bare CR or LF to CRLF.
    Fix,
}
