//! JWT bearer tokens (service tokens): signature by a key from a JWKS file
//! (reloaded on change), `iss`, `aud`, `exp` and `nbf`; the caller is `sub`.
//!
//! Only asymmetric algorithms are accepted. The header's `alg` must be one
//! of the configured ones *and* match the family of the key its `kid`
//! names, so a token "signed" with HMAC over a public key, or with `alg:
//! none`, never verifies. Verified tokens are remembered for a minute
//! (until their `exp`, and only while the key set is unchanged): service
//! tokens are reused for many calls, and a signature check costs more than
//! the rest of a call.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{AlgorithmParameters, JwkSet},
};
use serde::Deserialize;

use super::reload::{self, Reloading};
use crate::config::{JwtSettings, jwt_algorithm as algorithm};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
    Ed,
}

fn family(alg: Algorithm) -> Option<Family> {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Some(Family::Rsa),
        Algorithm::ES256 | Algorithm::ES384 => Some(Family::Ec),
        Algorithm::EdDSA => Some(Family::Ed),
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => None,
    }
}

/// The public keys of one JWKS file, by `kid`.
struct Keys {
    by_kid: HashMap<String, (DecodingKey, Family)>,
    generation: u64,
}

/// Why a token was refused (logged, never sent to the caller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Not a well-formed JWT, or an algorithm bfb does not know (`none`).
    Malformed,
    /// An algorithm that is not configured (HMAC, for one).
    AlgorithmNotAllowed,
    /// No `kid`, or one not in the key set.
    UnknownKey,
    /// The signature does not verify.
    BadSignature,
    /// Past `exp`.
    Expired,
    /// Before `nbf`.
    NotYetValid,
    /// Wrong `iss`.
    WrongIssuer,
    /// `aud` does not name bfb.
    WrongAudience,
    /// A required claim is missing.
    MissingClaim,
}

impl Rejection {
    /// A stable name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Rejection::Malformed => "jwt_malformed",
            Rejection::AlgorithmNotAllowed => "jwt_algorithm",
            Rejection::UnknownKey => "jwt_unknown_kid",
            Rejection::BadSignature => "jwt_signature",
            Rejection::Expired => "jwt_expired",
            Rejection::NotYetValid => "jwt_not_yet_valid",
            Rejection::WrongIssuer => "jwt_issuer",
            Rejection::WrongAudience => "jwt_audience",
            Rejection::MissingClaim => "jwt_missing_claim",
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

#[derive(Clone)]
struct Verified {
    subject: Arc<str>,
    exp: u64,
    generation: u64,
}

/// Verifies bearer tokens.
pub struct JwtVerifier {
    keys: Reloading<Keys>,
    algorithms: Vec<Algorithm>,
    issuer: String,
    audience: String,
    leeway: u64,
    verified: moka::sync::Cache<String, Verified>,
}

impl JwtVerifier {
    /// Loads the JWKS (errors are fatal at start) and keeps reloading it
    /// every `interval`.
    pub fn load(settings: &JwtSettings, interval: Duration) -> Result<JwtVerifier, String> {
        // Each load gets a new generation, so tokens verified with an old
        // key set are verified again.
        let generation = AtomicU64::new(0);
        let keys = reload::watch(
            "jwks",
            vec![settings.jwks_file.clone()],
            interval,
            move |files| parse_jwks(&files[0], generation.fetch_add(1, Ordering::Relaxed) + 1),
        )?;
        Ok(JwtVerifier {
            keys,
            algorithms: settings
                .algorithms
                .iter()
                .filter_map(|a| algorithm(a))
                .collect(),
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            leeway: settings.leeway.as_secs(),
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
        })
    }

    /// The subject of a valid token.
    pub fn verify(&self, token: &str) -> Result<Arc<str>, Rejection> {
        let keys = self.keys.load();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(v) = self.verified.get(token)
            && v.generation == keys.generation
        {
            return if v.exp + self.leeway > now {
                Ok(v.subject)
            } else {
                Err(Rejection::Expired)
            };
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| Rejection::Malformed)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(Rejection::AlgorithmNotAllowed);
        }
        let (key, key_family) = header
            .kid
            .as_deref()
            .and_then(|kid| keys.by_kid.get(kid))
            .ok_or(Rejection::UnknownKey)?;
        if family(header.alg) != Some(*key_family) {
            return Err(Rejection::AlgorithmNotAllowed);
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => Rejection::Expired,
                K::ImmatureSignature => Rejection::NotYetValid,
                K::InvalidIssuer => Rejection::WrongIssuer,
                K::InvalidAudience => Rejection::WrongAudience,
                K::MissingRequiredClaim(_) => Rejection::MissingClaim,
                K::InvalidSignature | K::Crypto(_) => Rejection::BadSignature,
                _ => Rejection::Malformed,
            }
        })?;
        if data.claims.sub.is_empty() {
            return Err(Rejection::MissingClaim);
        }
        let subject: Arc<str> = data.claims.sub.into();
        self.verified.insert(
            token.to_string(),
            Verified {
                subject: subject.clone(),
                exp: data.claims.exp,
                generation: keys.generation,
            },
        );
        Ok(subject)
    }
}

/// Parses a JWKS; keys without `kid`, and symmetric keys, are skipped.
fn parse_jwks(bytes: &[u8], generation: u64) -> Result<Keys, String> {
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("jwks: {e}"))?;
    let mut by_kid = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = &jwk.common.key_id else {
            tracing::warn!("jwks: a key without kid is ignored");
            continue;
        };
        let fam = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Family::Rsa,
            AlgorithmParameters::EllipticCurve(_) => Family::Ec,
            AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
            AlgorithmParameters::OctetKey(_) => {
                tracing::warn!(kid, "jwks: symmetric key ignored");
                continue;
            }
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("jwks: key {kid}: {e}"))?;
        by_kid.insert(kid.clone(), (key, fam));
    }
    if by_kid.is_empty() {
        return Err("jwks: no usable key".into());
    }
    Ok(Keys { by_kid, generation })
}
