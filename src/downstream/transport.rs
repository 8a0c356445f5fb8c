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
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::future::{self, BoxFuture, Either, FutureExt};
use h2::{
    Ping, Reason,
    client::{self, SendRequest},
};
use http::{
    HeaderValue, Uri,
    header::USER_AGENT,
    uri::{Authority, Scheme},
};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use tonic::{Code, Status};

/// HTTP/2 settings: hyper's client defaults, which tonic used before.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// The largest response header block a downstream may send.
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;

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
struct Keepalive {
    /// Time between pings.
    interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped.
    timeout: Duration,
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

/// What a connection attempt yields to every call waiting on it.
type Connecting = future::Shared<BoxFuture<'static, Result<Ready, Arc<io::Error>>>>;

enum State {
    Idle,
    Connecting(Connecting),
    Ready(Ready),
}

#[derive(Clone)]
struct Ready {
    send: SendRequest<Bytes>,
    shared: Arc<Shared>,
}

/// What the calls on a connection and its task share.
struct Shared {
    /// Set when the connection ended or refused a stream.
    closed: AtomicBool,
    /// Calls in flight (the connection pings only while there are some).
    active: AtomicUsize,
    scheme: Scheme,
    authority: Authority,
    user_agent: HeaderValue,
}

/// Counts a call in flight on its connection until its answer is read (or
/// abandoned).
struct Active(Arc<Shared>);

impl Active {
    fn new(shared: &Arc<Shared>) -> Active {
        shared.active.fetch_add(1, Ordering::Relaxed);
        Active(shared.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
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

    /// Sends a request (`head`'s URI a path; `body` its whole body, sent
    /// with the headers) and waits for the answer's headers; the caller reads
    /// the rest from the [`Answer`].
    ///
    /// Not an `async fn`: on a connection that is up, the stream is opened
    /// and the request written at once, and the future returned holds only
    /// the answer to come. An `async fn` would keep the request's head
    /// (224 bytes) in the future of every call in flight.
    pub fn send(
        &self,
        head: http::request::Parts,
        body: Bytes,
    ) -> impl Future<Output = Result<Answer, SendError>> + Send + use<> {
        let opened = match self.current() {
            Ok(ready) => Either::Left(std::future::ready(Connection::open(&ready, head, body))),
            // Not connected yet: wait for it (boxed: this path is rare, and
            // holds the request while it waits).
            Err(connecting) => Either::Right(
                async move {
                    let ready = connecting
                        .await
                        .map_err(|e| SendError::Transport(TransportError::Connect(copy(&e))))?;
                    Connection::open(&ready, head, body)
                }
                .boxed(),
            ),
        };
        async move {
            let (response, active) = opened.await?;
            let (head, recv) = response
                .await
                .map_err(|e| SendError::Status(status_of(e)))?
                .into_parts();
            Ok(Answer {
                head,
                body: AnswerBody {
                    recv,
                    _active: active,
                },
            })
        }
    }

    /// Opens a stream on `ready` and writes the request.
    fn open(
        ready: &Ready,
        mut head: http::request::Parts,
        body: Bytes,
    ) -> Result<(h2::client::ResponseFuture, Active), SendError> {
        let mut uri = http::uri::Parts::default();
        let shared = &ready.shared;
        uri.scheme = Some(shared.scheme.clone());
        uri.authority = Some(shared.authority.clone());
        uri.path_and_query = head.uri.path_and_query().cloned();
        head.uri = Uri::from_parts(uri)
            .map_err(|e| SendError::Transport(TransportError::Request(e.into())))?;
        if !head.headers.contains_key(USER_AGENT) {
            head.headers.insert(USER_AGENT, shared.user_agent.clone());
        }
        let end = body.is_empty();
        // A fresh handle has no stream pending, so it needs no `ready()`:
        // h2 checks the connection's state (an error, a GOAWAY) here. Before
        // the stream is open nothing was sent: any error is the
        // connection's, and the connection is made again by the next call.
        let (response, mut stream) = ready
            .send
            .clone()
            .send_request(http::Request::from_parts(head, ()), end)
            .map_err(|e| {
                shared.closed.store(true, Ordering::Relaxed);
                SendError::Transport(TransportError::Connection(e))
            })?;
        let active = Active::new(shared);
        if !end {
            // Beyond the stream's window h2 buffers it (within its send
            // buffer); a unary request is one small message.
            stream
                .send_data(body, true)
                .map_err(|e| SendError::Status(status_of(e)))?;
        }
        Ok((response, active))
    }

    /// A new attempt to connect, shared by the calls that wait on it.
    fn connect(&self) -> Connecting {
        connect(self.addr, self.connector.clone(), self.authority.clone())
            .boxed()
            .shared()
    }

    /// The connection if it is up, or the attempt to make it (started now
    /// if none is under way).
    fn current(&self) -> Result<Ready, Connecting> {
        let Ok(mut state) = self.state.lock() else {
            // Poisoned: only a panic in this module could do it; connect
            // without sharing rather than fail every call.
            return Err(self.connect());
        };
        if let State::Ready(r) = &*state {
            if !r.shared.closed.load(Ordering::Relaxed) {
                return Ok(r.clone());
            }
            *state = State::Idle;
        }
        if let State::Connecting(c) = &*state {
            match c.peek() {
                None => return Err(c.clone()),
                Some(Ok(r)) if !r.shared.closed.load(Ordering::Relaxed) => {
                    let r = r.clone();
                    *state = State::Ready(r.clone());
                    return Ok(r);
                }
                // Failed or already closed: a new attempt.
                Some(_) => {}
            }
        }
        let c = self.connect();
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

/// A shared connect error for one of the calls that waited on it: its kind
/// (which tells the balancer a refused address) and message.
fn copy(e: &io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        e.get_ref()
            .map_or_else(|| e.kind().to_string(), |inner| inner.to_string()),
    )
}

async fn connect(
    addr: SocketAddr,
    connector: Arc<Connector>,
    authority: Authority,
) -> Result<Ready, Arc<io::Error>> {
    let shared = Arc::new(Shared {
        closed: AtomicBool::new(false),
        active: AtomicUsize::new(0),
        scheme: connector.scheme.clone(),
        authority,
        user_agent: connector.user_agent.clone(),
    });
    let made = tokio::time::timeout(connector.connect_timeout, async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        match &connector.tls {
            None => handshake(tcp, connector.keepalive, shared).await,
            Some((tls, name)) => {
                let tls = tls.connect(name.clone(), tcp).await?;
                handshake(tls, connector.keepalive, shared).await
            }
        }
    })
    .await;
    match made {
        Ok(Ok(ready)) => Ok(ready),
        Ok(Err(e)) => Err(Arc::new(e)),
        Err(_) => Err(Arc::new(io::Error::new(
            io::ErrorKind::TimedOut,
            "connect timed out",
        ))),
    }
}

async fn handshake<T>(io: T, keepalive: Keepalive, shared: Arc<Shared>) -> io::Result<Ready>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        // Streams opened before the server's SETTINGS arrive (hyper's
        // figure): past it h2 holds them until the server's limit is known.
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .enable_push(false)
        .handshake::<T, Bytes>(io)
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(drive(connection, shared.clone(), keepalive));
    Ok(Ready { send, shared })
}

/// Runs a connection's reads and writes until it ends, pinging while calls
/// are in flight (`active`). The connection ends when the server closes it,
/// it breaks, a ping goes unanswered, or the pool dropped it and its last
/// call is answered (h2 closes it once no handle or stream is left).
async fn drive<T>(
    connection: client::Connection<T, Bytes>,
    shared: Arc<Shared>,
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
                let busy = shared.active.load(Ordering::Relaxed) > 0;
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
    shared.closed.store(true, Ordering::Relaxed);
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

/// An answer: its headers, then its body and trailers as read
/// ([`Answer::into_body`]). Dropping it before the end resets the stream
/// (CANCEL), so the downstream stops too.
pub struct Answer {
    /// Status and headers.
    pub head: http::response::Parts,
    body: AnswerBody,
}

impl Answer {
    /// The rest of the answer, once its headers are read (the future
    /// reading it then does not keep them).
    pub fn into_body(self) -> AnswerBody {
        self.body
    }
}

/// An answer's body and trailers.
pub struct AnswerBody {
    recv: h2::RecvStream,
    _active: Active,
}

impl AnswerBody {
    /// The next data frame (`None` after the last), its flow-control window
    /// given back as it is read.
    pub async fn data(&mut self) -> Option<Result<Bytes, Status>> {
        let data = poll_fn(|cx| self.recv.poll_data(cx)).await?;
        Some(match data {
            Ok(data) => {
                // Fails only once the stream is gone, which the next read reports.
                let _ = self.recv.flow_control().release_capacity(data.len());
                Ok(data)
            }
            Err(e) => Err(status_of(e)),
        })
    }

    /// The trailers, once the data is read.
    pub async fn trailers(&mut self) -> Result<Option<http::HeaderMap>, Status> {
        self.recv.trailers().await.map_err(status_of)
    }
}

#[cfg(test)]
mod tests;
