//! The checks, on the authentication runtime: mail-auth's verifiers with
//! our guards around them, their outputs turned into [`AuthResult`]s.

use super::engine::{self, Resolver};
use super::results::{self, AuthResult};
use crate::body::Body;
use bytes::Bytes;
use mail_auth::common::crypto::Algorithm;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::Policy;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{AuthenticatedMessage, DkimOutput, DkimResult, DmarcResult, IprevResult, SpfOutput, SpfResult};
use std::net::IpAddr;
use std::sync::Arc;

/// The most DKIM signatures checked in one message (KumoMTA documents the
/// same): each costs a lookup and a verification, and a message can carry
/// thousands.
pub const MAX_DKIM_SIGNATURES: usize = 10;

const BUDGET_EXHAUSTED: &str = "DNS budget exhausted";

/// An SPF result: mail-auth's output (DMARC needs it) and ours.
#[derive(Clone, Debug)]
pub struct Spf {
    pub output: SpfOutput,
    pub result: AuthResult,
}

/// Which identity an SPF check authorizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// The HELO name (`postmaster@<helo>`).
    Helo,
    /// The MAIL FROM address; empty for the null sender, which is
    /// `postmaster@<helo>` (RFC 7208 §2.4).
    MailFrom(String),
}

fn resolver_or_temperror(method: &'static str) -> Result<Arc<Resolver>, AuthResult> {
    engine::current().map_err(|error| AuthResult::new(method, "temperror").reason(error))
}

/// SPF (RFC 7208) for `identity`, within the resolver's budget.
pub async fn spf(ip: IpAddr, helo: String, hostname: String, identity: Identity) -> Spf {
    let resolver = match resolver_or_temperror("spf") {
        Ok(resolver) => resolver,
        Err(result) => return Spf { output: SpfOutput::default().with_result(SpfResult::TempError), result },
    };
    let budget = resolver.config.budget;
    let check = async move {
        let verify = async {
            let params = match &identity {
                Identity::Helo => SpfParameters::verify_ehlo(ip, &helo, &hostname),
                Identity::MailFrom(sender) => SpfParameters::verify_mail_from(ip, &helo, &hostname, sender),
            };
            resolver.authenticator.verify_spf(resolver.caches.parameters(params)).await
        };
        let output = tokio::time::timeout(budget, verify).await;
        let timed_out = output.is_err();
        let output = output.unwrap_or_else(|_| SpfOutput::default().with_result(SpfResult::TempError));
        let mut result = spf_result(&output, ip, &helo, &identity);
        if timed_out {
            result = result.reason(BUDGET_EXHAUSTED);
        }
        Spf { output, result }
    };
    engine::run(check).await.unwrap_or_else(|| Spf {
        output: SpfOutput::default().with_result(SpfResult::TempError),
        result: AuthResult::new("spf", "temperror").reason("the check failed"),
    })
}

fn spf_result(output: &SpfOutput, ip: IpAddr, helo: &str, identity: &Identity) -> AuthResult {
    let word = match output.result() {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    };
    let mut result = AuthResult::new("spf", word);
    let domain = output.domain();
    let reason = match output.result() {
        SpfResult::Pass => Some(format!("{domain} designates {ip} as permitted sender")),
        SpfResult::Fail | SpfResult::SoftFail => Some(format!("{domain} does not designate {ip} as permitted sender")),
        SpfResult::None if !domain.is_empty() => Some(format!("{domain} publishes no SPF record")),
        SpfResult::TempError => Some(format!("{domain}: temporary DNS failure")),
        SpfResult::PermError => Some(format!("{domain}: invalid SPF record")),
        _ => None,
    };
    if let Some(reason) = reason {
        result = result.reason(reason);
    }
    match identity {
        Identity::MailFrom(sender) if !sender.is_empty() => result.prop("smtp.mailfrom", sender.clone()),
        Identity::MailFrom(_) => result.prop("smtp.mailfrom", format!("postmaster@{helo}")),
        Identity::Helo => result.prop("smtp.helo", helo.to_owned()),
    }
}

/// iprev (RFC 8601 §3): the client's PTR names, one of which resolves back to it.
pub async fn iprev(ip: IpAddr) -> AuthResult {
    let resolver = match resolver_or_temperror("iprev") {
        Ok(resolver) => resolver,
        Err(result) => return result.prop("policy.iprev", ip.to_string()),
    };
    let budget = resolver.config.budget;
    let check = async move {
        let output =
            tokio::time::timeout(budget, resolver.authenticator.verify_iprev(resolver.caches.parameters(ip))).await;
        let Ok(output) = output else {
            return AuthResult::new("iprev", "temperror").reason(BUDGET_EXHAUSTED).prop("policy.iprev", ip.to_string());
        };
        let (word, error) = match &output.result {
            IprevResult::Pass => ("pass", None),
            IprevResult::Fail(error) => ("fail", Some(error.to_string())),
            IprevResult::TempError(error) => ("temperror", Some(error.to_string())),
            IprevResult::PermError(error) => ("permerror", Some(error.to_string())),
            IprevResult::None => ("none", None),
        };
        let mut result = AuthResult::new("iprev", word);
        let names =
            output.ptr.as_ref().map(|names| names.iter().map(|name| name.trim_end_matches('.')).collect::<Vec<_>>());
        match (error, names) {
            (Some(error), _) => result = result.reason(error),
            (None, Some(names)) if !names.is_empty() => result = result.reason(names.join(" ")),
            _ => {}
        }
        result.prop("policy.iprev", ip.to_string())
    };
    engine::run(check).await.unwrap_or_else(|| AuthResult::new("iprev", "temperror").reason("the check failed"))
}

/// What the checks of a message's content need.
pub struct MessageInput {
    /// The message as the client sent it (no trace header of ours).
    pub data: Body,
    /// Our `hostname`: the authserv-id.
    pub hostname: String,
    pub remote_ip: IpAddr,
    pub helo: String,
    /// The MAIL FROM address, empty for the null sender.
    pub sender: String,
    /// The SPF result of the MAIL FROM identity, if it was checked.
    pub spf: Option<SpfOutput>,
    pub dkim: bool,
    pub arc: bool,
    pub dmarc: bool,
}

/// What the checks of a message found.
pub struct MessageOutcome {
    /// In order: DKIM (one per signature), ARC, DMARC.
    pub results: Vec<AuthResult>,
    /// The message without the `Authentication-Results:` fields that
    /// carried our authserv-id, when it had some.
    pub rewritten: Option<Bytes>,
}

/// Messages up to this size are checked on the session's loop: hashing
/// them takes less than the two hops to the authentication runtime and back.
pub const INLINE_MAX_SIZE: usize = 64 * 1024;

/// Messages with more signatures than this (DKIM and ARC) are checked on
/// the authentication runtime: each costs an RSA verification (~17 µs for 2048 bits).
pub const INLINE_MAX_SIGNATURES: usize = 3;

/// DKIM, ARC and DMARC of a message, as `input` asks. A small message in
/// memory with few signatures is checked on the caller's task (its lookups
/// still asynchronous, in the authentication runtime's context); others on
/// the authentication runtime: the body read (if spilled), hashed and its
/// signatures verified off the session's loop. Within the resolver's
/// budget; what is not done by then is `temperror`.
pub async fn message(input: MessageInput) -> MessageOutcome {
    let small = match &input.data {
        Body::Memory(bytes) => bytes.len() <= INLINE_MAX_SIZE && signatures(bytes) <= INLINE_MAX_SIGNATURES,
        _ => false,
    };
    let outcome =
        if small { engine::inline(check_message(input)).await } else { engine::run(check_message(input)).await };
    outcome.unwrap_or_else(|| MessageOutcome { results: Vec::new(), rewritten: None })
}

/// The `DKIM-Signature:`, `ARC-Seal:` and `ARC-Message-Signature:` fields in
/// the header of `message` (the first lines of fields only).
fn signatures(message: &[u8]) -> usize {
    let names: [&[u8]; 3] = [b"dkim-signature:", b"arc-seal:", b"arc-message-signature:"];
    let mut count = 0;
    let mut start = 0;
    while start < message.len() {
        let line_end = memchr::memchr(b'\n', &message[start..]).map_or(message.len(), |at| start + at + 1);
        let line = &message[start..line_end];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        let named = |name: &[u8]| line.len() >= name.len() && line[..name.len()].eq_ignore_ascii_case(name);
        if names.iter().any(|name| named(name)) {
            count += 1;
        }
        start = line_end;
    }
    count
}

async fn check_message(input: MessageInput) -> MessageOutcome {
    let bytes = match &input.data {
        Body::Memory(bytes) => bytes.clone(),
        Body::File(_) => {
            let data = input.data.clone();
            match engine::blocking(move || data.to_vec()).await {
                Some(Ok(bytes)) => Bytes::from(bytes),
                _ => {
                    return MessageOutcome {
                        results: all_temperror(&input, "reading the body failed"),
                        rewritten: None,
                    }
                }
            }
        }
    };
    let forged = results::forged_results(&bytes, &input.hostname);
    let rewritten = (!forged.is_empty()).then(|| Bytes::from(results::without(&bytes, &forged)));
    let results = match engine::current() {
        Err(error) => all_temperror(&input, &error),
        Ok(resolver) => {
            let budget = resolver.config.budget;
            match tokio::time::timeout(budget, verify_message(&resolver, &bytes, &input)).await {
                Ok(results) => results,
                Err(_) => all_temperror(&input, BUDGET_EXHAUSTED),
            }
        }
    };
    MessageOutcome { results, rewritten }
}

fn all_temperror(input: &MessageInput, reason: &str) -> Vec<AuthResult> {
    let methods = [("dkim", input.dkim), ("arc", input.arc), ("dmarc", input.dmarc)];
    methods
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(method, _)| AuthResult::new(method, "temperror").reason(reason))
        .collect()
}

async fn verify_message(resolver: &Resolver, bytes: &[u8], input: &MessageInput) -> Vec<AuthResult> {
    let authenticator = &resolver.authenticator;
    let caches = &resolver.caches;
    let mut results = Vec::new();
    // Strict: a signature with l= is not verified (mail-auth reports it neutral).
    let Some(mut message) = AuthenticatedMessage::parse_with_opts(bytes, None, true) else {
        let methods = [("dkim", input.dkim), ("arc", input.arc), ("dmarc", input.dmarc)];
        return methods
            .into_iter()
            .filter(|(_, on)| *on)
            .map(|(method, _)| AuthResult::new(method, "none").reason("no header"))
            .collect();
    };
    // Our guards, before mail-auth sees the signatures: rsa-sha1 is not
    // accepted (RFC 8301), and at most MAX_DKIM_SIGNATURES are checked.
    let mut refused = Vec::new();
    let mut kept = Vec::new();
    for header in std::mem::take(&mut message.dkim_headers) {
        if header.header.a == Algorithm::RsaSha1 {
            refused.push(
                dkim_props(AuthResult::new("dkim", "neutral"), &header.header)
                    .reason("rsa-sha1 signatures are not accepted (RFC 8301)"),
            );
        } else if kept.len() < MAX_DKIM_SIGNATURES {
            kept.push(header);
        } else {
            refused.push(
                dkim_props(AuthResult::new("dkim", "neutral"), &header.header)
                    .reason(format!("not checked: more than {MAX_DKIM_SIGNATURES} signatures")),
            );
        }
    }
    message.dkim_headers = kept;
    // UPGRADE: mail-auth 0.13.3 canonicalizes a body that ends in lines of
    // white space wrongly under `c=*/relaxed` (mail-auth #62, fixed in 0.14,
    // which needs a newer rustc than 1.95): such a body's hash may not match,
    // a `neutral` ("body hash did not verify") for a good signature. The
    // hashes are computed by `AuthenticatedMessage::parse_with_opts` above.
    let dkim_output: Vec<DkimOutput> = if input.dkim || input.dmarc {
        authenticator.verify_dkim(caches.parameters(&message)).await
    } else {
        Vec::new()
    };
    if input.dkim {
        results.extend(dkim_output.iter().map(dkim_result));
        results.extend(refused);
        if results.is_empty() {
            results.push(AuthResult::new("dkim", "none").reason("no signature"));
        }
    }
    if input.arc {
        let output = authenticator.verify_arc(caches.parameters(&message)).await;
        let (word, reason) = match output.result() {
            DkimResult::Pass => ("pass", None),
            DkimResult::None => ("none", None),
            DkimResult::TempError(error) => ("temperror", Some(error.to_string())),
            // RFC 8617 has none, pass and fail: a chain that is malformed or does not verify fails.
            DkimResult::Fail(error) | DkimResult::Neutral(error) | DkimResult::PermError(error) => {
                ("fail", Some(error.to_string()))
            }
        };
        let mut result = AuthResult::new("arc", word);
        if let Some(reason) = reason {
            result = result.reason(reason);
        }
        results.push(result.prop("smtp.remote-ip", input.remote_ip.to_string()));
    }
    if input.dmarc {
        let mail_from_domain = match input.sender.rsplit_once('@') {
            Some((_, domain)) => domain.to_owned(),
            None => input.helo.clone(),
        };
        // DMARC needs the SPF result of the MAIL FROM identity even when SPF itself is off.
        let spf_output = match &input.spf {
            Some(output) => output.clone(),
            None => {
                let hostname = &input.hostname;
                let params = SpfParameters::verify_mail_from(input.remote_ip, &input.helo, hostname, &input.sender);
                authenticator.verify_spf(caches.parameters(params)).await
            }
        };
        let params = DmarcParameters::new(&message, &dkim_output, &mail_from_domain, &spf_output);
        let output = authenticator.verify_dmarc(caches.parameters(params)).await;
        let (word, reason) = match output.result() {
            DmarcResult::Pass => ("pass", None),
            DmarcResult::Fail(error) => ("fail", Some(error.to_string())),
            DmarcResult::TempError(error) => ("temperror", Some(error.to_string())),
            DmarcResult::PermError(error) => ("permerror", Some(error.to_string())),
            DmarcResult::None => ("none", None),
        };
        let mut result = AuthResult::new("dmarc", word);
        if let Some(reason) = reason {
            result = result.reason(reason);
        }
        if output.dmarc_record().is_some() {
            let policy = match output.policy() {
                Policy::Reject => "reject",
                Policy::Quarantine => "quarantine",
                Policy::None | Policy::Unspecified => "none",
            };
            result = result.prop("policy.dmarc", policy);
        }
        if !output.domain().is_empty() {
            result = result.prop("header.from", output.domain().to_owned());
        }
        results.push(result);
    }
    results
}

fn dkim_props(mut result: AuthResult, signature: &mail_auth::dkim::Signature) -> AuthResult {
    result = result.prop("header.d", signature.d.clone());
    // mail-auth fills an absent i= with its default, `@` and the domain.
    if !signature.i.is_empty() && signature.i.strip_prefix('@') != Some(signature.d.as_str()) {
        result = result.prop("header.i", signature.i.clone());
    }
    result = result.prop("header.s", signature.s.clone());
    let algorithm = match signature.a {
        Algorithm::RsaSha1 => "rsa-sha1",
        Algorithm::RsaSha256 => "rsa-sha256",
        Algorithm::Ed25519Sha256 => "ed25519-sha256",
    };
    result = result.prop("header.a", algorithm);
    // RFC 6008: the first characters of the signature, to tell signatures apart.
    use base64::Engine as _;
    let b = base64::engine::general_purpose::STANDARD.encode(&signature.b[..signature.b.len().min(6)]);
    result.prop("header.b", b)
}

fn dkim_result(output: &DkimOutput) -> AuthResult {
    let (word, error) = match output.result() {
        DkimResult::Pass => ("pass", None),
        DkimResult::Neutral(error) => ("neutral", Some(error)),
        DkimResult::Fail(error) => ("fail", Some(error)),
        DkimResult::PermError(error) => ("permerror", Some(error)),
        DkimResult::TempError(error) => ("temperror", Some(error)),
        DkimResult::None => ("none", None),
    };
    let mut result = AuthResult::new("dkim", word);
    if let Some(error) = error {
        result = result.reason(error.to_string());
    }
    match output.signature() {
        Some(signature) => dkim_props(result, signature),
        None => result,
    }
}

/// What policy's `check_authentication` asks: the checks of one message
/// and its connection, on demand, whatever the `authentication` parameter says.
pub struct OnDemand {
    pub message: MessageInput,
    /// SPF of the MAIL FROM identity (the null sender: `postmaster@<helo>`).
    pub spf: bool,
    pub iprev: bool,
}

/// The results of [`OnDemand`], in the order the `authentication`
/// parameter gives them: SPF, iprev, DKIM (one per signature), ARC, DMARC.
/// SPF and iprev are looked up together; DMARC uses that SPF result.
pub async fn on_demand(request: OnDemand) -> Vec<AuthResult> {
    let OnDemand { mut message, spf: want_spf, iprev: want_iprev } = request;
    let ip = message.remote_ip;
    let spf_check = async {
        if !want_spf {
            return None;
        }
        let identity = Identity::MailFrom(message.sender.clone());
        Some(spf(ip, message.helo.clone(), message.hostname.clone(), identity).await)
    };
    let iprev_check = async {
        if want_iprev {
            Some(iprev(ip).await)
        } else {
            None
        }
    };
    let (spf_done, iprev_done) = tokio::join!(spf_check, iprev_check);
    let mut results = Vec::new();
    if let Some(done) = spf_done {
        message.spf = Some(done.output);
        results.push(done.result);
    }
    results.extend(iprev_done);
    if message.dkim || message.arc || message.dmarc {
        results.extend(self::message(message).await.results);
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_counted_in_the_header_only() {
        let message = b"DKIM-Signature: v=1;\r\n b=x\r\narc-seal: i=1\r\nARC-Message-Signature: i=1\r\n\
            Subject: DKIM-Signature:\r\n\r\nDKIM-Signature: in the body\r\n";
        assert_eq!(signatures(message), 3);
        assert_eq!(signatures(b"Subject: x\r\n\r\n"), 0);
    }
}
