//! `[auth]` and `[tls]`: who a caller is, what each consumer may do, and
//! the server's TLS files.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::Problems;
use crate::component::{Component, names};

/// How callers are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No authentication: every caller may call everything. For local
    /// development and the demo only; bfb logs a warning at start.
    None,
    /// A client certificate's SPIFFE ID (needs `[tls]` with `client_ca`).
    Mtls,
    /// A JWT bearer token's `sub` (keys from a JWKS file).
    Jwt,
}

/// `[auth]`. Required in every config, so running without authentication
/// is always a written decision (`mode = "none"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// How callers are authenticated.
    pub mode: AuthMode,
    /// Services callable without credentials (Kubernetes probes and
    /// `grpcurl list` cannot present any).
    #[serde(default = "default_open_services")]
    pub open_services: Vec<String>,
    /// How often certificate, key, CA and JWKS files are checked for changes.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
    /// mTLS settings (`mode = "mtls"`).
    #[serde(default)]
    pub mtls: Option<MtlsSettings>,
    /// JWT settings (`mode = "jwt"`).
    #[serde(default)]
    pub jwt: Option<JwtSettings>,
    /// Every consumer allowed in, by name. Default deny: an authenticated
    /// identity listed under no consumer gets PERMISSION_DENIED.
    #[serde(default)]
    pub consumers: BTreeMap<String, ConsumerSettings>,
}

fn default_open_services() -> Vec<String> {
    vec![
        "grpc.health.v1.Health".into(),
        "grpc.reflection.v1.ServerReflection".into(),
        "grpc.reflection.v1alpha.ServerReflection".into(),
    ]
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(5)
}

/// `[auth.mtls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsSettings {
    /// The SPIFFE trust domain client identities must be in, e.g. `prod.example`.
    pub trust_domain: String,
}

/// `[auth.jwt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    /// The JWKS file with the issuer's public keys (re-read when it changes).
    pub jwks_file: PathBuf,
    /// Required `iss`.
    pub issuer: String,
    /// bfb's audience: `aud` must contain it.
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// Accepted signature algorithms. Only asymmetric ones can be
    /// configured: with a shared (HMAC) secret, every service that can check
    /// a token could also mint one.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into(), "EdDSA".into()]
}

/// One consumer: who it is, what it may call and read, and its limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSettings {
    /// Identities that are this consumer: SPIFFE IDs (mTLS) or token
    /// subjects (JWT).
    pub identities: Vec<String>,
    /// Methods it may call: `package.Service/Method` or `package.Service/*`.
    pub methods: Vec<String>,
    /// Components it may read; an empty read mask means all of these.
    pub components: Vec<String>,
    /// Its visibility scope, part of every cache key: consumers with the same
    /// scope share cached data. Default: the consumer's name.
    #[serde(default)]
    pub scope: Option<String>,
    /// Sustained requests per second (token bucket); unset: no limit.
    #[serde(default)]
    pub rate_per_second: Option<u32>,
    /// Bucket size: requests allowed in a burst. Default: `rate_per_second`.
    #[serde(default)]
    pub burst: Option<u32>,
    /// RPCs it may have in flight at once; unset: only the global cap.
    #[serde(default)]
    pub max_concurrent_rpcs: Option<usize>,
}

/// `[tls]`: TLS on the gRPC and admin listeners. Files are re-read when they
/// change (`auth.reload_interval`), as Kubernetes rotates mounted secrets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle client certificates must chain to; needed for mTLS.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Accepted connections whose client has not sent a byte yet, per
    /// listener. At the cap the oldest is closed (see `auth::accept`).
    #[serde(default = "default_max_pending_connections")]
    pub max_pending_connections: usize,
    /// TLS handshakes running at once, per listener. At the cap the oldest
    /// is dropped; a new connection is always accepted.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// A connection that has not completed its handshake by then (counted
    /// from its accept) is closed.
    #[serde(with = "humantime_serde", default = "default_handshake_timeout")]
    pub handshake_timeout: Duration,
}

impl TlsSettings {
    /// These files, with the default handshake limits.
    pub fn new(cert: PathBuf, key: PathBuf, client_ca: Option<PathBuf>) -> TlsSettings {
        TlsSettings {
            cert,
            key,
            client_ca,
            max_pending_connections: default_max_pending_connections(),
            max_handshakes: default_max_handshakes(),
            handshake_timeout: default_handshake_timeout(),
        }
    }
}

fn default_max_pending_connections() -> usize {
    4096
}

fn default_max_handshakes() -> usize {
    256
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Whether `s` may be a scope or consumer name: 1–64 of `[A-Za-z0-9._:-]`
/// (so cache keys, which join fields with `|`, cannot collide).
pub fn valid_scope(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Whether `s` is a SPIFFE trust domain name.
pub fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// The algorithms bfb can be configured to accept, by name.
pub fn jwt_algorithm(name: &str) -> Option<jsonwebtoken::Algorithm> {
    Some(match name {
        "RS256" => jsonwebtoken::Algorithm::RS256,
        "RS384" => jsonwebtoken::Algorithm::RS384,
        "RS512" => jsonwebtoken::Algorithm::RS512,
        "PS256" => jsonwebtoken::Algorithm::PS256,
        "PS384" => jsonwebtoken::Algorithm::PS384,
        "PS512" => jsonwebtoken::Algorithm::PS512,
        "ES256" => jsonwebtoken::Algorithm::ES256,
        "ES384" => jsonwebtoken::Algorithm::ES384,
        "EdDSA" => jsonwebtoken::Algorithm::EdDSA,
        _ => return None,
    })
}

impl AuthSettings {
    /// Adds this section's problems (`[tls]` as mTLS needs it).
    pub(super) fn check(&self, tls: Option<&TlsSettings>, p: &mut Problems) {
        let a = self;
        let known = crate::pb::known_methods();
        let is_service = |name: &str| known.iter().any(|m| m.split('/').next() == Some(name));
        for service in &a.open_services {
            if !is_service(service) {
                p.add("auth.open_services", format!("unknown service {service:?}"));
            }
        }
        p.positive("auth.reload_interval", a.reload_interval);
        match a.mode {
            AuthMode::None => {}
            AuthMode::Mtls => {
                if tls.is_none_or(|t| t.client_ca.is_none()) {
                    p.add("tls.client_ca", "mode \"mtls\" needs [tls] with client_ca");
                }
                match &a.mtls {
                    None => p.add("auth.mtls", "mode \"mtls\" needs [auth.mtls] with trust_domain"),
                    Some(m) if !valid_trust_domain(&m.trust_domain) => p.add(
                        "auth.mtls.trust_domain",
                        "must be a trust domain name like \"prod.example\" (lower-case letters, digits, . - _)",
                    ),
                    Some(_) => {}
                }
            }
            AuthMode::Jwt => match &a.jwt {
                None => p.add(
                    "auth.jwt",
                    "mode \"jwt\" needs [auth.jwt] with jwks_file, issuer and audience",
                ),
                Some(j) => {
                    for alg in &j.algorithms {
                        if jwt_algorithm(alg).is_none() {
                            p.add(
                                "auth.jwt.algorithms",
                                format!(
                                    "{alg:?} is not accepted; use asymmetric ones: RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"
                                ),
                            );
                        }
                    }
                    if j.algorithms.is_empty() {
                        p.add("auth.jwt.algorithms", "must name at least one algorithm");
                    }
                    if j.issuer.is_empty() || j.audience.is_empty() {
                        p.add("auth.jwt", "issuer and audience must not be empty");
                    }
                }
            },
        }
        let mut seen = std::collections::HashMap::new();
        for (name, c) in &a.consumers {
            let path = |key: &str| format!("auth.consumers.{name}.{key}");
            if !valid_scope(name) {
                p.add(
                    format!("auth.consumers.{name}"),
                    "names may use only letters, digits and . _ : -",
                );
            }
            if c.identities.is_empty() {
                p.add(path("identities"), "must list at least one identity");
            }
            for id in &c.identities {
                if let Some(other) = seen.insert(id.as_str(), name.as_str()) {
                    p.add(
                        path("identities"),
                        format!("{id:?} is also listed under {other}"),
                    );
                }
            }
            for m in &c.methods {
                let matches = match m.strip_suffix("/*") {
                    Some(service) => is_service(service),
                    None => known.iter().any(|k| k == m),
                };
                if !matches {
                    p.add(
                        path("methods"),
                        format!(
                            "{m:?} names no method; use package.Service/Method or package.Service/*"
                        ),
                    );
                }
            }
            for comp in &c.components {
                if Component::from_name(comp).is_none() {
                    p.add(
                        path("components"),
                        format!(
                            "unknown component {comp:?}; expected any of: {}",
                            names(&Component::ALL)
                        ),
                    );
                }
            }
            if let Some(scope) = &c.scope
                && !valid_scope(scope)
            {
                p.add(path("scope"), "may use only letters, digits and . _ : -");
            }
            if c.rate_per_second == Some(0) || c.burst == Some(0) {
                p.add(
                    path("rate_per_second"),
                    "rate_per_second and burst must be at least 1",
                );
            }
            if c.burst.is_some() && c.rate_per_second.is_none() {
                p.add(path("burst"), "needs rate_per_second");
            }
            if c.max_concurrent_rpcs == Some(0) {
                p.add(path("max_concurrent_rpcs"), "must be at least 1");
            }
        }
    }
}
