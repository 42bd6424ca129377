//! STARTTLS load client of kumo_listener's end-to-end benchmark (`benches/e2e`).
//!
//! Each of `--concurrency` tasks loops over SMTP sessions: TCP connect, read the
//! 220 banner, `EHLO bench`, `STARTTLS`, a full TLS handshake (no resumption),
//! `EHLO bench` over TLS, `QUIT`, read the 221 and wait for the server to close.
//! Sessions go to the `--connect` targets in turn. At the end one JSON line goes
//! to stdout: completed sessions (`handshakes`), `errors`, wall-clock `seconds`,
//! `per_second`, and `subjects`: per target, how many handshakes presented a leaf
//! certificate with each subject common name, which tells whether each local
//! address got its own certificate.
//!
//! Any certificate is accepted (the point is to measure the server, not to
//! check a chain), but the handshake signatures are still verified.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme, SupportedProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const USAGE: &str = "\
usage: starttls-load --connect HOST:PORT[,HOST:PORT...] [--concurrency N]
                     [--seconds S | --count N | --quick] [--timeout S]
                     [--threads N] [--tls-version any|1.2|1.3]

  --connect      targets, used in turn (e.g. 127.0.0.2:2525,127.0.0.3:2525)
  --concurrency  parallel sessions (default 32)
  --seconds      start sessions for this long (default 5)
  --count        run exactly this many sessions instead
  --quick        --count 64 (unless --count or --seconds is given)
  --timeout      seconds one whole session may take (default 10)
  --threads      tokio worker threads (default: the number of CPUs)
  --tls-version  protocol versions offered (default any: TLS 1.3 and 1.2)";

static TLS12_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];
static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Distinct error messages kept; the rest are counted under one key.
const MAX_ERROR_KINDS: usize = 20;
/// A reply longer than this is an error (the server is not speaking SMTP).
const MAX_REPLY_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy, Debug)]
enum Limit {
    Seconds(f64),
    Count(u64),
}

#[derive(Debug)]
struct Options {
    targets: Vec<SocketAddr>,
    concurrency: usize,
    limit: Limit,
    timeout: Duration,
    threads: usize,
    versions: &'static [&'static SupportedProtocolVersion],
}

fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut targets = Vec::new();
    let mut concurrency = 32;
    let mut seconds = None;
    let mut count = None;
    let mut quick = false;
    let mut timeout = 10.0;
    let mut threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut versions = rustls::DEFAULT_VERSIONS;
    while let Some(flag) = args.next() {
        if flag == "--quick" {
            quick = true;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |what: &str| format!("{flag}: {what}: {value:?}");
        match flag.as_str() {
            "--connect" => {
                for target in value.split(',').filter(|t| !t.is_empty()) {
                    targets.push(target.parse().map_err(|_| bad("not an IP:PORT"))?);
                }
            }
            "--concurrency" => concurrency = value.parse().map_err(|_| bad("not a number"))?,
            "--seconds" => seconds = Some(value.parse::<f64>().map_err(|_| bad("not a number"))?),
            "--count" => count = Some(value.parse().map_err(|_| bad("not a number"))?),
            "--timeout" => timeout = value.parse().map_err(|_| bad("not a number"))?,
            "--threads" => threads = value.parse().map_err(|_| bad("not a number"))?,
            "--tls-version" => {
                versions = match value.as_str() {
                    "any" => rustls::DEFAULT_VERSIONS,
                    "1.2" => TLS12_ONLY,
                    "1.3" => TLS13_ONLY,
                    _ => return Err(bad("not any, 1.2 or 1.3")),
                }
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if targets.is_empty() {
        return Err("--connect is required".into());
    }
    let limit = match (seconds, count) {
        (Some(_), Some(_)) => return Err("give --seconds or --count, not both".into()),
        (_, Some(count)) => Limit::Count(count),
        (Some(seconds), None) if seconds.is_finite() && seconds > 0.0 => Limit::Seconds(seconds),
        (Some(_), None) => return Err("--seconds must be positive".into()),
        (None, None) if quick => Limit::Count(64),
        (None, None) => Limit::Seconds(5.0),
    };
    if concurrency == 0 || threads == 0 || !(timeout > 0.0 && f64::is_finite(timeout)) {
        return Err("--concurrency, --threads and --timeout must be positive".into());
    }
    let timeout = Duration::from_secs_f64(timeout);
    Ok(Options { targets, concurrency, limit, timeout, threads, versions })
}

/// Accepts any server certificate, but checks that the server signed the
/// handshake with the key of the certificate it presented.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, certificate, signature, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, certificate, signature, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config(versions: &[&'static SupportedProtocolVersion]) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
        .with_no_client_auth();
    // Every handshake a full one: no session IDs, tickets or PSKs.
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The (last) common name in an X.509 certificate's subject, if any.
fn subject_common_name(certificate: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate).ok()?;
    let common_name = parsed.subject().iter_common_name().last()?;
    common_name.as_str().ok().map(str::to_owned)
}

/// SMTP over a plain or TLS stream: commands out, replies in.
struct Smtp<S> {
    stream: S,
    buffer: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Smtp<S> {
    fn new(stream: S) -> Self {
        Self { stream, buffer: Vec::with_capacity(1024) }
    }

    /// Read one whole (possibly multi-line) reply; fail unless its code is `expected`.
    async fn expect(&mut self, expected: u16, what: &str) -> Result<(), String> {
        let mut scanned = 0;
        loop {
            while let Some(end) = self.buffer[scanned..].windows(2).position(|pair| pair == b"\r\n") {
                let line = &self.buffer[scanned..scanned + end];
                scanned += end + 2;
                let code = line.get(..3).and_then(|code| std::str::from_utf8(code).ok()?.parse::<u16>().ok());
                let last = match line.get(3) {
                    None | Some(b' ') => true,
                    Some(b'-') => false,
                    Some(_) => return Err(format!("{what}: malformed reply line")),
                };
                if code != Some(expected) {
                    let text = String::from_utf8_lossy(line);
                    return Err(format!("{what}: expected {expected}, got {:?}", text.trim_end()));
                }
                if last {
                    self.buffer.drain(..scanned);
                    return Ok(());
                }
            }
            if self.buffer.len() > MAX_REPLY_BYTES {
                return Err(format!("{what}: reply longer than {MAX_REPLY_BYTES} bytes"));
            }
            let mut chunk = [0u8; 4096];
            let read = self.stream.read(&mut chunk).await.map_err(|e| format!("{what}: read: {}", e.kind()))?;
            if read == 0 {
                return Err(format!("{what}: connection closed before the reply"));
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    async fn command(&mut self, line: &[u8], expected: u16, what: &str) -> Result<(), String> {
        self.stream.write_all(line).await.map_err(|e| format!("{what}: write: {}", e.kind()))?;
        self.expect(expected, what).await
    }

    /// After 221 the server closes first (so that TIME_WAIT stays on its side);
    /// anything it sends meanwhile is an error.
    async fn wait_for_close(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 512];
        match self.stream.read(&mut chunk).await {
            Ok(0) => Ok(()),
            Ok(_) => Err("after 221: unexpected data".into()),
            // A peer that closes without close_notify: the session was complete.
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(error) => Err(format!("after 221: read: {}", error.kind())),
        }
    }

    /// The stream, when the server sent nothing beyond the last reply.
    fn into_inner(self, what: &str) -> Result<S, String> {
        if self.buffer.is_empty() {
            Ok(self.stream)
        } else {
            Err(format!("{what}: {} unexpected bytes after the reply", self.buffer.len()))
        }
    }
}

/// What one completed session saw.
struct Outcome {
    common_name: String,
    protocol: String,
}

async fn session(target: SocketAddr, connector: &TlsConnector) -> Result<Outcome, String> {
    let tcp = TcpStream::connect(target).await.map_err(|e| format!("connect: {}", e.kind()))?;
    tcp.set_nodelay(true).map_err(|e| format!("TCP_NODELAY: {}", e.kind()))?;
    let mut plain = Smtp::new(tcp);
    plain.expect(220, "banner").await?;
    plain.command(b"EHLO bench\r\n", 250, "EHLO").await?;
    plain.command(b"STARTTLS\r\n", 220, "STARTTLS").await?;
    let tcp = plain.into_inner("STARTTLS")?;
    // An IP address as the server name: rustls sends no SNI, so the server can
    // only choose its certificate by the address the client reached.
    let name = ServerName::IpAddress(target.ip().into());
    let tls = connector.connect(name, tcp).await.map_err(|e| format!("TLS handshake: {e}"))?;
    let (_, connection) = tls.get_ref();
    let leaf = connection.peer_certificates().and_then(|chain| chain.first());
    let common_name = match leaf {
        None => "(no certificate)".to_string(),
        Some(leaf) => subject_common_name(leaf).unwrap_or_else(|| "(no common name)".into()),
    };
    let version = connection.protocol_version().map_or("?".into(), |v| format!("{v:?}"));
    let suite = connection.negotiated_cipher_suite().map_or("?".into(), |s| format!("{:?}", s.suite()));
    let protocol = format!("{version} {suite}");
    let mut secure = Smtp::new(tls);
    secure.command(b"EHLO bench\r\n", 250, "EHLO over TLS").await?;
    secure.command(b"QUIT\r\n", 221, "QUIT").await?;
    secure.wait_for_close().await?;
    Ok(Outcome { common_name, protocol })
}

#[derive(Default)]
struct Stats {
    handshakes: u64,
    errors: u64,
    subjects: BTreeMap<String, BTreeMap<String, u64>>,
    protocols: BTreeMap<String, u64>,
    error_kinds: BTreeMap<String, u64>,
}

impl Stats {
    fn success(&mut self, target: SocketAddr, outcome: Outcome) {
        self.handshakes += 1;
        let seen = self.subjects.entry(target.to_string()).or_default();
        *seen.entry(outcome.common_name).or_default() += 1;
        *self.protocols.entry(outcome.protocol).or_default() += 1;
    }

    fn error(&mut self, target: SocketAddr, message: String) {
        self.errors += 1;
        self.add_error_kind(format!("{target}: {message}"), 1);
    }

    fn add_error_kind(&mut self, key: String, count: u64) {
        let key = if self.error_kinds.len() >= MAX_ERROR_KINDS && !self.error_kinds.contains_key(&key) {
            "(other errors)".to_string()
        } else {
            key
        };
        *self.error_kinds.entry(key).or_default() += count;
    }

    fn merge(&mut self, other: Stats) {
        self.handshakes += other.handshakes;
        self.errors += other.errors;
        for (target, names) in other.subjects {
            let seen = self.subjects.entry(target).or_default();
            for (name, count) in names {
                *seen.entry(name).or_default() += count;
            }
        }
        for (protocol, count) in other.protocols {
            *self.protocols.entry(protocol).or_default() += count;
        }
        for (kind, count) in other.error_kinds {
            self.add_error_kind(kind, count);
        }
    }
}

struct Shared {
    targets: Vec<SocketAddr>,
    connector: TlsConnector,
    next: AtomicU64,
    limit: Limit,
    deadline: Instant,
    timeout: Duration,
}

async fn worker(shared: Arc<Shared>) -> Stats {
    let mut stats = Stats::default();
    loop {
        let index = shared.next.fetch_add(1, Ordering::Relaxed);
        let done = match shared.limit {
            Limit::Count(count) => index >= count,
            Limit::Seconds(_) => Instant::now() >= shared.deadline,
        };
        if done {
            return stats;
        }
        let target = shared.targets[(index % shared.targets.len() as u64) as usize];
        match tokio::time::timeout(shared.timeout, session(target, &shared.connector)).await {
            Ok(Ok(outcome)) => stats.success(target, outcome),
            Ok(Err(message)) => stats.error(target, message),
            Err(_) => stats.error(target, format!("session timed out after {:?}", shared.timeout)),
        }
    }
}

async fn run(options: &Options) -> Result<(Stats, f64), String> {
    let config = client_config(options.versions).map_err(|e| format!("TLS configuration: {e}"))?;
    let started = Instant::now();
    let seconds = match options.limit {
        Limit::Seconds(seconds) => seconds,
        Limit::Count(_) => 0.0,
    };
    let shared = Arc::new(Shared {
        targets: options.targets.clone(),
        connector: TlsConnector::from(config),
        next: AtomicU64::new(0),
        limit: options.limit,
        deadline: started + Duration::from_secs_f64(seconds),
        timeout: options.timeout,
    });
    let workers: Vec<_> = (0..options.concurrency).map(|_| tokio::spawn(worker(shared.clone()))).collect();
    let mut total = Stats::default();
    for handle in workers {
        total.merge(handle.await.map_err(|e| format!("worker failed: {e}"))?);
    }
    Ok((total, started.elapsed().as_secs_f64()))
}

fn report(options: &Options, stats: &Stats, seconds: f64) -> serde_json::Value {
    let per_second = if seconds > 0.0 { stats.handshakes as f64 / seconds } else { 0.0 };
    let targets: Vec<String> = options.targets.iter().map(SocketAddr::to_string).collect();
    serde_json::json!({
        "handshakes": stats.handshakes,
        "errors": stats.errors,
        "seconds": seconds,
        "per_second": per_second,
        "subjects": stats.subjects,
        "protocols": stats.protocols,
        "error_kinds": stats.error_kinds,
        "targets": targets,
        "concurrency": options.concurrency,
        "threads": options.threads,
    })
}

fn main() -> ExitCode {
    let options = match parse_options(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("starttls-load: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(options.threads).enable_all().build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("starttls-load: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&options)) {
        Ok((stats, seconds)) => {
            println!("{}", report(&options, &stats, seconds));
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("starttls-load: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options() {
        let args = |line: &str| line.split_whitespace().map(String::from).collect::<Vec<_>>().into_iter();
        let options = parse_options(args("--connect 127.0.0.2:25,127.0.0.3:25 --quick")).unwrap();
        assert_eq!(options.targets.len(), 2);
        assert!(matches!(options.limit, Limit::Count(64)));
        assert!(matches!(parse_options(args("--connect 127.0.0.2:25")).unwrap().limit, Limit::Seconds(s) if s == 5.0));
        assert!(parse_options(args("--connect nowhere")).is_err());
        assert!(parse_options(args("--connect 127.0.0.2:25 --count 1 --seconds 1")).is_err());
    }
}
