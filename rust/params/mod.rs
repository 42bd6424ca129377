//! Listener parameters: parsed from JSON-like values (a Python dict, a TOML
//! or JSON file) into native types with every error named by its key path,
//! and merged per connection: defaults → top level → the `peer` block
//! matching the client → the `via` block matching our address (each block
//! applied by the same rule, recursively) → the dynamic result, alike.
//! Pure logic.
//!
//! Every parameter is declared once, as a row of the table below
//! (`listener_params!`, see [`macros`]): its type, default, parser and how it
//! merges. The structs, the defaults, the merge, the parser and the list of
//! known keys all come from it.

#[macro_use]
mod macros;
mod authentication;
mod forward;
mod parse;

use crate::cidr::{parse_cidr, CidrMap, CidrSet};
use crate::client_limits::{Rate, DEFAULT_IPV6_PREFIX_LENGTH};
use crate::forward::upstream::Upstream;
use crate::protocol::framing::LineEndings;
use authentication::{authentication, AuthenticationLayer};
pub use authentication::{AuthMode, Authentication};
pub use forward::ForwardOptions;
use forward::{forward_options, ForwardOptionsLayer};
use parse::{
    batch_handling, boolean, cidr_blocks, cidr_list, directory, forward_to, hostname, ipv6_prefix_length, line_endings,
    line_limit, meta, parse_listen, positive_integer, protocol, rate, rate_or_false, relay_hosts, size, string,
    trace_headers, unknown_key, Errors,
};
pub use parse::{key_path, parse_duration, parse_key_source, ParamError, ParamErrors};
use serde_json::{Map, Value};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:2025";
pub const DEFAULT_MAX_CONNECTIONS: usize = 32768;
const DEFAULT_BODY_MEMORY_LIMIT: usize = 1 << 30;
/// Failed AUTH attempts per client: ten a minute, where one address could
/// try thousands a second over reconnecting sessions.
const DEFAULT_AUTH_FAILURES: Rate = Rate { count: 10, per: Duration::from_secs(60) };

listener_params! {
    top_level {
        /// As configured, e.g. `"0.0.0.0:25"`: known to parse as a socket
        /// address, or to be an absolute path (a Unix socket).
        listen: String = DEFAULT_LISTEN.into(), parse_listen;
        max_connections: usize = DEFAULT_MAX_CONNECTIONS, positive_integer;
        /// TLS from the first byte (RFC 8314, port 465) instead of STARTTLS.
        implicit_tls: bool = false, boolean;
        /// SMTP, or LMTP (RFC 2033).
        protocol: Protocol = Protocol::Smtp, protocol;
        /// The most the bodies and envelopes of this listener's messages hold
        /// in memory together; past it, every new body goes to a file, and
        /// recipients get 452.
        body_memory_limit: usize = DEFAULT_BODY_MEMORY_LIMIT, size;
        /// Where spilled bodies go; None: the Maildir's `tmp/`, or the
        /// system's temporary directory with the discard sink.
        body_spool_path: Option<PathBuf> = None, directory;
    }
    anywhere {
        // name: type = default, how parser, merge;
        hostname: String = machine_hostname().to_owned(), value hostname, set;
        banner: String = "kumo_listener".into(), value string, set;
        relay_hosts: Arc<CidrSet> = loopback(), tree relay_hosts, set;
        client_timeout: Duration = Duration::from_secs(60), value parse_duration, set;
        data_processing_timeout: Duration = Duration::from_secs(300), value parse_duration, set;
        max_message_size: usize = 20 * 1024 * 1024, value size, set;
        max_recipients_per_message: usize = 1024, value positive_integer, set;
        max_messages_per_connection: usize = 10_000, value positive_integer, set;
        data_buffer_size: usize = 128 * 1024, value size, set;
        /// A body larger than this goes to a file as it arrives.
        body_spill_threshold: usize = 256 * 1024, value size, set;
        line_length_hard_limit: usize = 998, value line_limit, set;
        invalid_line_endings: LineEndings = LineEndings::Deny, value line_endings, set;
        meta: Map<String, Value> = Map::new(), value meta, keys;
        batch_handling: BatchHandling = BatchHandling::BifurcateAlways, value batch_handling, set;
        trace_headers: TraceHeaders = TraceHeaders::default(), tree trace_headers, fields(TraceHeadersOverride);
        tls_certificate: KeySource = None, value parse_key_source, option;
        tls_private_key: KeySource = None, value parse_key_source, option;
        tls_required_client_ca: KeySource = None, value parse_key_source, option;
        allow_xclient: bool = false, value boolean, set;
        require_proxy_protocol: bool = false, value boolean, set;
        max_connections_per_client: usize = 50, value positive_integer, set;
        max_connection_rate_per_client: Rate = None, value rate, option;
        max_message_rate_per_client: Rate = None, value rate, option;
        /// Upstreams each message is relayed to, tried in order; empty: the server's own sink.
        forward_to: Arc<[Upstream]> = Arc::from([]), tree forward_to, set;
        /// How the upstreams are reached: TLS, timeouts, the pool.
        forward_options: Arc<ForwardOptions> = Arc::default(), tree forward_options, shared(ForwardOptionsLayer);
        /// Failed AUTH attempts per client across its sessions; `None`: no limit.
        max_auth_failures_per_client: Option<Rate> = Some(DEFAULT_AUTH_FAILURES), value rate_or_false, set;
        /// The bits of an IPv6 address that name a client, for every per-client limit.
        client_ipv6_prefix_length: u8 = DEFAULT_IPV6_PREFIX_LENGTH, value ipv6_prefix_length, set;
        /// Bytes one client address may have in spill files at once, across its sessions.
        max_spilled_bytes_per_client: usize = 100 * 1024 * 1024, value size, set;
        /// The longest one message's bytes may take to arrive (DATA, or BDAT from the first chunk).
        max_data_duration: Duration = Duration::from_secs(600), value parse_duration, set;
        /// SPF, DKIM, DMARC, ARC and iprev at reception, each off, annotate or enforce.
        authentication: Authentication = Authentication::default(), tree authentication, fields(AuthenticationLayer);
    }
}

impl ListenerConfig {
    /// The path of a Unix socket listener (a `listen` starting with `/`).
    pub fn unix_path(&self) -> Option<&Path> {
        self.listen.starts_with('/').then(|| Path::new(&self.listen))
    }
}

/// What a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    Smtp,
    /// RFC 2033: LHLO, and one reply per recipient after the data.
    Lmtp,
}

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

impl TraceHeaders {
    /// The `fields` merge of `trace_headers`: each field given replaces ours.
    fn apply(&mut self, layer: &TraceHeadersOverride) {
        param_kind!(@merge set, self.received_header, layer.received_header);
        param_kind!(@merge set, self.supplemental_header, layer.supplemental_header);
        param_kind!(@merge set, self.header_name, layer.header_name);
        param_kind!(@merge set, self.include_meta_names, layer.include_meta_names);
    }
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
}

/// Parse the arguments of `start_esmtp_listener`.
pub fn parse_listener_config(value: &Value) -> Result<ListenerConfig, ParamErrors> {
    let mut errors = Errors::default();
    let config = errors.table(value, "").map(|table| ListenerConfig::parse(table, &mut errors));
    errors.finish(config)
}

/// Parse overrides: a dynamic result, or an overrides file; `path` prefixes
/// every key path in errors.
pub fn parse_overrides(value: &Value, path: &str) -> Result<GenericParams, ParamErrors> {
    let mut errors = Errors::default();
    let params = errors.table(value, path).map(|table| parse_table(table, path, Level::Nested, &mut errors));
    errors.finish(params)
}

/// Like [`parse_overrides`], but also the parameters that did parse when
/// some did not, so that further checks (`tls::check_static`) can report
/// their errors too.
pub fn parse_overrides_partially(value: &Value, path: &str) -> (GenericParams, Vec<ParamError>) {
    let mut errors = Errors::default();
    let params = errors.table(value, path).map(|table| parse_table(table, path, Level::Nested, &mut errors));
    (params.unwrap_or_default(), errors.0)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    /// The arguments of `start_esmtp_listener`, where the `TOP_LEVEL_ONLY`
    /// keys (`listen`, `max_connections`, `implicit_tls`, `protocol`) are read by
    /// `ListenerConfig::parse`.
    Top,
    Nested,
}

fn parse_table(table: &Map<String, Value>, path: &str, level: Level, errors: &mut Errors) -> GenericParams {
    let mut params = GenericParams::default();
    for (key, value) in table {
        let here = key_path(path, key);
        let here = here.as_str();
        if params.parse_field(key, value, here, errors) {
            continue;
        }
        match key.as_str() {
            "peer" => params.peer = cidr_blocks(value, here, errors),
            "via" => params.via = cidr_blocks(value, here, errors),
            key if TOP_LEVEL_ONLY.contains(&key) => {
                if level == Level::Nested {
                    errors.push(here, "only allowed at the top level of start_esmtp_listener");
                }
            }
            unknown => errors.push(here, unknown_key(unknown, &[ANYWHERE, TOP_LEVEL_ONLY].concat())),
        }
    }
    params
}

/// What `get_listener_domain` said about a domain.
#[derive(Debug, Default)]
pub struct ListenerDomain {
    pub relay_to: bool,
    pub relay_from: CidrSet,
}

/// Parse a `get_listener_domain` result other than `None`.
pub fn parse_listener_domain(value: &Value) -> Result<ListenerDomain, ParamErrors> {
    let mut errors = Errors::default();
    let Value::Object(table) = value else {
        errors.push("", "get_listener_domain handlers must return None or a dict");
        return errors.finish(None);
    };
    let mut domain = ListenerDomain::default();
    for (key, item) in table {
        match key.as_str() {
            "relay_to" => domain.relay_to = errors.take(key, boolean(item)).unwrap_or_default(),
            "relay_from" => domain.relay_from = cidr_list(item, key, &mut errors).unwrap_or_default(),
            // KumoMTA's reporting switches: accepted so policies port unchanged.
            "log_oob" | "log_arf" => {}
            _ => errors.push(key, "unknown get_listener_domain key"),
        }
    }
    errors.finish(Some(domain))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::upstream::ForwardTls;
    use serde_json::json;
    use std::fmt;

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
    fn rates() {
        let rate_of =
            |text: &str| effective(&[&json!({"max_connection_rate_per_client": text})], "10.0.0.1", "10.0.0.2");
        let rate = |count, seconds| Some(Rate { count, per: Duration::from_secs(seconds) });
        assert_eq!(rate_of("30/minute").max_connection_rate_per_client, rate(30, 60));
        assert_eq!(rate_of("100 / 1h").max_connection_rate_per_client, rate(100, 3600));
        assert_eq!(rate_of("5/10s").max_connection_rate_per_client, rate(5, 10));
        assert_eq!(Params::default().max_connection_rate_per_client, None);
        for bad in [json!("30"), json!("0/minute"), json!("x/minute"), json!("5/soon"), json!(5)] {
            let errors = errors_of(parse_overrides(&json!({"max_connection_rate_per_client": bad}), ""));
            assert!(errors[0].starts_with("max_connection_rate_per_client: expected a rate like"), "{errors:?}");
        }
    }

    #[test]
    fn the_auth_failure_limit_is_on_by_default_and_false_turns_it_off() {
        let rate = |count, seconds| Some(Rate { count, per: Duration::from_secs(seconds) });
        assert_eq!(Params::default().max_auth_failures_per_client, rate(10, 60));
        let of = |value: Value| effective(&[&json!({"max_auth_failures_per_client": value})], "10.0.0.1", "10.0.0.2");
        assert_eq!(of(json!("3/hour")).max_auth_failures_per_client, rate(3, 3600));
        assert_eq!(of(json!(false)).max_auth_failures_per_client, None);
        for bad in [json!(true), json!(5), json!("lots")] {
            let errors = errors_of(parse_overrides(&json!({"max_auth_failures_per_client": bad}), ""));
            assert!(errors[0].starts_with("max_auth_failures_per_client: expected a rate like"), "{errors:?}");
        }
    }

    #[test]
    fn ipv6_prefix_lengths() {
        assert_eq!(Params::default().client_ipv6_prefix_length, 84);
        let of = |bits: Value| parse_overrides(&json!({"client_ipv6_prefix_length": bits}), "");
        assert_eq!(of(json!(128)).unwrap().client_ipv6_prefix_length, Some(128));
        for bad in [json!(0), json!(129), json!("64"), json!(-1)] {
            let errors = errors_of(of(bad));
            assert!(errors[0].starts_with("client_ipv6_prefix_length: expected a prefix length from 1 to 128, got"));
        }
    }

    #[test]
    fn every_error_is_reported_with_its_key_path() {
        let errors = errors_of(parse_overrides(
            &json!({
                "hostname": 5, "hostnme": "x", "client_timeout": "soon", "relay_hosts": ["127.0.0.1", "10.0.0.1/33"],
                "peer": {"192.168.1.1/24": {"bannr": "x"}, "10.0.0.0/8": {"via": {"127.0.0.2": {"banner": 1}}}},
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
            // The block of a bad key is still checked.
            "peer.'192.168.1.1/24'.bannr: unknown parameter; did you mean banner?",
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
    fn protocol_and_unix_socket_listen() {
        let config = parse_listener_config(&json!({"listen": "/run/kumo/lmtp.sock", "protocol": "lmtp"})).unwrap();
        assert_eq!((config.unix_path(), config.protocol), (Some(Path::new("/run/kumo/lmtp.sock")), Protocol::Lmtp));
        let config = parse_listener_config(&json!({})).unwrap();
        assert_eq!((config.unix_path(), config.protocol), (None, Protocol::Smtp));
        assert_eq!(
            errors_of(parse_listener_config(&json!({"protocol": "LMTP"}))),
            ["protocol: expected one of \"smtp\", \"lmtp\", got the string \"LMTP\""]
        );
        assert_eq!(
            errors_of(parse_overrides(&json!({"protocol": "lmtp"}), "")),
            ["protocol: only allowed at the top level of start_esmtp_listener"]
        );
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
                "listen: \"somewhere\" is not an address like \"0.0.0.0:25\" or \"[::]:25\", \
                 nor a socket path like \"/run/kumo/lmtp.sock\"",
                "max_connections: expected a positive integer, got the number 0"
            ]
        );
        assert_eq!(
            errors_of(parse_overrides(&json!({"via": {"10.0.0.1": {}, "10.0.0.1/32": {}}}), "")),
            ["via.'10.0.0.1/32': 10.0.0.1/32 is given twice"]
        );
    }

    #[test]
    fn authentication_merges_field_by_field_and_names_bad_values() {
        let base = json!({"authentication": {"spf": "annotate", "dkim": "annotate"},
            "via": {"127.0.0.2": {"authentication": {"spf": "enforce", "dmarc": "enforce"}}}});
        let auth = effective(&[&base], "10.0.0.1", "127.0.0.2").authentication;
        assert_eq!(
            (auth.spf, auth.dkim, auth.dmarc, auth.arc),
            (AuthMode::Enforce, AuthMode::Annotate, AuthMode::Enforce, AuthMode::Off)
        );
        let auth = effective(&[&base], "10.0.0.1", "127.0.0.3").authentication;
        assert_eq!((auth.spf, auth.dmarc), (AuthMode::Annotate, AuthMode::Off));
        assert!(auth.any() && auth.checks_message());
        assert!(!Params::default().authentication.any());
        let errors = errors_of(parse_overrides(
            &json!({"authentication": {"spf": "strict", "dkm": "off"}, "via": {"::1": {"authentication": 1}}}),
            "",
        ));
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[0].starts_with("authentication.spf: expected one of \"off\", \"annotate\", \"enforce\""),
            "{errors:?}"
        );
        assert!(errors[1].starts_with("authentication.dkm: unknown parameter; did you mean dkim?"), "{errors:?}");
        assert!(errors[2].starts_with("via.'::1'.authentication: expected a table"), "{errors:?}");
    }

    #[test]
    fn forward_to_errors_name_each_entry() {
        let errors = errors_of(parse_overrides(
            &json!({"forward_to": ["smtp://ok.example", "mx.example", 5], "forward_options": {"tls": "maybe", "pool_sise": 1}}),
            "",
        ));
        assert_eq!(errors.len(), 4, "{errors:#?}");
        assert!(errors[0].starts_with("forward_to[1]: \"mx.example\": expected \"smtp://HOST[:PORT]\""), "{errors:#?}");
        assert_eq!(errors[1], "forward_to[2]: expected an upstream URL, got the number 5");
        let tls = "forward_options.tls: expected one of \"none\", \"opportunistic\", \"required\", \"verify\"";
        assert!(errors[2].starts_with(tls), "{errors:#?}");
        assert!(
            errors[3].starts_with("forward_options.pool_sise: unknown parameter; did you mean pool_size?"),
            "{errors:#?}"
        );
        let top = json!({"forward_to": ["lmtp://127.0.0.1:24"], "forward_options": {"tls": "none", "pool_size": 3},
            "via": {"192.0.2.2": {"forward_options": {"pool_size": 7}}}});
        let params = parse_overrides(&top, "").unwrap();
        let mut merged = Params::default();
        let shared = merged.forward_options.clone();
        merged.apply(&params, "192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        assert!(merged.forward_to[0].lmtp);
        let options = &merged.forward_options;
        assert_eq!((options.tls, options.pool_size, options.backoff), (ForwardTls::None, 7, Duration::from_secs(30)));
        assert_eq!(*shared, ForwardOptions::default(), "the defaults are not changed by a merge");
    }

    #[test]
    fn every_known_key_is_a_row_that_parses() {
        let valid = json!({
            "hostname": "mx", "banner": "b", "relay_hosts": ["10.0.0.0/8"], "client_timeout": 5,
            "data_processing_timeout": "1m", "max_message_size": 1, "max_recipients_per_message": 1,
            "max_messages_per_connection": 1, "data_buffer_size": "64 KiB", "body_spill_threshold": "1 MiB",
            "line_length_hard_limit": 510,
            "invalid_line_endings": "Allow", "meta": {"a": 1}, "peer": {"10.0.0.1": {}}, "via": {"::1": {}},
            "batch_handling": "BatchByDomain", "trace_headers": {"received_header": false},
            "tls_certificate": "c.pem", "tls_private_key": "k.pem", "tls_required_client_ca": {"key_data": "PEM"},
            "allow_xclient": true, "require_proxy_protocol": true, "max_connections_per_client": 5,
            "max_connection_rate_per_client": "30/minute", "max_message_rate_per_client": "100/hour",
            "forward_to": ["smtp://mx.example", "lmtp:/run/lmtp"],
            "forward_options": {"tls": "verify", "tls_ca": "ca.pem", "connect_timeout": 1, "pool_size": 4},
            "max_auth_failures_per_client": "5/hour", "client_ipv6_prefix_length": 64,
            "max_spilled_bytes_per_client": "50 MiB", "max_data_duration": "5 minutes",
            "authentication": {"spf": "enforce", "dkim": "annotate"},
        });
        let mut keys: Vec<&str> = valid.as_object().unwrap().keys().map(String::as_str).collect();
        let mut known = ANYWHERE.to_vec();
        keys.sort_unstable();
        known.sort_unstable();
        assert_eq!(keys, known, "a sample value for every parameter");
        let params = parse_overrides(&valid, "").unwrap();
        let mut default = GenericParams::default();
        for (key, value) in valid.as_object().unwrap() {
            let row = default.parse_field(key, value, key, &mut Errors::default());
            assert_eq!(row, !["peer", "via"].contains(&key.as_str()), "{key}");
        }
        assert_eq!((params.peer.len(), params.via.len()), (1, 1));
        let top = json!({
            "listen": "[::]:25", "max_connections": 1, "implicit_tls": true, "protocol": "lmtp",
            "body_memory_limit": "2 GiB", "body_spool_path": "/var/spool/bodies",
        });
        let config = parse_listener_config(&top).unwrap();
        assert_eq!((config.listen.as_str(), config.max_connections, config.implicit_tls), ("[::]:25", 1, true));
        assert_eq!(config.protocol, Protocol::Lmtp);
        assert_eq!(config.body_memory_limit, 2 << 30);
        assert_eq!(config.body_spool_path, Some(PathBuf::from("/var/spool/bodies")));
        assert_eq!(top.as_object().unwrap().len(), TOP_LEVEL_ONLY.len());
        assert_eq!(errors_of(parse_overrides(&top, "")).len(), TOP_LEVEL_ONLY.len());
    }

    #[test]
    fn listener_domain_results() {
        let found = parse_listener_domain(&json!({"relay_to": true, "relay_from": ["10.0.0.0/8"], "log_oob": true}));
        let found = found.unwrap();
        assert!(found.relay_to && found.relay_from.contains(ip("10.1.2.3")) && !found.relay_from.contains(ip("::1")));
        let bad = json!({"relay_to": "yes", "relay_from": ["10.0.0.1/8", 5], "relay": 1});
        assert_eq!(
            errors_of(parse_listener_domain(&bad)),
            [
                "relay_to: expected true or false, got the string \"yes\"",
                "relay_from[0]: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?",
                "relay_from[1]: expected an IP address or CIDR, got the number 5",
                "relay: unknown get_listener_domain key",
            ]
        );
        assert_eq!(
            errors_of(parse_listener_domain(&json!(["x"]))),
            ["get_listener_domain handlers must return None or a dict"]
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
