//! TLS test helpers: a throwaway CA (rcgen) issuing SPIFFE leaf
//! certificates, TLS channels, and bfb with mTLS and two consumers.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use bfb::{
    config::{AuthMode, Config, ConsumerSettings, MtlsSettings, TlsSettings},
    pb::bfb::customer::v1::GetCustomerRequest,
    sim::SimConfig,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType, date_time_ymd,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::{Harness, mask, start};

pub const TRUST_DOMAIN: &str = "test.example";
pub const GET_CUSTOMER: &str = "bfb.customer.v1.CustomerAggregateService/GetCustomer";

/// A throwaway directory for one test's files.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bfb-sec-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A test certificate authority.
pub struct Ca {
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate and its key.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().expect("key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("ca"),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate with these URI SANs (and DNS `localhost`).
    pub fn leaf(&self, uris: &[&str], expired: bool) -> Leaf {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().expect("ia5")));
        }
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

pub fn spiffe(path: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/{path}")
}

pub fn consumer(identities: &[&str], methods: &[&str], components: &[&str]) -> ConsumerSettings {
    ConsumerSettings {
        identities: identities.iter().map(|s| s.to_string()).collect(),
        methods: methods.iter().map(|s| s.to_string()).collect(),
        components: components.iter().map(|s| s.to_string()).collect(),
        scope: None,
        rate_per_second: None,
        burst: None,
        max_concurrent_rpcs: None,
    }
}

pub fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    // Written next to the target and renamed, as Kubernetes swaps secrets:
    // the poller never reads a half-written file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, &path).expect("rename");
    path
}

/// A TLS channel to `addr`, trusting `ca`, presenting `identity` if any.
pub async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)?
        .connect()
        .await
}

pub fn get(id: &str, paths: &[&str]) -> GetCustomerRequest {
    GetCustomerRequest {
        customer_id: id.into(),
        read_mask: mask(paths),
        ..Default::default()
    }
}

/// bfb with mTLS: consumer `reports` may call GetCustomer for profile and
/// orders; `ops` may call the admin API.
pub async fn mtls_harness(dir: &Path, ca: &Ca, server: &Leaf) -> Harness {
    mtls_harness_with(dir, ca, server, |_| {}).await
}

/// [`mtls_harness`], after `tweak` adjusts the config.
pub async fn mtls_harness_with(
    dir: &Path,
    ca: &Ca,
    server: &Leaf,
    tweak: impl FnOnce(&mut Config),
) -> Harness {
    let cert = write(dir, "tls.crt", &server.cert);
    let key = write(dir, "tls.key", &server.key);
    let client_ca = write(dir, "ca.crt", &ca.pem());
    start(SimConfig::default(), |c| {
        c.tls = Some(TlsSettings::new(cert, key, Some(client_ca)));
        c.auth.mode = AuthMode::Mtls;
        c.auth.reload_interval = Duration::from_millis(50);
        c.auth.mtls = Some(MtlsSettings {
            trust_domain: TRUST_DOMAIN.into(),
        });
        c.auth.consumers = BTreeMap::from([
            (
                "reports".to_string(),
                consumer(
                    &[&spiffe("ns/reports/sa/report")],
                    &[GET_CUSTOMER],
                    &["profile", "orders"],
                ),
            ),
            (
                "ops".to_string(),
                consumer(
                    &[&spiffe("ns/ops/sa/admin")],
                    &["bfb.admin.v1.CacheAdmin/*"],
                    &[],
                ),
            ),
        ]);
        tweak(c);
    })
    .await
}
