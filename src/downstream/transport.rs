//! bfb's HTTP/2 client connections to one downstream address, on the `h2`
//! crate directly: a [`Connection`] is made on its first call, shared by
//! every call the balancer sends over it, and made again on the next call
//! after it breaks.
//!
//! Why not tonic's `Channel` (or hyper's client, which it wraps): between a
//! call and the socket they put a `Buffer` task (a channel send and a task
//! wake-up per call), hyper's dispatch channel to its connection task (a
//! second one), and a task spawned per request that waits for the answer and
//! hands it back (a third, alive for the whole call). Here the calling task
//! opens the stream, writes the request and reads the answer itself; only
//! the connection's reads and writes run in a task of their own, as in any
//! HTTP/2 client. The balancer above already does what the others add
//! (picking, reconnecting, a connection per so many streams), and measured
//! against them this saved CPU and memory per call (docs/performance.md).
//!
//! What happens when the other side moves: a refused or timed-out connect
//! fails the call as a transport failure (retryable; the balancer ejects the
//! address); a connection that breaks or is closed by GOAWAY fails the calls
//! it still carries and is made again by the next call; one that stops
//! answering while calls are in flight is dropped after a keepalive ping
//! goes unanswered (30 s + 10 s, as before).

use std::{
    future::poll_fn,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use h2::{
    Ping, Reason,
    client::{self, SendRequest},
};
use http::{
    HeaderValue, Uri,
    header::USER_AGENT,
    uri::{Authority, Scheme},
};
use http_body::{Body as _, Frame};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use tonic::{Code, Status, body::Body};

/// HTTP/2 settings: hyper's client defaults, which tonic used before.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// The largest response header block a downstream may send.
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// How the connections to a downstream's addresses are made.
pub struct Connector {
    /// `http` or `https`.
    scheme: Scheme,
    /// The `:authority` of every call when a single host name is configured
    /// (as if connected by name); else each address's own.
    origin: Option<Authority>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    keepalive: Keepalive,
    user_agent: HeaderValue,
}

/// Pings while calls are in flight (never on an idle connection: servers
/// such as grpc-go close connections that ping too often with no calls).
#[derive(Clone, Copy, Debug)]
pub struct Keepalive {
    /// Time between pings.
    pub interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped.
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        }
    }
}

impl Connector {
    /// Plain-text connections (`http`).
    pub fn plain(connect_timeout: Duration) -> Connector {
        Connector {
            scheme: Scheme::HTTP,
            origin: None,
            tls: None,
            connect_timeout,
            keepalive: Keepalive::default(),
            user_agent: HeaderValue::from_static(concat!("bfb/", env!("CARGO_PKG_VERSION"))),
        }
    }

    /// TLS connections (`https`), the server's certificate checked for
    /// `server_name` whatever address is dialled.
    pub fn tls(self, connector: TlsConnector, server_name: ServerName<'static>) -> Connector {
        Connector {
            scheme: Scheme::HTTPS,
            tls: Some((connector, server_name)),
            ..self
        }
    }

    /// Every call names `origin` as its `:authority`.
    pub fn origin(self, origin: Option<Authority>) -> Connector {
        Connector { origin, ..self }
    }

    /// Keepalive pings.
    pub fn keepalive(self, keepalive: Keepalive) -> Connector {
        Connector { keepalive, ..self }
    }
}

/// Why a call could not be sent or answered over a connection. Every one is
/// a transport failure: nothing the downstream said.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The TCP connection, TLS handshake or HTTP/2 preface failed.
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    /// The connection broke, or would not take a new stream (GOAWAY).
    #[error("connection: {0}")]
    Connection(#[source] h2::Error),
    /// The request is not one HTTP/2 can carry.
    #[error("request: {0}")]
    Request(#[source] http::Error),
}

impl TransportError {
    fn connect(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> TransportError {
        TransportError::Connect(io::Error::other(e))
    }
}

/// What a connection attempt yields to every call waiting on it.
type Connecting = Shared<BoxFuture<'static, Result<Ready, Arc<TransportError>>>>;

enum State {
    Idle,
    Connecting(Connecting),
    Ready(Ready),
}

#[derive(Clone)]
struct Ready {
    send: SendRequest<Bytes>,
    /// Set when the connection ended or refused a stream.
    closed: Arc<AtomicBool>,
    /// Calls in flight (the connection pings only while there are some).
    active: Arc<AtomicUsize>,
}

/// Counts a call in flight on its connection until its answer is read (or
/// abandoned).
struct Active(Arc<AtomicUsize>);

impl Active {
    fn new(count: &Arc<AtomicUsize>) -> Active {
        count.fetch_add(1, Ordering::Relaxed);
        Active(count.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One HTTP/2 connection to one address, made on first use and again after
/// it breaks.
pub struct Connection {
    addr: SocketAddr,
    connector: Arc<Connector>,
    authority: Authority,
    state: Mutex<State>,
}

impl Connection {
    /// A connection to `addr`, not made yet.
    pub fn new(addr: SocketAddr, connector: Arc<Connector>) -> Connection {
        let authority = connector.origin.clone().unwrap_or_else(|| {
            // An address always makes an authority; the fallback is never used.
            Authority::try_from(addr.to_string()).unwrap_or(Authority::from_static("localhost"))
        });
        Connection {
            addr,
            connector,
            authority,
            state: Mutex::new(State::Idle),
        }
    }

    /// Sends `request` (its URI a path, as tonic's generated clients make
    /// it) and waits for the answer's headers; the body is read as the
    /// caller polls it.
    pub async fn send(
        &self,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, SendError> {
        let ready = match self.current() {
            Ok(ready) => ready,
            Err(connecting) => connecting
                .await
                .map_err(|e| SendError::Transport(clone_error(&e)))?,
        };
        let (mut parts, body) = request.into_parts();
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(self.connector.scheme.clone());
        uri.authority = Some(self.authority.clone());
        uri.path_and_query = parts.uri.path_and_query().cloned();
        parts.uri = Uri::from_parts(uri)
            .map_err(|e| SendError::Transport(TransportError::Request(e.into())))?;
        if !parts.headers.contains_key(USER_AGENT) {
            parts
                .headers
                .insert(USER_AGENT, self.connector.user_agent.clone());
        }
        let end = body.is_end_stream();
        let active = Active::new(&ready.active);
        // Before the stream is open nothing was sent: any error is the
        // connection's, and the connection is made again by the next call.
        let opened = async {
            let mut send = ready.send.clone().ready().await?;
            send.send_request(http::Request::from_parts(parts, ()), end)
        };
        let (response, stream) = opened.await.map_err(|e| {
            ready.closed.store(true, Ordering::Relaxed);
            SendError::Transport(TransportError::Connection(e))
        })?;
        drop(ready);
        if !end {
            send_body(body, stream).await?;
        }
        let response = response
            .await
            .map_err(|e| SendError::Status(status_of(e)))?;
        Ok(response.map(|recv| {
            Body::new(ResponseBody {
                recv,
                data: true,
                _active: active,
            })
        }))
    }

    /// The connection if it is up, or the attempt to make it (started now
    /// if none is under way).
    fn current(&self) -> Result<Ready, Connecting> {
        let Ok(mut state) = self.state.lock() else {
            // Poisoned: only a panic in this module could do it; connect
            // without sharing rather than fail every call.
            return Err(connect(self.addr, self.connector.clone()).boxed().shared());
        };
        if let State::Ready(r) = &*state {
            if !r.closed.load(Ordering::Relaxed) {
                return Ok(r.clone());
            }
            *state = State::Idle;
        }
        if let State::Connecting(c) = &*state {
            match c.peek() {
                None => return Err(c.clone()),
                Some(Ok(r)) if !r.closed.load(Ordering::Relaxed) => {
                    let r = r.clone();
                    *state = State::Ready(r.clone());
                    return Ok(r);
                }
                // Failed or already closed: a new attempt.
                Some(_) => {}
            }
        }
        let c = connect(self.addr, self.connector.clone()).boxed().shared();
        *state = State::Connecting(c.clone());
        Err(c)
    }
}

/// How a call failed.
#[derive(Debug)]
pub enum SendError {
    /// Before the downstream answered: the connection's failure.
    Transport(TransportError),
    /// The downstream reset the stream (or the connection broke under it):
    /// the status a gRPC client reports for that.
    Status(Status),
}

/// A shared connect error for one of the calls that waited on it.
fn clone_error(e: &TransportError) -> TransportError {
    match e {
        TransportError::Connect(io) => TransportError::Connect(io::Error::new(
            io.kind(),
            io.get_ref()
                .map_or_else(|| io.kind().to_string(), |e| e.to_string()),
        )),
        TransportError::Connection(h2) => TransportError::connect(h2.to_string()),
        TransportError::Request(e) => TransportError::connect(e.to_string()),
    }
}

async fn connect(
    addr: SocketAddr,
    connector: Arc<Connector>,
) -> Result<Ready, Arc<TransportError>> {
    let made = tokio::time::timeout(connector.connect_timeout, async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(TransportError::Connect)?;
        tcp.set_nodelay(true).map_err(TransportError::Connect)?;
        match &connector.tls {
            None => handshake(tcp, connector.keepalive).await,
            Some((tls, name)) => {
                let tls = tls
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(TransportError::Connect)?;
                handshake(tls, connector.keepalive).await
            }
        }
    })
    .await;
    match made {
        Ok(Ok(ready)) => Ok(ready),
        Ok(Err(e)) => Err(Arc::new(e)),
        Err(_) => Err(Arc::new(TransportError::Connect(io::Error::new(
            io::ErrorKind::TimedOut,
            "connect timed out",
        )))),
    }
}

async fn handshake<T>(io: T, keepalive: Keepalive) -> Result<Ready, TransportError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false)
        .handshake::<T, Bytes>(io)
        .await
        .map_err(|e| TransportError::Connect(io::Error::other(e)))?;
    let closed = Arc::new(AtomicBool::new(false));
    let active = Arc::new(AtomicUsize::new(0));
    tokio::spawn(drive(connection, active.clone(), closed.clone(), keepalive));
    Ok(Ready {
        send,
        closed,
        active,
    })
}

/// Runs a connection's reads and writes until it ends, pinging while calls
/// are in flight (`active`). The connection ends when the server closes it,
/// it breaks, a ping goes unanswered, or the pool dropped it and its last
/// call is answered (h2 closes it once no handle or stream is left).
async fn drive<T>(
    connection: client::Connection<T, Bytes>,
    active: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    keepalive: Keepalive,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut connection = connection;
    let mut pings = connection.ping_pong();
    let mut connection = std::pin::pin!(connection);
    loop {
        let tick = tokio::time::sleep(keepalive.interval);
        tokio::select! {
            _ = &mut connection => break,
            () = tick => {
                let busy = active.load(Ordering::Relaxed) > 0;
                let Some(p) = pings.as_mut().filter(|_| busy) else { continue };
                if p.send_ping(Ping::opaque()).is_err() {
                    break;
                }
                let pong = tokio::time::timeout(keepalive.timeout, poll_fn(|cx| p.poll_pong(cx)));
                tokio::select! {
                    _ = &mut connection => break,
                    answered = pong => if !matches!(answered, Ok(Ok(_))) {
                        tracing::debug!("downstream connection dropped: keepalive ping unanswered");
                        break;
                    },
                }
            }
        }
    }
    closed.store(true, Ordering::Relaxed);
}

/// Writes a request body to its stream. A unary gRPC body is one message,
/// ready at once; larger bodies are buffered by h2 within its send buffer.
async fn send_body(mut body: Body, mut stream: h2::SendStream<Bytes>) -> Result<(), SendError> {
    loop {
        match poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None => return stream.send_data(Bytes::new(), true).map_err(sent),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    stream.send_data(data, end).map_err(sent)?;
                    if end {
                        return Ok(());
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return stream.send_trailers(trailers).map_err(sent);
                    }
                }
            },
            // Encoding failed (tonic's status): the stream is abandoned.
            Some(Err(status)) => {
                stream.send_reset(Reason::CANCEL);
                return Err(SendError::Status(status));
            }
        }
    }
}

fn sent(e: h2::Error) -> SendError {
    SendError::Status(status_of(e))
}

/// The status of a stream that ended without a gRPC status, as tonic reports
/// it (gRPC's HTTP/2 error mapping): a reset by the downstream is its
/// answer; a broken connection or a GOAWAY is a transport failure (the status carries
/// the error as its source, which is how [`crate::resilience::attempt`]
/// tells the two apart).
fn status_of(e: h2::Error) -> Status {
    // A GOAWAY fails only the streams the downstream did not take: like a
    // broken connection, nothing was processed.
    if !e.is_reset() {
        return Status::from_error(Box::new(TransportError::Connection(e)));
    }
    let code = match e.reason() {
        Some(Reason::REFUSED_STREAM) => Code::Unavailable,
        Some(Reason::CANCEL) => Code::Cancelled,
        Some(Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
        Some(Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
        _ => Code::Internal,
    };
    Status::new(code, "downstream reset the stream")
}

/// An answer's body: its data frames (the flow-control window given back
/// as each is read), then its trailers.
struct ResponseBody {
    recv: h2::RecvStream,
    /// Data frames may still come.
    data: bool,
    _active: Active,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.data {
            match this.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    // Only fails once the stream is gone, which the next
                    // poll reports.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(status_of(e)))),
                Poll::Ready(None) => this.data = false,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(status_of(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

#[cfg(test)]
mod tests;
