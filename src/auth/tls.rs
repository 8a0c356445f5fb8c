//! TLS on bfb's listeners: a rustls acceptor whose certificate, key and
//! client CA are reloaded when their files change, and the client
//! certificate of each connection, checked once per connection.
//!
//! bfb terminates TLS itself (tokio-rustls) instead of through tonic's
//! `tls_config`, because tonic's config is fixed at start and cannot follow
//! a rotated certificate.
//!
//! Client certificates are *checked after* the handshake, not during it:
//! rustls still verifies the handshake signature (the client holds the key
//! of the certificate it sent), but chain validation against the CA runs
//! right after, with the same webpki verifier. A bad certificate (unknown
//! CA, expired) then gets a gRPC UNAUTHENTICATED with the reason logged,
//! instead of a bare TLS alert the caller cannot tell from a network fault;
//! and health probes without certificates can still be served.
//!
//! # Handshakes cannot be starved
//!
//! The accept loop ([`super::accept`]) never waits for room: silent sockets
//! and running handshakes are capped separately, and at a cap the oldest is
//! dropped, so idle sockets cannot lock real clients out.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
        SignatureScheme,
        client::danger::HandshakeSignatureValid,
        crypto::CryptoProvider,
        server::{
            WebPkiClientVerifier,
            danger::{ClientCertVerified, ClientCertVerifier},
        },
    },
    server::TlsStream,
};
use tonic::transport::server::Connected;

use super::{
    accept::Limits,
    reload::{self, Reloading},
};
use crate::{config::TlsSettings, telemetry::metrics::HandshakeMetrics};

/// What a connection's client certificate came to, decided once per
/// connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientCert {
    /// The client sent none.
    Missing,
    /// The client sent one that is not valid (the reason is for logs).
    Invalid(String),
    /// Valid, chaining to the client CA; its URI SANs.
    Valid {
        /// The certificate's URI subject alternative names.
        uris: Vec<String>,
    },
}

/// The connection info of a TLS connection (a request extension).
#[derive(Clone, Debug)]
pub struct TlsPeer(pub Arc<ClientCert>);

/// The current acceptor and the verifier its connections' client
/// certificates are checked with.
struct State {
    acceptor: TlsAcceptor,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
}

/// A TLS server whose files are reloaded on change.
#[derive(Clone)]
pub struct ServerTls {
    state: Reloading<State>,
    /// Caps on accepted sockets before they are served ([`super::accept`]).
    limits: Limits,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerTls {
    /// Loads the files (errors are fatal at start) and keeps reloading them
    /// every `interval`.
    pub fn load(settings: &TlsSettings, interval: Duration) -> Result<ServerTls, String> {
        let mut paths = vec![settings.cert.clone(), settings.key.clone()];
        paths.extend(settings.client_ca.clone());
        let state = reload::watch("tls", paths, interval, |files| {
            build(&files[0], &files[1], files.get(2).map(Vec::as_slice))
        })?;
        Ok(ServerTls {
            state,
            limits: Limits {
                max_silent: settings.max_pending_connections,
                max_handshakes: settings.max_handshakes,
                timeout: settings.handshake_timeout,
            },
        })
    }

    /// Accepts TCP connections from `listener` and yields those that
    /// completed a TLS handshake. Handshakes run concurrently, each with a
    /// timeout, at most `max_handshakes` at once: at the cap the oldest is
    /// dropped (module docs). The accept loop stops when the stream is
    /// dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
        metrics: HandshakeMetrics,
    ) -> impl Stream<Item = Result<TlsConnection, io::Error>> + use<> {
        let (tx, rx) = mpsc::channel::<TlsConnection>(64);
        let tls = self.clone();
        let limits = self.limits;
        tokio::spawn(super::accept::run(
            listener,
            limits,
            metrics,
            tx,
            move |tcp| {
                let tls = tls.clone();
                async move { tls.handshake(tcp).await }
            },
        ));
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|c| (Ok(c), rx)) },
        )
    }

    async fn handshake(&self, tcp: TcpStream) -> io::Result<TlsConnection> {
        let state = self.state.load_full();
        let stream = state.acceptor.accept(tcp).await?;
        let cert = match (stream.get_ref().1.peer_certificates(), &state.verifier) {
            (Some([end_entity, intermediates @ ..]), Some(verifier)) => {
                check_client_cert(verifier.as_ref(), end_entity, intermediates)
            }
            _ => ClientCert::Missing,
        };
        if let ClientCert::Invalid(reason) = &cert {
            tracing::info!(reason = %reason, "client certificate rejected");
        }
        Ok(TlsConnection {
            stream,
            peer: TlsPeer(Arc::new(cert)),
        })
    }
}

fn check_client_cert(
    verifier: &dyn ClientCertVerifier,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> ClientCert {
    if let Err(e) = verifier.verify_client_cert(end_entity, intermediates, UnixTime::now()) {
        return ClientCert::Invalid(e.to_string());
    }
    match x509_parser::parse_x509_certificate(end_entity) {
        Ok((_, cert)) => {
            let uris = cert
                .subject_alternative_name()
                .ok()
                .flatten()
                .map(|san| {
                    san.value
                        .general_names
                        .iter()
                        .filter_map(|n| match n {
                            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            ClientCert::Valid { uris }
        }
        Err(e) => ClientCert::Invalid(format!("unparsable certificate: {e}")),
    }
}

/// Builds the rustls server config from PEM files.
fn build(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> Result<State, String> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.cert: {e}"))?;
    if chain.is_empty() {
        return Err("tls.cert: no certificate in the file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("tls.key: {e}"))?;
    let verifier = client_ca
        .map(|pem| {
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(pem) {
                let ca = ca.map_err(|e| format!("tls.client_ca: {e}"))?;
                roots.add(ca).map_err(|e| format!("tls.client_ca: {e}"))?;
            }
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("tls.client_ca: {e}"))
        })
        .transpose()?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &verifier {
        Some(v) => builder.with_client_cert_verifier(Arc::new(CheckedLater(v.clone()))),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls.cert/tls.key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(State {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        verifier,
    })
}

/// Asks for a client certificate and checks the handshake signature with
/// it, but leaves chain validation to [`check_client_cert`] after the
/// handshake (see the module docs).
#[derive(Debug)]
struct CheckedLater(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for CheckedLater {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
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
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// An accepted TLS connection and what its client certificate came to.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    peer: TlsPeer,
}

impl Connected for TlsConnection {
    type ConnectInfo = TlsPeer;
    fn connect_info(&self) -> TlsPeer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
