//! Who is calling, and what they may do: one HTTP-level tower layer in front
//! of bfb's services.
//!
//! For every call outside the open services (health, reflection):
//!
//! 1. **Authenticate** ([`AuthMode`]): the SPIFFE ID of the connection's
//!    client certificate ([`tls`]), or the `sub` of a bearer token
//!    ([`jwt`]). Any failure is UNAUTHENTICATED with no detail; the reason
//!    goes to the log and `bfb_auth_rejected_total`.
//! 2. **Authorize the method**: the identity must belong to a configured
//!    consumer ([`consumers`]) allowed to call it, else PERMISSION_DENIED.
//! 3. **Rate and concurrency limits** of that consumer: RESOURCE_EXHAUSTED
//!    with `RetryInfo`.
//! 4. The [`Caller`] goes into the request's extensions: handlers check the
//!    components it asks for against it, and use its scope in cache keys.
//!
//! With `mode = "none"` every call is the [`Caller::anonymous`] consumer.

mod accept;
pub mod consumers;
pub mod jwt;
pub mod reload;
pub mod tls;

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use prometheus_client::metrics::{counter::Counter, family::Family};
use tonic::{Status, body::Body};
use tower::{BoxError, Layer, Service, ServiceExt};

pub use self::consumers::{Caller, Consumer, Consumers};

/// Every reason a call is refused for (`bfb_auth_rejected_total{reason}`);
/// metrics export each at zero from the start.
pub const REJECTIONS: [&str; 15] = [
    "no_client_certificate",
    "invalid_client_certificate",
    "spiffe_id",
    "jwt_missing",
    "jwt_malformed",
    "jwt_algorithm",
    "jwt_unknown_kid",
    "jwt_signature",
    "jwt_expired",
    "jwt_not_yet_valid",
    "jwt_issuer",
    "jwt_audience",
    "jwt_missing_claim",
    "unknown_consumer",
    "method_not_allowed",
];
use self::{jwt::JwtVerifier, tls::TlsPeer};
use crate::{
    config::{AuthMode, Config},
    error::{Denied, Error},
    telemetry::metrics::{ConsumerLabels, Metrics, ReasonLabels},
};

/// The SPIFFE ID of a certificate with these URI SANs, if it has exactly
/// one, in `trust_domain`.
pub fn spiffe_id<'a>(uris: &'a [String], trust_domain: &str) -> Result<&'a str, &'static str> {
    let [uri] = uris else {
        return Err(if uris.is_empty() {
            "certificate has no URI SAN"
        } else {
            "certificate has more than one URI SAN"
        });
    };
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or("URI SAN is not a SPIFFE ID")?;
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    if domain != trust_domain {
        return Err("SPIFFE ID in a foreign trust domain");
    }
    if path.is_empty() || uri.contains(['?', '#']) {
        return Err("SPIFFE ID has no workload path");
    }
    Ok(uri)
}

/// How callers are identified, built from the config.
enum Authenticator {
    None,
    Mtls { trust_domain: String },
    Jwt(JwtVerifier),
}

/// The authentication and authorization layer (see the module docs).
#[derive(Clone)]
pub struct AuthLayer {
    inner: Arc<Shared>,
}

struct Shared {
    authenticator: Authenticator,
    consumers: Consumers,
    /// `/package.Service/` prefixes callable without credentials.
    open: Vec<String>,
    retry_after: Duration,
    rejected: Family<ReasonLabels, Counter>,
    limited: Family<ConsumerLabels, Counter>,
}

impl AuthLayer {
    /// Builds the layer from a validated config; loads the JWKS (errors are
    /// fatal at start).
    pub fn new(config: &Config, metrics: &Metrics) -> Result<AuthLayer, String> {
        let a = &config.auth;
        let authenticator = match a.mode {
            AuthMode::None => {
                tracing::warn!(
                    "authentication is off (auth.mode = \"none\"): every caller may call every method and read every component"
                );
                Authenticator::None
            }
            AuthMode::Mtls => Authenticator::Mtls {
                trust_domain: a
                    .mtls
                    .as_ref()
                    .map(|m| m.trust_domain.clone())
                    .ok_or("auth.mtls missing")?,
            },
            AuthMode::Jwt => Authenticator::Jwt(JwtVerifier::load(
                a.jwt.as_ref().ok_or("auth.jwt missing")?,
                a.reload_interval,
            )?),
        };
        Ok(AuthLayer {
            inner: Arc::new(Shared {
                authenticator,
                consumers: Consumers::new(&a.consumers),
                open: a.open_services.iter().map(|s| format!("/{s}/")).collect(),
                retry_after: config.server.shed_retry_after,
                rejected: metrics.auth_rejected.clone(),
                limited: metrics.consumer_limited.clone(),
            }),
        })
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            shared: self.inner.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<http::Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let path = request.uri().path();
        if self
            .shared
            .open
            .iter()
            .any(|p| path.starts_with(p.as_str()))
        {
            return Box::pin(async move { inner.oneshot(request).await.map_err(Into::into) });
        }
        let admitted = self.shared.admit(&request);
        match admitted {
            Ok((caller, permit)) => {
                request.extensions_mut().insert(caller);
                Box::pin(async move {
                    let _permit = permit;
                    inner.oneshot(request).await.map_err(Into::into)
                })
            }
            Err(e) => Box::pin(std::future::ready(Ok(Status::from(e).into_http()))),
        }
    }
}

impl Shared {
    /// Authenticates and authorizes one call: its caller and, if the
    /// consumer has a concurrency share, the slot it holds.
    fn admit<B>(
        &self,
        request: &http::Request<B>,
    ) -> Result<(Arc<Caller>, Option<tokio::sync::OwnedSemaphorePermit>), Error> {
        let principal = match self.authenticate(request) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok((Caller::anonymous(), None)),
            Err(reason) => {
                self.reject(reason);
                return Err(Error::Unauthenticated);
            }
        };
        let Some(consumer) = self.consumers.get(&principal) else {
            self.reject("unknown_consumer");
            tracing::info!(principal = %principal, "authenticated identity is not a configured consumer");
            return Err(Error::PermissionDenied(Denied::Consumer));
        };
        let method = request.uri().path().trim_start_matches('/');
        if !consumer.may_call(method) {
            self.reject("method_not_allowed");
            tracing::info!(consumer = %consumer.name, method, "method not allowed for consumer");
            return Err(Error::PermissionDenied(Denied::Method(method.to_string())));
        }
        let permit = consumer.admit(self.retry_after).inspect_err(|e| {
            let limit = match e {
                Error::RateLimited { .. } => "rate",
                _ => "concurrency",
            };
            self.limited
                .get_or_create(&ConsumerLabels {
                    consumer: consumer.name.to_string(),
                    limit,
                })
                .inc();
        })?;
        Ok((Arc::new(Caller::new(consumer, principal)), permit))
    }

    /// The caller's identity; `None` when authentication is off. The error
    /// is the reason, for logs and metrics only.
    fn authenticate<B>(
        &self,
        request: &http::Request<B>,
    ) -> Result<Option<Arc<str>>, &'static str> {
        match &self.authenticator {
            Authenticator::None => Ok(None),
            Authenticator::Mtls { trust_domain } => {
                let peer = request.extensions().get::<TlsPeer>().ok_or("no_tls")?;
                match &*peer.0 {
                    tls::ClientCert::Missing => Err("no_client_certificate"),
                    tls::ClientCert::Invalid(_) => Err("invalid_client_certificate"),
                    tls::ClientCert::Valid { uris } => spiffe_id(uris, trust_domain)
                        .map(|id| Some(Arc::from(id)))
                        .map_err(|why| {
                            tracing::info!(reason = why, "client certificate identity rejected");
                            "spiffe_id"
                        }),
                }
            }
            Authenticator::Jwt(verifier) => {
                let token = request
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| {
                        v.strip_prefix("Bearer ")
                            .or_else(|| v.strip_prefix("bearer "))
                    })
                    .ok_or("jwt_missing")?;
                verifier.verify(token.trim()).map(Some).map_err(|r| {
                    tracing::info!(reason = r.name(), "bearer token rejected");
                    r.name()
                })
            }
        }
    }

    fn reject(&self, reason: &'static str) {
        debug_assert!(
            REJECTIONS.contains(&reason),
            "{reason} missing from REJECTIONS"
        );
        self.rejected.get_or_create(&ReasonLabels { reason }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_need_one_uri_in_the_trust_domain() {
        let td = "prod.example";
        let one = |u: &str| vec![u.to_string()];
        assert_eq!(
            spiffe_id(&one("spiffe://prod.example/ns/a/sa/b"), td),
            Ok("spiffe://prod.example/ns/a/sa/b")
        );
        assert!(spiffe_id(&[], td).is_err());
        assert!(
            spiffe_id(
                &[
                    "spiffe://prod.example/a".to_string(),
                    "spiffe://prod.example/b".to_string()
                ],
                td
            )
            .is_err()
        );
        assert!(spiffe_id(&one("spiffe://other.example/a"), td).is_err());
        assert!(spiffe_id(&one("spiffe://prod.example.evil/a"), td).is_err());
        assert!(spiffe_id(&one("https://prod.example/a"), td).is_err());
        assert!(spiffe_id(&one("spiffe://prod.example"), td).is_err());
        assert!(spiffe_id(&one("spiffe://prod.example/a?x"), td).is_err());
    }

    #[test]
    fn known_methods_come_from_the_contracts() {
        let m = crate::pb::known_methods();
        assert!(m.contains(&"bfb.customer.v1.CustomerAggregateService/GetCustomer".to_string()));
        assert!(m.contains(&"bfb.customer.v2.CustomerAggregateService/GetCustomer".to_string()));
        assert!(
            m.contains(&"bfb.admin.v1.CacheAdmin/InvalidateEntity".to_string()),
            "{m:?}"
        );
        assert!(!m.iter().any(|x| x.starts_with("bfb.sim.")));
    }
}
