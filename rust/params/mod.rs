//! Listener parameters: parsed from JSON-like values (a Python dict, a TOML
//! or JSON file) into native types with every error named by its key path,
//! and merged per connection: defaults → top level → the `peer` block
//! matching the client → the `via` block matching our address (each block
//! applied by the same rule, recursively) → the dynamic result, alike.
//! Pure logic.

use crate::cidr::{parse_cidr, CidrMap, CidrSet};
use crate::framing::LineEndings;
use serde_json::{Map, Value};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:2025";
const DEFAULT_MAX_CONNECTIONS: usize = 32768;
const TOP_LEVEL_ONLY: [&str; 3] = ["listen", "max_connections", "implicit_tls"];
const ANYWHERE: [&str; 21] = [
    "hostname",
    "banner",
    "relay_hosts",
    "client_timeout",
    "data_processing_timeout",
    "max_message_size",
    "max_recipients_per_message",
    "max_messages_per_connection",
    "data_buffer_size",
    "line_length_hard_limit",
    "invalid_line_endings",
    "meta",
    "peer",
    "via",
    "batch_handling",
    "trace_headers",
    "tls_certificate",
    "tls_private_key",
    "tls_required_client_ca",
    "allow_xclient",
    "require_proxy_protocol",
];

/// How a transaction is split into the messages policy and the sink see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BatchHandling {
    /// One message per recipient.
    #[default]
    BifurcateAlways,
    /// One message per recipient domain.
    BatchByDomain,
}

/// Where PEM data comes from (KumoMTA's `KeySource`): a file path, or
/// `{key_data = "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeySource {
    File(PathBuf),
    Data(String),
}

/// Which trace headers are prepended to each received message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceHeaders {
    pub received_header: bool,
    /// KumoMTA's `X-KumoRef`-style header: base64 JSON of the recipient and
    /// the metadata named in `include_meta_names`.
    pub supplemental_header: bool,
    pub header_name: String,
    pub include_meta_names: Vec<String>,
}

impl Default for TraceHeaders {
    fn default() -> Self {
        Self {
            received_header: true,
            supplemental_header: false,
            header_name: "X-KumoRef".into(),
            include_meta_names: Vec::new(),
        }
    }
}

/// A `trace_headers` table: each field overrides only when given.
#[derive(Clone, Debug, Default)]
pub struct TraceHeadersOverride {
    received_header: Option<bool>,
    supplemental_header: Option<bool>,
    header_name: Option<String>,
    include_meta_names: Option<Vec<String>>,
}

/// Parameters as given at one level (top level, a block, a dynamic result):
/// each field is set only where it was given.
#[derive(Clone, Debug, Default)]
pub struct GenericParams {
    pub hostname: Option<String>,
    pub banner: Option<String>,
    pub relay_hosts: Option<Arc<CidrSet>>,
    pub client_timeout: Option<Duration>,
    pub data_processing_timeout: Option<Duration>,
    pub max_message_size: Option<usize>,
    pub max_recipients_per_message: Option<usize>,
    pub max_messages_per_connection: Option<usize>,
    pub data_buffer_size: Option<usize>,
    pub line_length_hard_limit: Option<usize>,
    pub invalid_line_endings: Option<LineEndings>,
    pub meta: Map<String, Value>,
    pub batch_handling: Option<BatchHandling>,
    pub trace_headers: Option<TraceHeadersOverride>,
    pub tls_certificate: Option<KeySource>,
    pub tls_private_key: Option<KeySource>,
    pub tls_required_client_ca: Option<KeySource>,
    pub allow_xclient: Option<bool>,
    pub require_proxy_protocol: Option<bool>,
    pub peer: CidrMap<GenericParams>,
    pub via: CidrMap<GenericParams>,
}

/// The effective parameters of one connection.
#[derive(Clone, Debug)]
pub struct Params {
    pub hostname: String,
    pub banner: String,
    pub relay_hosts: Arc<CidrSet>,
    pub client_timeout: Duration,
    pub data_processing_timeout: Duration,
    pub max_message_size: usize,
    pub max_recipients_per_message: usize,
    pub max_messages_per_connection: usize,
    pub data_buffer_size: usize,
    pub line_length_hard_limit: usize,
    pub invalid_line_endings: LineEndings,
    pub meta: Map<String, Value>,
    pub batch_handling: BatchHandling,
    pub trace_headers: TraceHeaders,
    pub tls_certificate: Option<KeySource>,
    pub tls_private_key: Option<KeySource>,
    pub tls_required_client_ca: Option<KeySource>,
    pub allow_xclient: bool,
    pub require_proxy_protocol: bool,
}

/// The machine's hostname, looked up once.
fn machine_hostname() -> &'static str {
    static HOSTNAME: OnceLock<String> = OnceLock::new();
    HOSTNAME.get_or_init(|| gethostname::gethostname().to_string_lossy().into_owned())
}

fn loopback() -> Arc<CidrSet> {
    static LOOPBACK: OnceLock<Arc<CidrSet>> = OnceLock::new();
    LOOPBACK
        .get_or_init(|| {
            let nets = ["127.0.0.1", "::1"].map(|ip| parse_cidr(ip).expect("a literal IP"));
            Arc::new(nets.into_iter().collect())
        })
        .clone()
}

impl Default for Params {
    fn default() -> Self {
        Self {
            hostname: machine_hostname().to_owned(),
            banner: "kumo_listener".into(),
            relay_hosts: loopback(),
            client_timeout: Duration::from_secs(60),
            data_processing_timeout: Duration::from_secs(300),
            max_message_size: 20 * 1024 * 1024,
            max_recipients_per_message: 1024,
            max_messages_per_connection: 10_000,
            data_buffer_size: 128 * 1024,
            line_length_hard_limit: 998,
            invalid_line_endings: LineEndings::Deny,
            meta: Map::new(),
            batch_handling: BatchHandling::BifurcateAlways,
            trace_headers: TraceHeaders::default(),
            tls_certificate: None,
            tls_private_key: None,
            tls_required_client_ca: None,
            allow_xclient: false,
            require_proxy_protocol: false,
        }
    }
}

/// Copy each field that `$from` sets into `$to`.
macro_rules! override_fields {
    ($to:expr, $from:expr; $($field:ident),* $(,)?) => {
        $(if let Some(value) = &$from.$field {
            $to.$field = value.clone();
        })*
    };
}

impl Params {
    /// Apply one level: its own fields, then its `peer` block matching
    /// `remote`, then its `via` block matching `local`, recursively.
    pub fn apply(&mut self, generic: &GenericParams, remote: IpAddr, local: IpAddr) {
        self.apply_fields(generic);
        if let Some(block) = generic.peer.longest_match(remote) {
            self.apply(block, remote, local);
        }
        if let Some(block) = generic.via.longest_match(local) {
            self.apply(block, remote, local);
        }
    }

    fn apply_fields(&mut self, generic: &GenericParams) {
        override_fields!(self, generic;
            hostname, banner, relay_hosts, client_timeout, data_processing_timeout,
            max_message_size, max_recipients_per_message, max_messages_per_connection,
            data_buffer_size, line_length_hard_limit, invalid_line_endings, batch_handling,
            allow_xclient, require_proxy_protocol,
        );
        for (field, value) in [
            (&mut self.tls_certificate, &generic.tls_certificate),
            (&mut self.tls_private_key, &generic.tls_private_key),
            (&mut self.tls_required_client_ca, &generic.tls_required_client_ca),
        ] {
            if value.is_some() {
                field.clone_from(value);
            }
        }
        for (name, value) in &generic.meta {
            self.meta.insert(name.clone(), value.clone());
        }
        if let Some(trace) = &generic.trace_headers {
            override_fields!(self.trace_headers, trace;
                received_header, supplemental_header, header_name, include_meta_names);
        }
    }
}

/// What `start_esmtp_listener` was given.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// As configured, e.g. `"0.0.0.0:25"`; known to parse as a socket address.
    pub listen: String,
    pub max_connections: usize,
    /// TLS from the first byte (RFC 8314, port 465) instead of STARTTLS.
    pub implicit_tls: bool,
    pub params: GenericParams,
}

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

/// Parse the arguments of `start_esmtp_listener`.
pub fn parse_listener_config(value: &Value) -> Result<ListenerConfig, ParamErrors> {
    let mut errors = Errors::default();
    let config = errors.table(value, "").map(|table| ListenerConfig {
        listen: table
            .get("listen")
            .and_then(|v| errors.take("listen", parse_listen(v)))
            .unwrap_or_else(|| DEFAULT_LISTEN.into()),
        max_connections: table
            .get("max_connections")
            .and_then(|v| errors.take("max_connections", positive_integer(v)))
            .unwrap_or(DEFAULT_MAX_CONNECTIONS),
        implicit_tls: table.get("implicit_tls").and_then(|v| errors.take("implicit_tls", boolean(v))).unwrap_or(false),
        params: parse_table(table, "", Level::Top, &mut errors),
    });
    errors.finish(config)
}

/// Parse overrides: a dynamic result, or an overrides file; `path` prefixes
/// every key path in errors.
pub fn parse_overrides(value: &Value, path: &str) -> Result<GenericParams, ParamErrors> {
    let mut errors = Errors::default();
    let params = errors.table(value, path).map(|table| parse_table(table, path, Level::Nested, &mut errors));
    errors.finish(params)
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    /// The arguments of `start_esmtp_listener`, where `listen` and
    /// `max_connections` are read by the caller.
    Top,
    Nested,
}

#[derive(Default)]
struct Errors(Vec<ParamError>);

impl Errors {
    fn push(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(ParamError { path: path.to_owned(), message: message.into() });
    }

    /// The value, or `None` with the error recorded under `path`.
    fn take<T>(&mut self, path: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.push(path, message)).ok()
    }

    fn table<'v>(&mut self, value: &'v Value, path: &str) -> Option<&'v Map<String, Value>> {
        match value {
            Value::Object(table) => Some(table),
            other => {
                self.push(path, format!("expected a table of parameters, got {}", describe(other)));
                None
            }
        }
    }

    fn finish<T>(self, value: Option<T>) -> Result<T, ParamErrors> {
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

fn parse_table(table: &Map<String, Value>, path: &str, level: Level, errors: &mut Errors) -> GenericParams {
    let mut params = GenericParams::default();
    for (key, value) in table {
        let here = key_path(path, key);
        let here = here.as_str();
        match key.as_str() {
            "hostname" => params.hostname = errors.take(here, hostname(value)),
            "banner" => params.banner = errors.take(here, string(value)),
            "relay_hosts" => params.relay_hosts = cidr_list(value, here, errors).map(Arc::new),
            "client_timeout" => params.client_timeout = errors.take(here, parse_duration(value)),
            "data_processing_timeout" => params.data_processing_timeout = errors.take(here, parse_duration(value)),
            "max_message_size" => params.max_message_size = errors.take(here, positive_integer(value)),
            "max_recipients_per_message" => {
                params.max_recipients_per_message = errors.take(here, positive_integer(value))
            }
            "max_messages_per_connection" => {
                params.max_messages_per_connection = errors.take(here, positive_integer(value))
            }
            "data_buffer_size" => params.data_buffer_size = errors.take(here, positive_integer(value)),
            "line_length_hard_limit" => params.line_length_hard_limit = errors.take(here, line_limit(value)),
            "invalid_line_endings" => params.invalid_line_endings = errors.take(here, line_endings(value)),
            "meta" => params.meta = errors.take(here, meta(value)).unwrap_or_default(),
            "peer" => params.peer = cidr_blocks(value, here, errors),
            "via" => params.via = cidr_blocks(value, here, errors),
            "batch_handling" => params.batch_handling = errors.take(here, batch_handling(value)),
            "trace_headers" => params.trace_headers = trace_headers(value, here, errors),
            "tls_certificate" => params.tls_certificate = errors.take(here, parse_key_source(value)),
            "tls_private_key" => params.tls_private_key = errors.take(here, parse_key_source(value)),
            "tls_required_client_ca" => params.tls_required_client_ca = errors.take(here, parse_key_source(value)),
            "allow_xclient" => params.allow_xclient = errors.take(here, boolean(value)),
            "require_proxy_protocol" => params.require_proxy_protocol = errors.take(here, boolean(value)),
            key if TOP_LEVEL_ONLY.contains(&key) => {
                if level == Level::Nested {
                    errors.push(here, "only allowed at the top level of start_esmtp_listener");
                }
            }
            unknown => errors.push(here, unknown_key(unknown, &[ANYWHERE.as_slice(), &TOP_LEVEL_ONLY].concat())),
        }
    }
    params
}

fn unknown_key(key: &str, known: &[&str]) -> String {
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

fn expected(what: &str, got: &Value) -> String {
    format!("expected {what}, got {}", describe(got))
}

fn string(value: &Value) -> Result<String, String> {
    value.as_str().map(str::to_owned).ok_or_else(|| expected("a string", value))
}

fn boolean(value: &Value) -> Result<bool, String> {
    value.as_bool().ok_or_else(|| expected("true or false", value))
}

fn hostname(value: &Value) -> Result<String, String> {
    let name = string(value)?;
    let valid = !name.is_empty() && name.len() <= 255 && !name.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(name)
    } else {
        Err(format!("{name:?} is not a host name"))
    }
}

fn positive_integer(value: &Value) -> Result<usize, String> {
    value
        .as_u64()
        .filter(|&n| n > 0)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| expected("a positive integer", value))
}

/// RFC 5321 needs command lines of 512 octets, so nothing below works.
fn line_limit(value: &Value) -> Result<usize, String> {
    let limit = positive_integer(value)?;
    if limit < 510 {
        return Err(format!("{limit} is below the 510 octets RFC 5321 requires for a command line"));
    }
    Ok(limit)
}

fn parse_listen(value: &Value) -> Result<String, String> {
    let listen = string(value)?;
    listen
        .parse::<SocketAddr>()
        .map(|_| listen.clone())
        .map_err(|_| format!("{listen:?} is not an address like \"0.0.0.0:25\" or \"[::]:25\""))
}

fn one_of<T: Copy>(value: &Value, choices: &[(&str, T)]) -> Result<T, String> {
    let names: Vec<String> = choices.iter().map(|(name, _)| format!("{name:?}")).collect();
    let wanted = format!("one of {}", names.join(", "));
    let text = value.as_str().ok_or_else(|| expected(&wanted, value))?;
    choices.iter().find(|(name, _)| *name == text).map(|(_, choice)| *choice).ok_or_else(|| expected(&wanted, value))
}

fn line_endings(value: &Value) -> Result<LineEndings, String> {
    one_of(value, &[("Deny", LineEndings::Deny), ("Allow", LineEndings::Allow), ("Fix", LineEndings::Fix)])
}

fn batch_handling(value: &Value) -> Result<BatchHandling, String> {
    one_of(
        value,
        &[("BifurcateAlways", BatchHandling::BifurcateAlways), ("BatchByDomain", BatchHandling::BatchByDomain)],
    )
}

fn meta(value: &Value) -> Result<Map<String, Value>, String> {
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

fn cidr_list(value: &Value, path: &str, errors: &mut Errors) -> Option<CidrSet> {
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

fn cidr_blocks(value: &Value, path: &str, errors: &mut Errors) -> CidrMap<GenericParams> {
    let mut blocks = CidrMap::new();
    let Some(table) = value.as_object() else {
        errors.push(path, expected("a table of CIDR → parameters", value));
        return blocks;
    };
    for (key, block) in table {
        let here = format!("{path}.'{key}'");
        let Some(net) = errors.take(&here, parse_cidr(key)) else {
            continue;
        };
        let Some(block) = errors.table(block, &here) else {
            continue;
        };
        let params = parse_table(block, &here, Level::Nested, errors);
        if blocks.insert(net, params).is_some() {
            errors.push(&here, format!("{net} is given twice"));
        }
    }
    blocks
}

fn trace_headers(value: &Value, path: &str, errors: &mut Errors) -> Option<TraceHeadersOverride> {
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

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn errors_of(result: Result<impl fmt::Debug, ParamErrors>) -> Vec<String> {
        result.unwrap_err().0.iter().map(ToString::to_string).collect()
    }

    fn effective(levels: &[&Value], remote: &str, local: &str) -> Params {
        let mut params = Params::default();
        for level in levels {
            params.apply(&parse_overrides(level, "").unwrap(), ip(remote), ip(local));
        }
        params
    }

    #[test]
    fn defaults() {
        let params = Params::default();
        assert_eq!(params.max_message_size, 20 * 1024 * 1024);
        assert_eq!(params.line_length_hard_limit, 998);
        assert!(params.relay_hosts.contains(ip("127.0.0.1")) && params.relay_hosts.contains(ip("::1")));
        assert!(!params.relay_hosts.contains(ip("127.0.0.2")));
        assert!(params.trace_headers.received_header);
    }

    #[test]
    fn listener_config_reads_the_top_level_only_keys() {
        let config =
            parse_listener_config(&json!({"listen": "[::]:25", "max_connections": 5, "hostname": "mx"})).unwrap();
        assert_eq!((config.listen.as_str(), config.max_connections), ("[::]:25", 5));
        assert_eq!(config.params.hostname.as_deref(), Some("mx"));
        let config = parse_listener_config(&json!({})).unwrap();
        assert_eq!((config.listen.as_str(), config.max_connections), (DEFAULT_LISTEN, 32768));
    }

    #[test]
    fn merge_order_is_base_peer_via_then_dynamic() {
        let base = json!({
            "hostname": "base", "banner": "base", "meta": {"a": "base", "b": "base", "c": "base"},
            "peer": {"10.0.0.0/8": {"hostname": "wide"}, "10.0.0.9": {"hostname": "peer", "meta": {"b": "peer"}}},
            "via": {"192.0.2.1": {"hostname": "via", "meta": {"c": "via"}}},
        });
        let dynamic = json!({"banner": "dynamic", "meta": {"c": "dynamic"}});
        assert_eq!(effective(&[&base], "10.1.1.1", "192.0.2.9").hostname, "wide");
        assert_eq!(effective(&[&base], "10.0.0.9", "192.0.2.9").hostname, "peer");
        let params = effective(&[&base], "10.0.0.9", "192.0.2.1");
        assert_eq!(params.hostname, "via");
        assert_eq!(json!(params.meta), json!({"a": "base", "b": "peer", "c": "via"}));
        let params = effective(&[&base, &dynamic], "10.0.0.9", "192.0.2.1");
        assert_eq!((params.hostname.as_str(), params.banner.as_str()), ("via", "dynamic"));
        assert_eq!(params.meta["c"], json!("dynamic"));
    }

    #[test]
    fn blocks_nest() {
        let base = json!({"via": {"192.0.2.1": {"hostname": "via", "peer": {"10.0.0.9": {"hostname": "both"}}}}});
        assert_eq!(effective(&[&base], "10.0.0.9", "192.0.2.1").hostname, "both");
        assert_eq!(effective(&[&base], "10.0.0.8", "192.0.2.1").hostname, "via");
    }

    #[test]
    fn trace_headers_merge_field_by_field() {
        let base = json!({"trace_headers": {"supplemental_header": true}});
        let dynamic = json!({"trace_headers": {"header_name": "X-Ref", "include_meta_names": ["tenant"]}});
        let trace = effective(&[&base, &dynamic], "10.0.0.1", "10.0.0.2").trace_headers;
        assert!(trace.received_header && trace.supplemental_header);
        assert_eq!((trace.header_name.as_str(), trace.include_meta_names), ("X-Ref", vec!["tenant".to_string()]));
    }

    #[test]
    fn values_of_every_kind() {
        let params = effective(
            &[&json!({
                "client_timeout": "5 minutes", "data_processing_timeout": 1.5, "relay_hosts": ["10.0.0.0/8"],
                "invalid_line_endings": "Fix", "batch_handling": "BatchByDomain",
                "tls_certificate": "/etc/cert.pem", "tls_private_key": {"key_data": "PEM"},
                "allow_xclient": true, "line_length_hard_limit": 2000,
            })],
            "10.0.0.1",
            "10.0.0.2",
        );
        assert_eq!(params.client_timeout, Duration::from_secs(300));
        assert_eq!(params.data_processing_timeout, Duration::from_millis(1500));
        assert!(params.relay_hosts.contains(ip("10.9.9.9")) && !params.relay_hosts.contains(ip("127.0.0.1")));
        assert_eq!(params.invalid_line_endings, LineEndings::Fix);
        assert_eq!(params.batch_handling, BatchHandling::BatchByDomain);
        assert_eq!(params.tls_certificate, Some(KeySource::File("/etc/cert.pem".into())));
        assert_eq!(params.tls_private_key, Some(KeySource::Data("PEM".into())));
        assert!(params.allow_xclient);
        assert_eq!(params.line_length_hard_limit, 2000);
    }

    #[test]
    fn every_error_is_reported_with_its_key_path() {
        let errors = errors_of(parse_overrides(
            &json!({
                "hostname": 5, "hostnme": "x", "client_timeout": "soon", "relay_hosts": ["127.0.0.1", "10.0.0.1/33"],
                "peer": {"192.168.1.1/24": {}, "10.0.0.0/8": {"via": {"127.0.0.2": {"banner": 1}}}},
                "via": {"10.0.0.1": {"max_connections": 5}}, "listen": "0.0.0.0:25",
                "invalid_line_endings": "deny", "trace_headers": {"header_name": "X Bad"},
                "max_message_size": -1, "line_length_hard_limit": 100,
            }),
            "",
        ));
        let expected_prefixes = [
            "hostname: expected a string, got the number 5",
            "hostnme: unknown parameter; did you mean hostname?",
            "client_timeout: \"soon\" is not a duration",
            "relay_hosts[1]: ",
            "peer.'192.168.1.1/24': 192.168.1.1/24 has host bits set; did you mean 192.168.1.0/24?",
            "peer.'10.0.0.0/8'.via.'127.0.0.2'.banner: expected a string",
            "via.'10.0.0.1'.max_connections: only allowed at the top level of start_esmtp_listener",
            "listen: only allowed at the top level",
            "invalid_line_endings: expected one of \"Deny\", \"Allow\", \"Fix\", got the string \"deny\"",
            "trace_headers.header_name: ",
            "max_message_size: expected a positive integer, got the number -1",
            "line_length_hard_limit: 100 is below",
        ];
        for prefix in expected_prefixes {
            assert!(errors.iter().any(|e| e.starts_with(prefix)), "{prefix:?} not in {errors:#?}");
        }
        assert_eq!(errors.len(), expected_prefixes.len(), "{errors:#?}");
    }

    #[test]
    fn the_path_prefix_and_non_tables() {
        assert_eq!(errors_of(parse_overrides(&json!(["x"]), "")), ["expected a table of parameters, got a list"]);
        assert_eq!(
            errors_of(parse_overrides(&json!({"banner": 1}), "dyn")),
            ["dyn.banner: expected a string, got the number 1"]
        );
        assert_eq!(
            errors_of(parse_listener_config(&json!({"listen": "somewhere", "max_connections": 0}))),
            [
                "listen: \"somewhere\" is not an address like \"0.0.0.0:25\" or \"[::]:25\"",
                "max_connections: expected a positive integer, got the number 0"
            ]
        );
        assert_eq!(
            errors_of(parse_overrides(&json!({"via": {"10.0.0.1": {}, "10.0.0.1/32": {}}}), "")),
            ["via.'10.0.0.1/32': 10.0.0.1/32 is given twice"]
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration(&json!(30)), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration(&json!("1 minute")), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration(&json!("1h 30m")), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(&json!("250ms")), Ok(Duration::from_millis(250)));
        assert!(parse_duration(&json!(0)).is_err());
        assert!(parse_duration(&json!(-1)).is_err());
        assert!(parse_duration(&json!(true)).is_err());
        assert!(parse_duration(&json!("soon")).is_err());
    }
}
