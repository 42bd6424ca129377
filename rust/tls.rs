//! TLS identities for STARTTLS and implicit TLS: a rustls server
//! configuration per effective (certificate, key, client CA), or a
//! self-signed certificate for the effective hostname when none is set.
//!
//! Configurations are cached by the PEM *contents* they were built from, so
//! a certificate rewritten in place, or a dynamic result naming another
//! file, takes effect on the next connection, while 10,000 connections to
//! one virtual host share one configuration. Files are not read again while
//! they keep their stamp (device, inode, size, modification and change
//! times): a handshake then costs a `stat` per file, on the session's own
//! thread. A file changed in the last two seconds is read every time, since
//! a second change within the file system's timestamp granularity would
//! keep the stamp.

use crate::cidr::cidr_key;
use crate::params::{key_path, GenericParams, KeySource, ParamError, Params};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// KumoMTA's choice: built configurations live five minutes.
pub const CACHE_TTL: Duration = Duration::from_secs(300);
pub const CACHE_CAPACITY: usize = 1024;

/// Where a connection's identity comes from, as its merged parameters say.
#[derive(Clone, Debug)]
pub struct TlsIdentity {
    pub hostname: String,
    pub certificate: Option<KeySource>,
    pub private_key: Option<KeySource>,
    pub client_ca: Option<KeySource>,
}

impl TlsIdentity {
    pub fn of(params: &Params) -> Self {
        Self {
            hostname: params.hostname.clone(),
            certificate: params.tls_certificate.clone(),
            private_key: params.tls_private_key.clone(),
            client_ca: params.tls_required_client_ca.clone(),
        }
    }
}

/// The PEM data an identity is built from: the cache key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Material {
    /// Only for a self-signed certificate: a configured one does not depend on it.
    hostname: Option<String>,
    certificate: Option<Pem>,
    private_key: Option<Pem>,
    client_ca: Option<Pem>,
}

type Pem = Arc<[u8]>;

impl Material {
    /// Reads what `files` does not know (or cannot vouch for) from disk.
    fn load(identity: &TlsIdentity, files: &FileCache) -> Result<Self, String> {
        Self::assemble(identity, |source| match source {
            KeySource::File(path) => files.read(path),
            KeySource::Data(pem) => Ok(pem.as_bytes().into()),
        })
    }

    /// `None` unless every file is known to `files` and unchanged: no read.
    fn known(identity: &TlsIdentity, files: &FileCache) -> Option<Self> {
        Self::assemble(identity, |source| match source {
            KeySource::File(path) => files.known(path).ok_or(()),
            KeySource::Data(pem) => Ok(pem.as_bytes().into()),
        })
        .ok()
    }

    fn assemble<E>(identity: &TlsIdentity, mut pem: impl FnMut(&KeySource) -> Result<Pem, E>) -> Result<Self, E> {
        let mut load = |source: &Option<KeySource>| source.as_ref().map(&mut pem).transpose();
        let certificate = load(&identity.certificate)?;
        Ok(Self {
            hostname: certificate.is_none().then(|| identity.hostname.clone()),
            certificate,
            private_key: load(&identity.private_key)?,
            client_ca: load(&identity.client_ca)?,
        })
    }
}

fn read(source: &KeySource) -> Result<Vec<u8>, String> {
    match source {
        KeySource::File(path) => std::fs::read(path).map_err(|e| cannot_read(path, &e)),
        KeySource::Data(pem) => Ok(pem.as_bytes().to_vec()),
    }
}

fn cannot_read(path: &Path, error: &std::io::Error) -> String {
    format!("cannot read {}: {error}", path.display())
}

/// What a file was when read: writing it changes at least one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    device: u64,
    inode: u64,
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

/// Files changed this recently are read every time (see the module's notes).
const SETTLING_TIME: Duration = Duration::from_secs(2);

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            device: meta.dev(),
            inode: meta.ino(),
            len: meta.len(),
            modified: (meta.mtime(), meta.mtime_nsec()),
            changed: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// Whether the inode last changed more than `settling` before `now`
    /// (the change time, unlike the modification time, can't be set back).
    fn settled(&self, now: SystemTime, settling: Duration) -> bool {
        let (seconds, nanos) = self.changed;
        let (Ok(seconds), Ok(nanos)) = (u64::try_from(seconds), u32::try_from(nanos)) else {
            return false;
        };
        let changed = UNIX_EPOCH + Duration::new(seconds, nanos);
        now.duration_since(changed).is_ok_and(|age| age > settling)
    }
}

/// PEM files read before, kept while their stamp stays the same.
struct FileCache {
    capacity: usize,
    settling: Duration,
    files: Mutex<HashMap<PathBuf, (FileStamp, Pem)>>,
}

impl FileCache {
    fn new(capacity: usize, settling: Duration) -> Self {
        Self { capacity, settling, files: Mutex::default() }
    }

    /// The contents of `path` if it was read before and has not changed since: one `stat`.
    fn known(&self, path: &Path) -> Option<Pem> {
        let stamp = FileStamp::of(path).ok()?;
        let files = lock(&self.files);
        let (known, contents) = files.get(path)?;
        (*known == stamp).then(|| contents.clone())
    }

    /// Read `path`, and keep its contents unless it changed too recently to vouch for.
    fn read(&self, path: &Path) -> Result<Pem, String> {
        let stamp = FileStamp::of(path).map_err(|e| cannot_read(path, &e))?;
        let contents: Pem = std::fs::read(path).map_err(|e| cannot_read(path, &e))?.into();
        if stamp.settled(SystemTime::now(), self.settling) {
            let mut files = lock(&self.files);
            if files.len() >= self.capacity && !files.contains_key(path) {
                files.clear();
            }
            files.insert(path.to_owned(), (stamp, contents.clone()));
        }
        Ok(contents)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A built identity: the configuration to hand to rustls, and the verifier
/// that tells whether a client certificate comes from `tls_required_client_ca`.
#[derive(Clone)]
pub struct ServerIdentity {
    pub config: Arc<ServerConfig>,
    client_ca: Option<Arc<dyn ClientCertVerifier>>,
}

impl ServerIdentity {
    /// The subject of the client's certificate when it chains to the
    /// configured client CA; `None` when absent, untrusted or not asked for.
    pub fn trusted_peer_subject(&self, chain: &[CertificateDer<'_>]) -> Option<String> {
        let verifier = self.client_ca.as_ref()?;
        let (end_entity, intermediates) = chain.split_first()?;
        verifier.verify_client_cert(end_entity, intermediates, UnixTime::now()).ok()?;
        let (_, certificate) = x509_parser::parse_x509_certificate(end_entity).ok()?;
        Some(certificate.subject().to_string())
    }
}

struct Entry {
    identity: ServerIdentity,
    built: Instant,
    used: Instant,
}

/// Built identities by the material they came from; least recently used
/// entries go first when full, and none outlives its time to live.
pub struct TlsCache {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<Material, Entry>>,
    files: FileCache,
}

impl TlsCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self::with_settling_time(ttl, capacity, SETTLING_TIME)
    }

    fn with_settling_time(ttl: Duration, capacity: usize, settling: Duration) -> Self {
        let capacity = capacity.max(1);
        Self { ttl, capacity, entries: Mutex::default(), files: FileCache::new(capacity, settling) }
    }

    /// The configuration for `wanted` if it is cached and none of its files
    /// has to be read: a `stat` per file, fit for the session's thread.
    pub fn cached(&self, wanted: &TlsIdentity) -> Option<ServerIdentity> {
        self.lookup(&Material::known(wanted, &self.files)?, Instant::now())
    }

    /// The configuration for `wanted`, built if not cached. Reads files and
    /// may build: call it off the async executor.
    pub fn identity(&self, wanted: &TlsIdentity) -> Result<ServerIdentity, String> {
        self.identity_at(wanted, Instant::now())
    }

    fn identity_at(&self, wanted: &TlsIdentity, now: Instant) -> Result<ServerIdentity, String> {
        let material = Material::load(wanted, &self.files)?;
        if let Some(hit) = self.lookup(&material, now) {
            return Ok(hit);
        }
        // Built outside the lock: a slow build must not stall other handshakes.
        let identity = build(&material)?;
        self.insert(material, identity.clone(), now);
        Ok(identity)
    }

    /// The PEM text of `source`: a file not read again while unchanged.
    pub fn pem(&self, source: &KeySource) -> Result<Arc<[u8]>, String> {
        match source {
            KeySource::File(path) => self.files.known(path).map_or_else(|| self.files.read(path), Ok),
            KeySource::Data(pem) => Ok(pem.as_bytes().into()),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, material: &Material, now: Instant) -> Option<ServerIdentity> {
        let mut entries = self.lock();
        let entry = entries.get_mut(material)?;
        if now.duration_since(entry.built) >= self.ttl {
            entries.remove(material);
            return None;
        }
        entry.used = now;
        Some(entry.identity.clone())
    }

    fn insert(&self, material: Material, identity: ServerIdentity, now: Instant) {
        let mut entries = self.lock();
        entries.retain(|_, entry| now.duration_since(entry.built) < self.ttl);
        while entries.len() >= self.capacity {
            let Some(oldest) = entries.iter().min_by_key(|(_, entry)| entry.used).map(|(key, _)| key.clone()) else {
                break;
            };
            entries.remove(&oldest);
        }
        entries.insert(material, Entry { identity, built: now, used: now });
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Material, Entry>> {
        lock(&self.entries)
    }
}

/// ring's suites, TLS_AES_128_GCM_SHA256 first: every TLS 1.3 client has it,
/// and SHA-256 runs on the CPU's SHA extensions where SHA-384 (of the
/// AES-256 suite clients tend to prefer) has none: on this project's
/// machines, 8% of a handshake's CPU time went to SHA-384.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

fn build(material: &Material) -> Result<ServerIdentity, String> {
    let (chain, key) = match (&material.certificate, &material.private_key) {
        (Some(certificate), Some(key)) => (certificates(certificate)?, private_key(key)?),
        (None, None) => self_signed(material.hostname.as_deref().unwrap_or("localhost"))?,
        (Some(_), None) => return Err("tls_certificate is set but tls_private_key is not".into()),
        (None, Some(_)) => return Err("tls_private_key is set but tls_certificate is not".into()),
    };
    let client_ca = material.client_ca.as_deref().map(client_ca_verifier).transpose()?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| e.to_string())?;
    let builder = match &client_ca {
        Some(trusted) => builder.with_client_cert_verifier(Arc::new(AnyClientCertificate::new(trusted.clone()))),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("the private key does not fit the certificate: {e}"))?;
    // Our order of suites (see `provider`), not the client's.
    config.ignore_client_order = true;
    Ok(ServerIdentity { config: Arc::new(config), client_ca })
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    if chain.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(chain)
}

fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("not a PEM private key: {e}"))
}

fn client_ca_verifier(pem: &[u8]) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(pem)? {
        roots.add(certificate).map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| format!("not a usable CA certificate: {e}"))
}

fn self_signed(hostname: &str) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let failed = |e: rcgen::Error| format!("cannot make a self-signed certificate for {hostname:?}: {e}");
    let mut params = rcgen::CertificateParams::new(vec![hostname.to_owned()]).map_err(failed)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, hostname);
    let key = rcgen::KeyPair::generate().map_err(failed)?;
    let certificate = params.self_signed(&key).map_err(failed)?;
    let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| e.to_string())?;
    Ok((vec![certificate.der().clone()], key))
}

/// Asks for a client certificate and accepts any (the session is never
/// refused for it, as KumoMTA does), while still checking that the client
/// holds its key. Whether the certificate is trusted is decided after the
/// handshake by [`ServerIdentity::trusted_peer_subject`].
#[derive(Debug)]
struct AnyClientCertificate {
    trusted: Arc<dyn ClientCertVerifier>,
    provider: Arc<CryptoProvider>,
}

impl AnyClientCertificate {
    fn new(trusted: Arc<dyn ClientCertVerifier>) -> Self {
        Self { trusted, provider: provider() }
    }
}

impl ClientCertVerifier for AnyClientCertificate {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.trusted.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
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

/// Check every TLS file or PEM text in parsed static parameters (top level
/// and every `peer`/`via` block), so a bad certificate fails at start-up with
/// its key path rather than at the first STARTTLS.
pub fn check_static(params: &GenericParams, path: &str) -> Vec<ParamError> {
    let mut errors = Vec::new();
    check_level(params, path, &mut errors);
    errors
}

fn check_level(params: &GenericParams, path: &str, errors: &mut Vec<ParamError>) {
    let mut load = |key: &str, source: &Option<KeySource>, check: fn(&[u8]) -> Result<(), String>| -> Option<Pem> {
        let checked = read(source.as_ref()?).and_then(|pem| check(&pem).map(|()| Pem::from(pem)));
        checked.map_err(|message| errors.push(ParamError { path: key_path(path, key), message })).ok()
    };
    let certificate = load("tls_certificate", &params.tls_certificate, |pem| certificates(pem).map(drop));
    let private_key = load("tls_private_key", &params.tls_private_key, |pem| private_key(pem).map(drop));
    load("tls_required_client_ca", &params.tls_required_client_ca, |pem| client_ca_verifier(pem).map(drop));
    if let (Some(certificate), Some(private_key)) = (certificate, private_key) {
        let pair = Material {
            hostname: None,
            certificate: Some(certificate),
            private_key: Some(private_key),
            client_ca: None,
        };
        if let Err(message) = build(&pair) {
            errors.push(ParamError { path: key_path(path, "tls_private_key"), message });
        }
    }
    for (kind, blocks) in [("peer", &params.peer), ("via", &params.via)] {
        for (net, block) in blocks.iter() {
            check_level(block, &format!("{}.'{}'", key_path(path, kind), cidr_key(net)), errors);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    fn identity(hostname: &str) -> TlsIdentity {
        TlsIdentity { hostname: hostname.into(), certificate: None, private_key: None, client_ca: None }
    }

    fn pem_pair(hostname: &str) -> (String, String) {
        let generated = rcgen::generate_simple_self_signed(vec![hostname.to_owned()]).unwrap();
        (generated.cert.pem(), generated.signing_key.serialize_pem())
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kumo-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_second_connection_to_the_same_identity_reuses_the_configuration() {
        let cache = TlsCache::new(CACHE_TTL, 8);
        let first = cache.identity(&identity("mx.one.example")).unwrap();
        let again = cache.identity(&identity("mx.one.example")).unwrap();
        assert!(Arc::ptr_eq(&first.config, &again.config));
        let other = cache.identity(&identity("mx.two.example")).unwrap();
        assert!(!Arc::ptr_eq(&first.config, &other.config));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn entries_expire_after_their_time_to_live() {
        let cache = TlsCache::new(Duration::from_secs(60), 8);
        let start = Instant::now();
        let first = cache.identity_at(&identity("mx.example"), start).unwrap();
        let within = cache.identity_at(&identity("mx.example"), start + Duration::from_secs(59)).unwrap();
        assert!(Arc::ptr_eq(&first.config, &within.config));
        let after = cache.identity_at(&identity("mx.example"), start + Duration::from_secs(61)).unwrap();
        assert!(!Arc::ptr_eq(&first.config, &after.config));
    }

    #[test]
    fn rewriting_a_file_in_place_builds_a_new_configuration() {
        let dir = scratch("reload");
        let (certificate, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let wanted = TlsIdentity {
            certificate: Some(KeySource::File(certificate.clone())),
            private_key: Some(KeySource::File(key.clone())),
            ..identity("ignored.example")
        };
        let cache = TlsCache::new(CACHE_TTL, 8);
        for round in 0..2 {
            let (cert_pem, key_pem) = pem_pair(&format!("round{round}.example"));
            std::fs::write(&certificate, cert_pem).unwrap();
            std::fs::write(&key, key_pem).unwrap();
            let built = cache.identity(&wanted).unwrap();
            assert!(Arc::ptr_eq(&built.config, &cache.identity(&wanted).unwrap().config));
        }
        assert_eq!(cache.len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn files_are_not_read_again_once_settled_until_their_stamp_changes() {
        let dir = scratch("settled");
        let (certificate, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let wanted = TlsIdentity {
            certificate: Some(KeySource::File(certificate.clone())),
            private_key: Some(KeySource::File(key.clone())),
            ..identity("ignored.example")
        };
        let write = |hostname: &str| {
            let (cert_pem, key_pem) = pem_pair(hostname);
            std::fs::write(&certificate, cert_pem).unwrap();
            std::fs::write(&key, key_pem).unwrap();
        };
        // Just written: the stamp can't be vouched for, so the files are read each time.
        write("fresh.example");
        let unsettled = TlsCache::new(CACHE_TTL, 8);
        unsettled.identity(&wanted).unwrap();
        assert!(unsettled.cached(&wanted).is_none());
        // Settled at once: known from a stat until rewritten.
        let cache = TlsCache::with_settling_time(CACHE_TTL, 8, Duration::ZERO);
        let first = cache.identity(&wanted).unwrap();
        let known = cache.cached(&wanted).expect("settled files are known");
        assert!(Arc::ptr_eq(&first.config, &known.config));
        // Another length: the stamp differs even within one timestamp tick.
        write("renewed.longer.example");
        assert!(cache.cached(&wanted).is_none());
        let renewed = cache.identity(&wanted).unwrap();
        assert!(!Arc::ptr_eq(&first.config, &renewed.config));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_cache_is_bounded_and_evicts_the_least_recently_used() {
        let cache = TlsCache::new(CACHE_TTL, 2);
        let start = Instant::now();
        let later = |seconds| start + Duration::from_secs(seconds);
        let one = cache.identity_at(&identity("one.example"), later(0)).unwrap();
        cache.identity_at(&identity("two.example"), later(1)).unwrap();
        cache.identity_at(&identity("one.example"), later(2)).unwrap();
        cache.identity_at(&identity("three.example"), later(3)).unwrap();
        assert_eq!(cache.len(), 2);
        let one_again = cache.identity_at(&identity("one.example"), later(4)).unwrap();
        assert!(Arc::ptr_eq(&one.config, &one_again.config), "two.example should have been evicted, not one");
    }

    #[test]
    fn bad_material_is_an_error_not_a_panic() {
        let cache = TlsCache::new(CACHE_TTL, 8);
        let (certificate, _) = pem_pair("a.example");
        let (_, other_key) = pem_pair("b.example");
        let cases = [
            (Some(KeySource::File("/nonexistent/cert.pem".into())), None, "cannot read /nonexistent/cert.pem"),
            (Some(KeySource::Data("garbage".into())), Some(KeySource::Data("garbage".into())), "no PEM certificate"),
            (Some(KeySource::Data(certificate.clone())), None, "tls_private_key is not"),
            (Some(KeySource::Data(certificate)), Some(KeySource::Data(other_key)), "does not fit"),
        ];
        for (certificate, private_key, expected) in cases {
            let wanted = TlsIdentity { certificate, private_key, ..identity("x.example") };
            let error = cache.identity(&wanted).err().unwrap();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
        assert!(cache.is_empty());
    }

    #[test]
    fn static_check_names_the_key_path() {
        let (certificate, key) = pem_pair("a.example");
        let (_, other_key) = pem_pair("b.example");
        let value = json!({
            "tls_certificate": {"key_data": certificate},
            "tls_private_key": {"key_data": key},
            "via": {"10.0.0.1": {"tls_certificate": {"key_data": certificate}, "tls_private_key": {"key_data": other_key}}},
            "peer": {"10.0.0.0/8": {"tls_required_client_ca": "/nonexistent/ca.pem"}},
        });
        let params = crate::params::parse_overrides(&value, "").unwrap();
        let errors: Vec<String> = check_static(&params, "").iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("peer.'10.0.0.0/8'.tls_required_client_ca: cannot read /nonexistent/ca.pem"));
        assert!(errors[1].starts_with("via.'10.0.0.1'.tls_private_key: the private key does not fit"));
    }
}
