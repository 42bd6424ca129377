//! Where forwarded mail goes: the `forward_to` URLs and the TLS the client
//! asks of an upstream. Pure logic.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// One entry of `forward_to`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Upstream {
    /// As written (normalised), for logs, metrics and the policy.
    pub url: Arc<str>,
    pub lmtp: bool,
    pub address: UpstreamAddress,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum UpstreamAddress {
    /// A host name or an IP address (without brackets), and a port.
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

const EXPECTED: &str = "expected \"smtp://HOST[:PORT]\", \"lmtp://HOST:PORT\" or \"lmtp:/absolute/path.sock\"";

/// `smtp://HOST[:PORT]` (port 25 by default), `lmtp://HOST:PORT` or
/// `lmtp:/absolute/path.sock`; an IPv6 address in brackets.
pub fn parse_upstream(text: &str) -> Result<Upstream, String> {
    let bad = || format!("{text:?}: {EXPECTED}");
    let (scheme, rest) = text.split_once(':').ok_or_else(bad)?;
    let lmtp = match scheme.to_ascii_lowercase().as_str() {
        "smtp" => false,
        "lmtp" => true,
        _ => return Err(bad()),
    };
    if let Some(path) = rest.strip_prefix('/').filter(|path| lmtp && !path.starts_with('/')) {
        let path = PathBuf::from(format!("/{path}"));
        return Ok(Upstream {
            url: format!("lmtp:{}", path.display()).into(),
            lmtp,
            address: UpstreamAddress::Unix(path),
        });
    }
    let authority = rest.strip_prefix("//").filter(|a| !a.is_empty() && !a.contains('/')).ok_or_else(bad)?;
    let (host, port) = split_host_port(authority).ok_or_else(bad)?;
    let port = match (port, lmtp) {
        (Some(port), _) => port,
        (None, false) => 25,
        (None, true) => return Err(format!("{text:?}: an LMTP upstream needs a port (lmtp://HOST:PORT)")),
    };
    let shown = if host.contains(':') { format!("[{host}]") } else { host.clone() };
    let url = format!("{}://{shown}:{port}", if lmtp { "lmtp" } else { "smtp" });
    Ok(Upstream { url: url.into(), lmtp, address: UpstreamAddress::Tcp { host, port } })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']')?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':')?),
        };
        (host, port)
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let valid = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
    if !valid {
        return None;
    }
    let port = match port {
        Some(port) => Some(port.parse::<u16>().ok().filter(|&port| port > 0)?),
        None => None,
    };
    Some((host.to_owned(), port))
}

/// What the forwarding client asks of an upstream's TLS (Postfix's
/// `smtp_tls_security_level`: none, may, encrypt, secure).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ForwardTls {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, the certificate not checked; plain otherwise.
    #[default]
    Opportunistic,
    /// STARTTLS or no delivery; the certificate not checked.
    Required,
    /// STARTTLS with a certificate for the upstream's host name, issued by
    /// `forward_tls_ca`.
    Verify,
}

impl ForwardTls {
    pub const NAMES: [&'static str; 4] = ["none", "opportunistic", "required", "verify"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "none" => Some(ForwardTls::None),
            "opportunistic" => Some(ForwardTls::Opportunistic),
            "required" => Some(ForwardTls::Required),
            "verify" => Some(ForwardTls::Verify),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(text: &str) -> (String, bool, String, u16) {
        let upstream = parse_upstream(text).unwrap();
        match upstream.address {
            UpstreamAddress::Tcp { host, port } => (upstream.url.to_string(), upstream.lmtp, host, port),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn smtp_and_lmtp_urls() {
        assert_eq!(tcp("smtp://mx.example"), ("smtp://mx.example:25".into(), false, "mx.example".into(), 25));
        assert_eq!(tcp("SMTP://10.0.0.1:2525"), ("smtp://10.0.0.1:2525".into(), false, "10.0.0.1".into(), 2525));
        assert_eq!(tcp("lmtp://127.0.0.1:24"), ("lmtp://127.0.0.1:24".into(), true, "127.0.0.1".into(), 24));
        assert_eq!(tcp("smtp://[::1]:26"), ("smtp://[::1]:26".into(), false, "::1".into(), 26));
        assert_eq!(tcp("smtp://[2001:db8::1]"), ("smtp://[2001:db8::1]:25".into(), false, "2001:db8::1".into(), 25));
        let unix = parse_upstream("lmtp:/run/dovecot/lmtp").unwrap();
        assert_eq!(unix.address, UpstreamAddress::Unix("/run/dovecot/lmtp".into()));
        assert_eq!(&*unix.url, "lmtp:/run/dovecot/lmtp");
    }

    #[test]
    fn bad_urls_say_what_is_expected() {
        for bad in [
            "mx.example",
            "http://x",
            "smtp:/path",
            "smtp://",
            "smtp://x:0",
            "smtp://x:99999",
            "smtp://x/y",
            "smtp://[::1",
            "smtp://[nothost]:25",
            "lmtp://x",
            "lmtp:relative",
            "lmtp://",
            "smtp://a b",
        ] {
            let error = parse_upstream(bad).unwrap_err();
            assert!(error.starts_with(&format!("{bad:?}: ")), "{bad}: {error}");
        }
        assert!(parse_upstream("lmtp://x").unwrap_err().contains("needs a port"));
    }
}
