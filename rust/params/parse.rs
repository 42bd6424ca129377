//! Value parsers, and the errors they report under key paths.

use super::{parse_table, GenericParams, KeySource, Level, Protocol, TraceHeadersOverride};
use crate::cidr::{parse_cidr, CidrMap, CidrSet};
use crate::client_limits::Rate;
use crate::forward::upstream::{parse_upstream, Upstream};
use crate::protocol::framing::LineEndings;
use serde_json::{Map, Value};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::BatchHandling;

/// One invalid value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamError {
    /// Where, e.g. `via.'10.0.0.1'.max_connections` (empty for the whole value).
    pub path: String,
    pub message: String,
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every error found in one set of parameters, one per line when shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamErrors(pub Vec<ParamError>);

impl fmt::Display for ParamErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ParamErrors {}

#[derive(Default)]
pub(super) struct Errors(pub(super) Vec<ParamError>);

impl Errors {
    pub(super) fn push(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(ParamError { path: path.to_owned(), message: message.into() });
    }

    /// The value, or `None` with the error recorded under `path`.
    pub(super) fn take<T>(&mut self, path: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.push(path, message)).ok()
    }

    pub(super) fn table<'v>(&mut self, value: &'v Value, path: &str) -> Option<&'v Map<String, Value>> {
        match value {
            Value::Object(table) => Some(table),
            other => {
                self.push(path, format!("expected a table of parameters, got {}", describe(other)));
                None
            }
        }
    }

    pub(super) fn finish<T>(self, value: Option<T>) -> Result<T, ParamErrors> {
        match value {
            Some(value) if self.0.is_empty() => Ok(value),
            _ => Err(ParamErrors(self.0)),
        }
    }
}

/// `key` under `path`: `via.'10.0.0.1'.hostname`.
pub fn key_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

pub(super) fn unknown_key(key: &str, known: &[&str]) -> String {
    let closest =
        known.iter().map(|name| (strsim::levenshtein(key, name), *name)).min().filter(|(distance, _)| *distance <= 3);
    match closest {
        Some((_, name)) => format!("unknown parameter; did you mean {name}?"),
        None => "unknown parameter".into(),
    }
}

/// A short description of a value's type for error messages.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a table".into(),
    }
}

pub(super) fn expected(what: &str, got: &Value) -> String {
    format!("expected {what}, got {}", describe(got))
}

/// A duration: seconds as a number, or a string like `"5 minutes"` or `"1h 30m"`.
pub fn parse_duration(value: &Value) -> Result<Duration, String> {
    let parsed = match value {
        Value::Number(n) => n
            .as_f64()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| format!("{n} is not a number of seconds")),
        Value::String(s) => humantime::parse_duration(s.trim())
            .map_err(|e| format!("{s:?} is not a duration like \"30 seconds\" or \"5 minutes\" ({e})")),
        other => Err(format!("expected seconds or a string like \"5 minutes\", got {}", describe(other))),
    }?;
    if parsed.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(parsed)
}

/// A rate like `"30/minute"`, `"100/1h"` or `"5/10s"`: a count per duration.
pub(super) fn rate(value: &Value) -> Result<Rate, String> {
    const WANTED: &str = "a rate like \"30/minute\" or \"100/1h\"";
    let text = value.as_str().ok_or_else(|| expected(WANTED, value))?;
    let (count, per) = text.split_once('/').ok_or_else(|| expected(WANTED, value))?;
    let count: u32 = count.trim().parse().ok().filter(|&n| n > 0).ok_or_else(|| expected(WANTED, value))?;
    let per = per.trim();
    // "minute" alone means one minute.
    let per = if per.starts_with(|c: char| c.is_ascii_digit()) { per.to_owned() } else { format!("1{per}") };
    let per = humantime::parse_duration(&per).ok().filter(|d| !d.is_zero()).ok_or_else(|| expected(WANTED, value))?;
    Ok(Rate { count, per })
}

/// A rate, or `false` for none (a limit that is on by default).
pub(super) fn rate_or_false(value: &Value) -> Result<Option<Rate>, String> {
    match value {
        Value::Bool(false) => Ok(None),
        Value::String(_) => rate(value).map(Some),
        _ => Err(expected("a rate like \"10/minute\", or false", value)),
    }
}

/// The bits of an IPv6 address that name a client: 1 to 128.
pub(super) fn ipv6_prefix_length(value: &Value) -> Result<u8, String> {
    value
        .as_u64()
        .filter(|bits| (1..=128).contains(bits))
        .and_then(|bits| u8::try_from(bits).ok())
        .ok_or_else(|| expected("a prefix length from 1 to 128", value))
}

pub(super) fn string(value: &Value) -> Result<String, String> {
    value.as_str().map(str::to_owned).ok_or_else(|| expected("a string", value))
}

pub(super) fn directory(value: &Value) -> Result<Option<PathBuf>, String> {
    match value.as_str() {
        Some(path) if !path.is_empty() => Ok(Some(PathBuf::from(path))),
        _ => Err(expected("a directory path", value)),
    }
}

pub(super) fn boolean(value: &Value) -> Result<bool, String> {
    value.as_bool().ok_or_else(|| expected("true or false", value))
}

pub(super) fn hostname(value: &Value) -> Result<String, String> {
    let name = string(value)?;
    let valid = !name.is_empty() && name.len() <= 255 && !name.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(name)
    } else {
        Err(format!("{name:?} is not a host name"))
    }
}

pub(super) fn positive_integer(value: &Value) -> Result<usize, String> {
    value
        .as_u64()
        .filter(|&n| n > 0)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| expected("a positive integer", value))
}

/// A size in bytes: a positive integer, or a string like `"20 MiB"`,
/// `"100 KB"`, `"1.5 GiB"` or `"4096"`. Units, in any case: `B`, `KB`, `MB`,
/// `GB` (powers of 1000) and `KiB`, `MiB`, `GiB` (powers of 1024).
pub(super) fn size(value: &Value) -> Result<usize, String> {
    match value {
        Value::String(text) => parse_size(text).ok_or_else(|| {
            format!("{text:?} is not a size like \"20 MiB\" or \"100 KB\" (KB = 1000 bytes, KiB = 1024)")
        }),
        Value::Number(_) => positive_integer(value),
        other => Err(expected("a positive integer or a size like \"20 MiB\"", other)),
    }
}

fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return None,
    };
    let bytes = match number.split_once('.') {
        None => number.parse::<u64>().ok()?.checked_mul(multiplier)?,
        Some((whole, fraction)) => {
            let valid = !whole.is_empty() && !fraction.is_empty() && !fraction.contains('.');
            let scaled = valid.then(|| number.parse::<f64>().ok()).flatten()? * multiplier as f64;
            // Whole bytes; anything past u64 is refused below.
            (scaled < u64::MAX as f64).then_some(scaled as u64)?
        }
    };
    usize::try_from(bytes).ok().filter(|&bytes| bytes > 0)
}

/// RFC 5321 needs command lines of 512 octets, so nothing below works.
pub(super) fn line_limit(value: &Value) -> Result<usize, String> {
    let limit = positive_integer(value)?;
    if limit < 510 {
        return Err(format!("{limit} is below the 510 octets RFC 5321 requires for a command line"));
    }
    Ok(limit)
}

pub(super) fn parse_listen(value: &Value) -> Result<String, String> {
    let listen = string(value)?;
    if listen.starts_with('/') || listen.parse::<SocketAddr>().is_ok() {
        return Ok(listen);
    }
    Err(format!("{listen:?} is not an address like \"0.0.0.0:25\" or \"[::]:25\", nor a socket path like \"/run/kumo/lmtp.sock\""))
}

fn one_of<T: Copy>(value: &Value, choices: &[(&str, T)]) -> Result<T, String> {
    let names: Vec<String> = choices.iter().map(|(name, _)| format!("{name:?}")).collect();
    let wanted = format!("one of {}", names.join(", "));
    let text = value.as_str().ok_or_else(|| expected(&wanted, value))?;
    choices.iter().find(|(name, _)| *name == text).map(|(_, choice)| *choice).ok_or_else(|| expected(&wanted, value))
}

pub(super) fn line_endings(value: &Value) -> Result<LineEndings, String> {
    one_of(value, &[("Deny", LineEndings::Deny), ("Allow", LineEndings::Allow), ("Fix", LineEndings::Fix)])
}

pub(super) fn protocol(value: &Value) -> Result<Protocol, String> {
    one_of(value, &[("smtp", Protocol::Smtp), ("lmtp", Protocol::Lmtp)])
}

pub(super) fn batch_handling(value: &Value) -> Result<BatchHandling, String> {
    one_of(
        value,
        &[("BifurcateAlways", BatchHandling::BifurcateAlways), ("BatchByDomain", BatchHandling::BatchByDomain)],
    )
}

pub(super) fn meta(value: &Value) -> Result<Map<String, Value>, String> {
    value.as_object().cloned().ok_or_else(|| expected("a table", value))
}

/// A PEM source: `"path"` or `{key_data = "PEM text"}`.
pub fn parse_key_source(value: &Value) -> Result<KeySource, String> {
    const WANTED: &str = "a file path or {key_data = \"PEM text\"}";
    match value {
        Value::String(path) if !path.is_empty() => Ok(KeySource::File(PathBuf::from(path))),
        Value::Object(table) if table.len() == 1 => match table.get("key_data") {
            Some(Value::String(data)) => Ok(KeySource::Data(data.clone())),
            _ => Err(expected(WANTED, value)),
        },
        other => Err(expected(WANTED, other)),
    }
}

/// A list of IP addresses or CIDRs, each error under `path[index]`.
pub(super) fn cidr_list(value: &Value, path: &str, errors: &mut Errors) -> Option<CidrSet> {
    let Some(items) = value.as_array() else {
        errors.push(path, expected("a list of IP addresses or CIDRs", value));
        return None;
    };
    let before = errors.0.len();
    let mut set = CidrSet::new();
    for (index, item) in items.iter().enumerate() {
        let here = format!("{path}[{index}]");
        let net = item.as_str().ok_or_else(|| expected("an IP address or CIDR", item)).and_then(parse_cidr);
        if let Some(net) = errors.take(&here, net) {
            set.insert(net, ());
        }
    }
    (errors.0.len() == before).then_some(set)
}

/// `relay_hosts`: a [`cidr_list`], shared by every connection it applies to.
pub(super) fn relay_hosts(value: &Value, path: &str, errors: &mut Errors) -> Option<Arc<CidrSet>> {
    cidr_list(value, path, errors).map(Arc::new)
}

/// `forward_to`: a list of upstream URLs, tried in order.
pub(super) fn forward_to(value: &Value, path: &str, errors: &mut Errors) -> Option<Arc<[Upstream]>> {
    let Some(items) = value.as_array() else {
        errors.push(path, expected("a list of upstream URLs like \"smtp://HOST[:PORT]\"", value));
        return None;
    };
    let before = errors.0.len();
    let mut upstreams = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let here = format!("{path}[{index}]");
        let upstream = item.as_str().ok_or_else(|| expected("an upstream URL", item)).and_then(parse_upstream);
        upstreams.extend(errors.take(&here, upstream));
    }
    (errors.0.len() == before).then(|| upstreams.into())
}

pub(super) fn cidr_blocks(value: &Value, path: &str, errors: &mut Errors) -> CidrMap<GenericParams> {
    let mut blocks = CidrMap::new();
    let Some(table) = value.as_object() else {
        errors.push(path, expected("a table of CIDR → parameters", value));
        return blocks;
    };
    for (key, block) in table {
        let here = format!("{path}.'{key}'");
        let net = errors.take(&here, parse_cidr(key));
        let Some(block) = errors.table(block, &here) else {
            continue;
        };
        // A bad key still has its block checked: every error in one report.
        let params = parse_table(block, &here, Level::Nested, errors);
        let Some(net) = net else {
            continue;
        };
        if blocks.insert(net, params).is_some() {
            errors.push(&here, format!("{net} is given twice"));
        }
    }
    blocks
}

pub(super) fn trace_headers(value: &Value, path: &str, errors: &mut Errors) -> Option<TraceHeadersOverride> {
    let Some(table) = value.as_object() else {
        errors.push(path, expected("a table like {received_header = true}", value));
        return None;
    };
    let mut trace = TraceHeadersOverride::default();
    for (key, item) in table {
        let here = key_path(path, key);
        match key.as_str() {
            "received_header" => trace.received_header = errors.take(&here, boolean(item)),
            "supplemental_header" => trace.supplemental_header = errors.take(&here, boolean(item)),
            "header_name" => trace.header_name = errors.take(&here, header_name(item)),
            "include_meta_names" => trace.include_meta_names = errors.take(&here, string_list(item)),
            unknown => errors.push(
                &here,
                unknown_key(unknown, &["received_header", "supplemental_header", "header_name", "include_meta_names"]),
            ),
        }
    }
    Some(trace)
}

/// An RFC 5322 field name: printable ASCII except `:`.
fn header_name(value: &Value) -> Result<String, String> {
    let name = string(value)?;
    let valid = !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':');
    if valid {
        Ok(name)
    } else {
        Err(format!("{name:?} is not a header field name"))
    }
}

fn string_list(value: &Value) -> Result<Vec<String>, String> {
    let wanted = || expected("a list of strings", value);
    value
        .as_array()
        .ok_or_else(wanted)?
        .iter()
        .map(|item| item.as_str().map(str::to_owned).ok_or_else(wanted))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_are_integers_or_strings_with_units() {
        for (given, bytes) in [
            (json!(1024), 1024),
            (json!("1024"), 1024),
            (json!("20 MiB"), 20 << 20),
            (json!("20MiB"), 20 << 20),
            (json!("100 KB"), 100_000),
            (json!("100 kb"), 100_000),
            (json!("128 KiB"), 128 << 10),
            (json!(" 2 GB "), 2_000_000_000),
            (json!("1 GiB"), 1 << 30),
            (json!("1.5 MiB"), 3 << 19),
            (json!("10 B"), 10),
        ] {
            assert_eq!(size(&given), Ok(bytes), "{given}");
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        for given in ["", "MiB", "0", "0 KB", "-1 KB", "20 MiBs", "20 M", "20 K", "1.2.3 KB", ".5 KB", "5. KB", "1e3"] {
            let error = size(&json!(given)).unwrap_err();
            assert!(error.contains("is not a size like \"20 MiB\""), "{given:?}: {error}");
        }
        assert_eq!(size(&json!("99999999999 GiB")).map_err(|_| ()), Err(()));
        assert_eq!(size(&json!(-1)), Err("expected a positive integer, got the number -1".into()));
        assert_eq!(
            size(&json!(true)),
            Err("expected a positive integer or a size like \"20 MiB\", got the boolean true".into())
        );
    }
}
