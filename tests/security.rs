//! Authentication, authorization, rate limits, identity propagation and
//! downstream TLS, against the real server over loopback. Certificates and
//! keys are generated here (rcgen), never committed.

mod common;

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use bfb::{
    config::{AuthMode, Config, DownstreamTls, JwtSettings},
    pb::bfb::{
        activity::v1::{
            GetUserActivityRequest, user_activity_service_client::UserActivityServiceClient,
        },
        admin::v1::{InvalidateEntityRequest, cache_admin_client::CacheAdminClient},
        customer::v1::customer_aggregate_service_client::CustomerAggregateServiceClient,
    },
    sim::{SimConfig, SimTls},
};
use common::{
    Harness, start,
    tls::{Ca, GET_CUSTOMER, consumer, get, mtls_harness, spiffe, temp_dir, tls_channel, write},
};
use rcgen::KeyPair;
use tonic::{Code, Request};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt;

#[tokio::test]
async fn mtls_admits_a_listed_spiffe_id_and_rejects_every_bad_certificate() {
    let dir = temp_dir("mtls");
    let ca = Ca::new("test ca");
    let h = mtls_harness(&dir, &ca, &ca.leaf(&[], false)).await;
    let ca_pem = ca.pem();

    let good = ca.leaf(&[&spiffe("ns/reports/sa/report")], false);
    let mut client = CustomerAggregateServiceClient::new(
        tls_channel(h.bfb, &ca_pem, Some(&good))
            .await
            .expect("connect"),
    );
    let answer = client
        .get_customer(get("c-1", &["profile", "orders"]))
        .await
        .expect("a listed consumer is served")
        .into_inner();
    assert!(answer.customer.and_then(|c| c.profile).is_some());

    let rogue = Ca::new("rogue ca");
    let cases = [
        ("no client certificate", None),
        (
            "unknown CA",
            Some(rogue.leaf(&[&spiffe("ns/reports/sa/report")], false)),
        ),
        (
            "expired",
            Some(ca.leaf(&[&spiffe("ns/reports/sa/report")], true)),
        ),
        (
            "two URI SANs",
            Some(ca.leaf(
                &[&spiffe("ns/reports/sa/report"), &spiffe("ns/x/sa/y")],
                false,
            )),
        ),
        (
            "foreign trust domain",
            Some(ca.leaf(&["spiffe://other.example/ns/reports/sa/report"], false)),
        ),
        ("no URI SAN", Some(ca.leaf(&[], false))),
    ];
    for (what, leaf) in &cases {
        let channel = tls_channel(h.bfb, &ca_pem, leaf.as_ref())
            .await
            .expect("the handshake completes; the identity is checked per call");
        let status = CustomerAggregateServiceClient::new(channel)
            .get_customer(get("c-1", &["profile"]))
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::Unauthenticated, "{what}");
        assert_eq!(status.message(), "unauthenticated", "{what}: no detail");
    }

    // Health stays open to callers without certificates (probes).
    let health = HealthClient::new(tls_channel(h.bfb, &ca_pem, None).await.expect("tls"))
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health is open");
    assert_eq!(health.into_inner().status, 1);

    // Rejections are counted by reason.
    let metrics = common::http_get(h.metrics, "/metrics").await;
    for reason in [
        "no_client_certificate",
        "invalid_client_certificate",
        "spiffe_id",
    ] {
        assert!(
            metrics.contains(&format!("bfb_auth_rejected_total{{reason=\"{reason}\"}}")),
            "{reason}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn consumers_get_only_their_methods_and_components() {
    let dir = temp_dir("authz");
    let ca = Ca::new("test ca");
    let h = mtls_harness(&dir, &ca, &ca.leaf(&[], false)).await;
    let reports = ca.leaf(&[&spiffe("ns/reports/sa/report")], false);
    let channel = tls_channel(h.bfb, &ca.pem(), Some(&reports))
        .await
        .expect("connect");

    // A method it may not call.
    let status = UserActivityServiceClient::new(channel.clone())
        .get_user_activity(GetUserActivityRequest {
            user_id: "u-1".into(),
            ..Default::default()
        })
        .await
        .expect_err("activity is not granted");
    assert_eq!(status.code(), Code::PermissionDenied);
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "METHOD_NOT_ALLOWED");

    // A component it may not read: named in the error.
    let mut customers = CustomerAggregateServiceClient::new(channel.clone());
    let status = customers
        .get_customer(get("c-1", &["profile", "reviews"]))
        .await
        .expect_err("reviews are not granted");
    assert_eq!(status.code(), Code::PermissionDenied);
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "COMPONENT_NOT_ALLOWED");
    assert_eq!(info.metadata["component"], "reviews");
    assert!(status.message().contains("reviews"));

    // An empty mask: everything it may read, and nothing else.
    let answer = customers
        .get_customer(get("c-1", &[]))
        .await
        .expect("served")
        .into_inner();
    let status = answer.status.expect("status");
    let state = |c: &str| status.components[c].reason.clone();
    assert_eq!(state("profile"), "OK");
    assert_eq!(state("orders"), "OK");
    assert_eq!(state("reviews"), "NOT_REQUESTED");
    assert_eq!(state("favorites"), "NOT_REQUESTED");
    let customer = answer.customer.expect("customer");
    assert!(customer.reviews.is_none() && customer.favorites.is_none());

    // The admin API: only for consumers granted it.
    let status = CacheAdminClient::new(
        tls_channel(h.admin, &ca.pem(), Some(&reports))
            .await
            .expect("admin tls"),
    )
    .invalidate_entity(InvalidateEntityRequest {
        entity_id: "c-1".into(),
        ..Default::default()
    })
    .await
    .expect_err("reports may not invalidate");
    assert_eq!(status.code(), Code::PermissionDenied);
    let ops = ca.leaf(&[&spiffe("ns/ops/sa/admin")], false);
    CacheAdminClient::new(
        tls_channel(h.admin, &ca.pem(), Some(&ops))
            .await
            .expect("tls"),
    )
    .invalidate_entity(InvalidateEntityRequest {
        entity_id: "c-1".into(),
        ..Default::default()
    })
    .await
    .expect("ops may invalidate");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn rotated_server_certificates_and_client_cas_are_picked_up_without_restart() {
    let dir = temp_dir("rotate");
    let old = Ca::new("old ca");
    let h = mtls_harness(&dir, &old, &old.leaf(&[], false)).await;
    let new = Ca::new("new ca");
    let client = new.leaf(&[&spiffe("ns/reports/sa/report")], false);
    let call = || async {
        let channel = tls_channel(h.bfb, &new.pem(), Some(&client)).await.ok()?;
        CustomerAggregateServiceClient::new(channel)
            .get_customer(get("c-1", &["profile"]))
            .await
            .ok()
    };
    assert!(call().await.is_none(), "the new CA is not trusted yet");

    let server = new.leaf(&[], false);
    write(&dir, "tls.crt", &server.cert);
    write(&dir, "tls.key", &server.key);
    write(&dir, "ca.crt", &new.pem());
    // Polled, bounded: the reloader checks the files every 50 ms.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if call().await.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rotation not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Seconds since the epoch.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A signing key with its public JWK.
struct JwtKey {
    kid: String,
    alg: jsonwebtoken::Algorithm,
    encoding: jsonwebtoken::EncodingKey,
    jwk: serde_json::Value,
}

impl JwtKey {
    fn es256(kid: &str) -> JwtKey {
        let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256");
        let raw = pair.public_key_raw(); // 0x04 || x || y
        JwtKey {
            kid: kid.into(),
            alg: jsonwebtoken::Algorithm::ES256,
            encoding: jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())
                .expect("ec key"),
            jwk: serde_json::json!({
                "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                "x": B64.encode(&raw[1..33]), "y": B64.encode(&raw[33..65]),
            }),
        }
    }

    fn ed25519(kid: &str) -> JwtKey {
        let pair = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519");
        JwtKey {
            kid: kid.into(),
            alg: jsonwebtoken::Algorithm::EdDSA,
            encoding: jsonwebtoken::EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes())
                .expect("ed key"),
            jwk: serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA", "use": "sig",
                "x": B64.encode(pair.public_key_raw()),
            }),
        }
    }

    fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign")
    }
}

const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "bfb";

fn claims(sub: &str) -> serde_json::Value {
    serde_json::json!({
        "sub": sub, "iss": ISSUER, "aud": [AUDIENCE, "other"],
        "iat": now(), "nbf": now() - 5, "exp": now() + 600,
    })
}

fn jwks(keys: &[&JwtKey]) -> String {
    serde_json::json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
        .to_string()
}

fn bearer<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r
}

/// bfb with JWT auth and the cache on: `reports` and `audit` (one scope),
/// `billing` (its own scope, rate limited).
async fn jwt_harness(dir: &Path, keys: &[&JwtKey], tweak: impl FnOnce(&mut Config)) -> Harness {
    let jwks_file = write(dir, "jwks.json", &jwks(keys));
    start(SimConfig::default(), |c| {
        c.auth.mode = AuthMode::Jwt;
        c.auth.reload_interval = Duration::from_millis(50);
        c.auth.jwt = Some(JwtSettings {
            jwks_file,
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            leeway: Duration::from_secs(30),
            algorithms: vec!["RS256".into(), "ES256".into(), "EdDSA".into()],
        });
        let all = ["profile", "favorites", "reviews", "orders"];
        let mut reports = consumer(&["svc-reports"], &[GET_CUSTOMER], &all);
        reports.scope = Some("reporting".into());
        let mut audit = consumer(&["svc-audit"], &[GET_CUSTOMER], &all);
        audit.scope = Some("reporting".into());
        let mut billing = consumer(&["svc-billing"], &[GET_CUSTOMER], &all);
        billing.rate_per_second = Some(1);
        billing.burst = Some(3);
        c.auth.consumers = BTreeMap::from([
            ("reports".to_string(), reports),
            ("audit".to_string(), audit),
            ("billing".to_string(), billing),
        ]);
        c.cache.enabled = true;
        tweak(c);
    })
    .await
}

#[tokio::test]
async fn jwt_accepts_valid_tokens_and_rejects_every_forgery() {
    let dir = temp_dir("jwt");
    let es = JwtKey::es256("k-es");
    let ed = JwtKey::ed25519("k-ed");
    let h = jwt_harness(&dir, &[&es, &ed], |_| {}).await;
    let client = h.customers().await;
    let call = |token: String| {
        let mut client = client.clone();
        async move {
            client
                .get_customer(bearer(get("c-1", &["profile"]), &token))
                .await
        }
    };
    call(es.sign(&claims("svc-reports"))).await.expect("ES256");
    call(ed.sign(&claims("svc-audit"))).await.expect("EdDSA");

    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims("svc-reports");
        f(&mut c);
        es.sign(&c)
    };
    let unknown = JwtKey::es256("k-unknown");
    let public_pem = es.jwk.to_string();
    let hmac_forgery = {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some("k-es".into());
        jsonwebtoken::encode(
            &header,
            &claims("svc-reports"),
            &jsonwebtoken::EncodingKey::from_secret(public_pem.as_bytes()),
        )
        .expect("hs256")
    };
    let alg_none = format!(
        "{}.{}.",
        B64.encode(r#"{"alg":"none","typ":"JWT","kid":"k-es"}"#),
        B64.encode(claims("svc-reports").to_string())
    );
    let cases: Vec<(&str, String)> = vec![
        ("expired", with(&|c| c["exp"] = (now() - 120).into())),
        ("not yet valid", with(&|c| c["nbf"] = (now() + 120).into())),
        (
            "wrong issuer",
            with(&|c| c["iss"] = "https://evil.test".into()),
        ),
        (
            "wrong audience",
            with(&|c| c["aud"] = "someone-else".into()),
        ),
        ("no subject", with(&|c| c["sub"] = "".into())),
        ("unknown kid", unknown.sign(&claims("svc-reports"))),
        ("HMAC signed with the public key", hmac_forgery),
        ("alg none", alg_none),
        ("garbage", "not.a.jwt".into()),
    ];
    for (what, token) in cases {
        let status = call(token).await.expect_err(what);
        assert_eq!(status.code(), Code::Unauthenticated, "{what}");
        assert_eq!(status.message(), "unauthenticated", "{what}");
    }
    let missing = client
        .clone()
        .get_customer(get("c-1", &["profile"]))
        .await
        .expect_err("no token");
    assert_eq!(missing.code(), Code::Unauthenticated);

    // A subject no consumer lists: authenticated, but denied.
    let status = call(es.sign(&claims("svc-stranger")))
        .await
        .expect_err("unknown consumer");
    assert_eq!(status.code(), Code::PermissionDenied);

    // Key rotation: a new key is accepted once the JWKS file has it.
    let rotated = JwtKey::es256("k-2026");
    let token = rotated.sign(&claims("svc-reports"));
    assert_eq!(
        call(token.clone()).await.expect_err("not yet").code(),
        Code::Unauthenticated
    );
    write(&dir, "jwks.json", &jwks(&[&rotated]));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while call(token.clone()).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rotation not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ... and the removed key no longer is, even for a token seen before.
    assert_eq!(
        call(es.sign(&claims("svc-reports")))
            .await
            .expect_err("old key removed")
            .code(),
        Code::Unauthenticated
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn identity_goes_downstream_and_the_callers_token_never_does() {
    let dir = temp_dir("propagate");
    let key = JwtKey::es256("k");
    let h = jwt_harness(&dir, &[&key], |c| c.cache.enabled = false).await;
    let token = key.sign(&claims("svc-reports"));
    let mut request = bearer(get("c-1", &["orders"]), &token);
    request
        .metadata_mut()
        .insert("x-secret-inbound", "do-not-forward".parse().expect("ascii"));
    h.customers()
        .await
        .get_customer(request)
        .await
        .expect("served");
    let seen = h.service_stats("orders").await.last_metadata;
    assert_eq!(
        seen.get("x-bfb-consumer").map(String::as_str),
        Some("reports")
    );
    assert_eq!(
        seen.get("x-bfb-principal").map(String::as_str),
        Some("svc-reports")
    );
    assert!(seen.contains_key("x-request-id"));
    assert!(!seen.contains_key("authorization"), "{seen:?}");
    assert!(!seen.contains_key("x-secret-inbound"));
    assert!(!seen.values().any(|v| v.contains(&token)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn cache_entries_are_shared_within_a_scope_only() {
    let dir = temp_dir("scope");
    let key = JwtKey::es256("k");
    let h = jwt_harness(&dir, &[&key], |_| {}).await;
    let mut client = h.customers().await;
    for sub in ["svc-reports", "svc-audit", "svc-billing"] {
        client
            .get_customer(bearer(get("c-7", &["profile"]), &key.sign(&claims(sub))))
            .await
            .expect("served");
    }
    // reports and audit share the "reporting" scope; billing has its own.
    assert_eq!(h.calls().await["profile"], 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_consumer_over_its_rate_is_limited_while_another_is_not() {
    let dir = temp_dir("rate");
    let key = JwtKey::es256("k");
    let h = jwt_harness(&dir, &[&key], |_| {}).await;
    let mut client = h.customers().await;
    let billing = key.sign(&claims("svc-billing"));
    let reports = key.sign(&claims("svc-reports"));
    let mut limited = Vec::new();
    for _ in 0..10 {
        if let Err(s) = client
            .get_customer(bearer(get("c-1", &["profile"]), &billing))
            .await
        {
            limited.push(s);
        }
        client
            .get_customer(bearer(get("c-1", &["profile"]), &reports))
            .await
            .expect("reports has no limit");
    }
    // Burst 3 at 1/s: at most 3 (plus one refill if the loop is slow) pass.
    assert!(limited.len() >= 5, "{}", limited.len());
    let s = &limited[0];
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert_eq!(
        s.get_details_error_info().expect("info").reason,
        "RATE_LIMITED"
    );
    let retry = s
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("retry info");
    assert!(retry > Duration::ZERO && retry <= Duration::from_secs(1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn downstream_mtls_with_a_service_token() {
    let dir = temp_dir("downstream");
    let ca = Ca::new("downstream ca");
    let sim_leaf = ca.leaf(&[], false);
    let bfb_leaf = ca.leaf(&[&spiffe("ns/bfb/sa/bfb")], false);
    let ca_file = write(&dir, "ds-ca.crt", &ca.pem());
    let cert = write(&dir, "bfb.crt", &bfb_leaf.cert);
    let key = write(&dir, "bfb.key", &bfb_leaf.key);
    let token = write(&dir, "token", "static-service-token\n");
    let sim = SimConfig {
        tls: Some(SimTls {
            cert: sim_leaf.cert.clone(),
            key: sim_leaf.key.clone(),
            client_ca: Some(ca.pem()),
        }),
        ..SimConfig::default()
    };
    let h = start(sim, |c| {
        for component in bfb::component::Component::ALL {
            let d = c.downstream_mut(component).expect("downstream");
            d.endpoint = d.endpoint.replace("http://", "https://");
            d.tls = Some(DownstreamTls {
                ca: ca_file.clone(),
                server_name: Some("localhost".into()),
                cert: Some(cert.clone()),
                key: Some(key.clone()),
            });
            d.token_file = Some(token.clone());
        }
    })
    .await;
    let answer = h
        .customers()
        .await
        .get_customer(get("c-1", &["profile", "orders"]))
        .await
        .expect("served over downstream mTLS")
        .into_inner();
    assert!(answer.customer.and_then(|c| c.profile).is_some());
    // The sim speaks TLS only, so its stats come over TLS as well.
    let channel = tls_channel(h.sim, &ca.pem(), Some(&bfb_leaf))
        .await
        .expect("sim tls");
    let stats = bfb::pb::bfb::sim::v1::sim_control_client::SimControlClient::new(channel)
        .get_stats(bfb::pb::bfb::sim::v1::GetStatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    let seen = &stats.services["orders"].last_metadata;
    assert_eq!(
        seen.get("authorization").map(String::as_str),
        Some("Bearer static-service-token")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn rapid_reset_closes_that_connection_and_spares_the_others() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut good = h.customers().await;
    good.get_customer(get("c-1", &["profile"]))
        .await
        .expect("warm");

    let tcp = tokio::net::TcpStream::connect(h.bfb).await.expect("tcp");
    let (mut attacker, connection) = h2::client::handshake(tcp).await.expect("h2");
    let connection = tokio::spawn(connection);
    let mut sent = 0;
    for _ in 0..5_000 {
        let Ok(ready) = attacker.ready().await else {
            break;
        };
        attacker = ready;
        let request = http::Request::post(format!("http://{}/{GET_CUSTOMER}", h.bfb))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request");
        let Ok((_response, mut stream)) = attacker.send_request(request, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
        if sent % 10 == 0 {
            // Let the connection task write these and read bfb's answer.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("bfb closed the abusive connection")
        .expect("join");
    // bfb sends GOAWAY(ENHANCE_YOUR_CALM) and closes; depending on timing
    // the client reads the GOAWAY or first finds the socket closed.
    let err = ended.expect_err("closed with an error");
    assert!(
        err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(),
        "{err:?} after {sent} resets"
    );
    assert!(sent < 5_000, "cut off only after {sent} resets");

    // The well-behaved client on its own connection keeps being served.
    for _ in 0..5 {
        good.get_customer(get("c-1", &["profile"]))
            .await
            .expect("still served");
    }
}
