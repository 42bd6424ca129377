//! Results as policy sees them (KumoMTA's `{"method", "result", "reason",
//! "props"}`) and as the `Authentication-Results:` header writes them
//! (RFC 8601); the removal of incoming headers that claim to be ours.

use crate::metrics::{AUTH_METHOD_NAMES, AUTH_RESULT_NAMES};
use serde_json::{json, Map, Value};
use std::fmt::Write as _;

/// One result of one method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthResult {
    /// `spf`, `dkim`, `dmarc`, `arc` or `iprev`.
    pub method: &'static str,
    /// RFC 8601's result words: `pass`, `fail`, `softfail`, `neutral`,
    /// `none`, `temperror`, `permerror`, `policy`.
    pub result: &'static str,
    pub reason: Option<String>,
    /// `ptype.property` → value, in the order written, e.g.
    /// `("smtp.mailfrom", "a@example.com")`.
    pub props: Vec<(&'static str, String)>,
}

/// Longest reason written: what mail-auth says of an error, or a DNS error's text.
const MAX_REASON: usize = 200;

impl AuthResult {
    pub fn new(method: &'static str, result: &'static str) -> Self {
        Self { method, result, reason: None, props: Vec::new() }
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        let mut reason: String = reason.into();
        if reason.len() > MAX_REASON {
            let mut end = MAX_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        self.reason = Some(reason);
        self
    }

    pub fn prop(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.props.push((name, value.into()));
        self
    }

    /// `(method index, result index)` for the metric.
    pub fn metric_index(&self) -> Option<(usize, usize)> {
        let method = AUTH_METHOD_NAMES.iter().position(|m| *m == self.method)?;
        let result = AUTH_RESULT_NAMES.iter().position(|r| *r == self.result)?;
        Some((method, result))
    }

    pub fn to_json(&self) -> Value {
        let props: Map<String, Value> =
            self.props.iter().map(|(name, value)| ((*name).to_owned(), Value::String(value.clone()))).collect();
        json!({"method": self.method, "result": self.result, "reason": self.reason, "props": props})
    }

    /// `method=result reason="..." ptype.property=value ...`
    fn write_resinfo(&self, out: &mut String) {
        let _ = write!(out, "{}={}", self.method, self.result);
        if let Some(reason) = &self.reason {
            out.push_str(" reason=");
            push_value(out, reason);
        }
        for (name, value) in &self.props {
            let _ = write!(out, " {name}=");
            push_value(out, value);
        }
    }
}

/// The results as JSON, for the metadata.
pub fn to_json(results: &[AuthResult]) -> Value {
    Value::Array(results.iter().map(AuthResult::to_json).collect())
}

/// `spf:pass,dkim:pass,...` for a log line.
pub fn summary(results: &[AuthResult]) -> String {
    let words: Vec<String> = results.iter().map(|result| format!("{}:{}", result.method, result.result)).collect();
    words.join(",")
}

/// The summary of results kept in metadata as [`to_json`] wrote them.
pub fn summary_of_json(value: &Value) -> Option<String> {
    let words: Vec<String> = value
        .as_array()?
        .iter()
        .filter_map(|result| Some(format!("{}:{}", result.get("method")?.as_str()?, result.get("result")?.as_str()?)))
        .collect();
    (!words.is_empty()).then(|| words.join(","))
}

/// `Authentication-Results: authserv-id;` then each result on a line of
/// its own (`none` when there are none), CRLF-terminated.
pub fn header(authserv_id: &str, results: &[AuthResult]) -> String {
    let mut out = String::with_capacity(64 + 80 * results.len());
    out.push_str("Authentication-Results: ");
    push_value(&mut out, authserv_id);
    if results.is_empty() {
        out.push_str("; none");
    }
    for result in results {
        out.push_str(";\r\n\t");
        result.write_resinfo(&mut out);
    }
    out.push_str("\r\n");
    out
}

/// A value as RFC 8601 (and RFC 2045's `value`) allows it: a token or
/// `local-part@domain` as it is, anything else as a quoted string; control
/// characters (from the client's HELO or address, or a DNS error) become `?`.
fn push_value(out: &mut String, value: &str) {
    let plain = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`{|}~@".contains(c);
    if !value.is_empty() && value.chars().all(plain) && value.matches('@').count() <= 1 {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The byte ranges of the `Authentication-Results:` fields in the header of
/// `message` whose authserv-id is `authserv_id` (ASCII case-insensitively):
/// RFC 8601 §5 has them removed, since they would claim our results.
pub fn forged_results(message: &[u8], authserv_id: &str) -> Vec<std::ops::Range<usize>> {
    let mut forged = Vec::new();
    let mut start = 0;
    while start < message.len() {
        // One field: its first line, then the lines that continue it.
        let mut end = start;
        loop {
            match memchr::memchr(b'\n', &message[end..]) {
                Some(newline) => end += newline + 1,
                None => end = message.len(),
            }
            if end >= message.len() || !matches!(message[end], b' ' | b'\t') {
                break;
            }
        }
        let field = &message[start..end];
        if field == b"\r\n" || field == b"\n" {
            break;
        }
        if let Some(value) = strip_name(field, b"authentication-results") {
            if authserv_id_of(value).is_some_and(|id| id.eq_ignore_ascii_case(authserv_id.as_bytes())) {
                forged.push(start..end);
            }
        }
        start = end;
    }
    forged
}

/// The value of `field` when it is named `name` (case-insensitively).
fn strip_name<'a>(field: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let colon = memchr::memchr(b':', field)?;
    let found = field[..colon].trim_ascii_end();
    found.eq_ignore_ascii_case(name).then(|| &field[colon + 1..])
}

/// The authserv-id a value starts with, after white space and comments.
fn authserv_id_of(value: &[u8]) -> Option<&[u8]> {
    let mut rest = value;
    loop {
        rest = rest.trim_ascii_start();
        if rest.first() != Some(&b'(') {
            break;
        }
        let mut depth = 0;
        let mut index = 0;
        while index < rest.len() {
            match rest[index] {
                b'\\' => index += 1,
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            index += 1;
        }
        rest = rest.get(index + 1..)?;
    }
    let end = rest.iter().position(|&b| b == b';' || b == b'(' || b.is_ascii_whitespace()).unwrap_or(rest.len());
    let id = &rest[..end];
    let id = id.strip_prefix(b"\"").and_then(|id| id.strip_suffix(b"\"")).unwrap_or(id);
    (!id.is_empty()).then_some(id)
}

/// `message` without `ranges` (sorted, apart).
pub fn without(message: &[u8], ranges: &[std::ops::Range<usize>]) -> Vec<u8> {
    let removed: usize = ranges.iter().map(|range| range.len()).sum();
    let mut out = Vec::with_capacity(message.len() - removed);
    let mut at = 0;
    for range in ranges {
        out.extend_from_slice(&message[at..range.start]);
        at = range.end;
    }
    out.extend_from_slice(&message[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_writes_each_result_on_its_line_quoting_what_needs_it() {
        let results = [
            AuthResult::new("spf", "pass").prop("smtp.mailfrom", "a@example.com"),
            AuthResult::new("dkim", "fail").reason("bad \"sig\"\u{7}").prop("header.d", "example.com"),
        ];
        assert_eq!(
            header("mx.example", &results),
            "Authentication-Results: mx.example;\r\n\tspf=pass smtp.mailfrom=a@example.com;\r\n\t\
             dkim=fail reason=\"bad \\\"sig\\\"?\" header.d=example.com\r\n"
        );
        assert_eq!(header("mx.example", &[]), "Authentication-Results: mx.example; none\r\n");
        assert_eq!(summary(&results), "spf:pass,dkim:fail");
        assert_eq!(summary_of_json(&to_json(&results)).unwrap(), "spf:pass,dkim:fail");
        assert_eq!(results[1].metric_index(), Some((1, 1)));
    }

    #[test]
    fn forged_results_are_found_by_authserv_id_and_removed() {
        let message = b"Received: x\r\nAuthentication-Results: (c) MX.example;\r\n spf=pass\r\n\
            Authentication-Results: other.example; spf=pass\r\nauthentication-results : \"mx.example\"; dkim=pass\r\n\
            Subject: Authentication-Results: mx.example\r\n\r\nAuthentication-Results: mx.example\r\n";
        let ranges = forged_results(message, "mx.example");
        assert_eq!(ranges.len(), 2);
        let kept = without(message, &ranges);
        assert_eq!(
            std::str::from_utf8(&kept).unwrap(),
            "Received: x\r\nAuthentication-Results: other.example; spf=pass\r\n\
             Subject: Authentication-Results: mx.example\r\n\r\nAuthentication-Results: mx.example\r\n"
        );
        assert!(forged_results(b"Subject: x\r\n\r\nbody", "mx.example").is_empty());
    }
}
