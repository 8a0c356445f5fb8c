//! The transport against real servers on loopback: bfb's own sim (tonic),
//! and a bare h2 server for what a tonic server will not do (stop
//! answering).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::Code;

use http::uri::PathAndQuery;

use super::{
    super::unary::{encode, read, request_head, status_of},
    *,
};
use crate::{
    pb::downstream::profile::v1::{GetProfileRequest, GetProfileResponse},
    sim::{self, SimConfig},
};

/// A GetProfile call over `connection`, framed as `Unary` frames it.
async fn get_profile(
    connection: &Connection,
    request: tonic::Request<GetProfileRequest>,
) -> Result<GetProfileResponse, tonic::Status> {
    let (metadata, _, message) = request.into_parts();
    let path = PathAndQuery::from_static("/downstream.profile.v1.ProfileService/GetProfile");
    let answer = connection
        .send(request_head(metadata, path), encode(&message))
        .await
        .map_err(status_of)?;
    read(answer, 1 << 20).await
}

fn request() -> tonic::Request<GetProfileRequest> {
    tonic::Request::new(GetProfileRequest {
        customer_id: "c-1".into(),
    })
}

/// The sim on `listener` until `stop` fires (or is dropped).
fn serve_sim(listener: TcpListener) -> (oneshot::Sender<()>, JoinHandle<()>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = sim::serve(SimConfig::default(), listener, async {
            let _ = stopped.await;
        })
        .await;
    });
    (stop, task)
}

fn connector() -> Arc<Connector> {
    Arc::new(Connector::plain(Duration::from_secs(5)))
}

/// The connection's current state, if it is up: to tell connections apart.
fn current(c: &Connection) -> Option<Arc<Shared>> {
    match &*c.state.lock().expect("state") {
        State::Ready(r) => Some(r.shared.clone()),
        // Made, and taken up as Ready by the next call.
        State::Connecting(c) => c
            .peek()
            .and_then(|r| r.as_ref().ok())
            .map(|r| r.shared.clone()),
        State::Idle => None,
    }
}

#[tokio::test]
async fn calls_reach_a_real_server_over_one_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_stop, _task) = serve_sim(listener);
    let connection = Arc::new(Connection::new(addr, connector()));
    let first = get_profile(&connection, request())
        .await
        .expect("first call");
    assert!(first.profile.is_some());
    let made = current(&connection).expect("connected");
    // Concurrent calls share it.
    let calls = (0..20).map(|_| get_profile(&connection, request()));
    for r in futures::future::join_all(calls).await {
        assert!(r.expect("call").profile.is_some());
    }
    let still = current(&connection).expect("connected");
    assert!(Arc::ptr_eq(&made, &still), "one connection for every call");
    // The downstream's answer (NOT_FOUND here) passes through as its own.
    let nobody = tonic::Request::new(GetProfileRequest {
        customer_id: "nobody".into(),
    });
    let missing = get_profile(&connection, nobody)
        .await
        .expect_err("unknown customer");
    assert_eq!(missing.code(), Code::NotFound);
    assert!(std::error::Error::source(&missing).is_none());
}

#[tokio::test]
async fn a_refused_connection_is_a_transport_failure_naming_its_cause() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let connection = Connection::new(addr, connector());
    let (head, ()) = http::Request::new(()).into_parts();
    let Err(SendError::Transport(TransportError::Connect(io))) =
        connection.send(head, Bytes::new()).await
    else {
        panic!("expected a connect error");
    };
    assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn a_connection_the_server_closes_is_made_again_by_the_next_call() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, task) = serve_sim(listener);
    let connection = Arc::new(Connection::new(addr, connector()));
    get_profile(&connection, request())
        .await
        .expect("first call");
    let first = current(&connection).expect("connected");
    // The server goes away (GOAWAY, then the socket closes) ...
    let _ = stop.send(());
    task.await.expect("sim stopped");
    tokio::time::timeout(Duration::from_secs(10), async {
        while !first.closed.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the connection is seen closed");
    let refused = get_profile(&connection, request())
        .await
        .expect_err("nobody listens");
    assert!(std::error::Error::source(&refused).is_some(), "{refused:?}");
    // ... and comes back on the same address: the next call reconnects.
    let listener = TcpListener::bind(addr).await.expect("bind again");
    let (_stop, _task) = serve_sim(listener);
    get_profile(&connection, request())
        .await
        .expect("after the restart");
    let second = current(&connection).expect("connected");
    assert!(!Arc::ptr_eq(&first, &second), "a new connection");
}

/// A bare HTTP/2 server: the first connection it accepts completes the
/// handshake and then never reads again (a peer that hangs); later ones
/// answer every request with an empty gRPC message, or reset its stream
/// with the reason code in its `x-reset` header.
async fn hanging_then_answering(listener: TcpListener) {
    let mut held = Vec::new();
    let mut first = true;
    while let Ok((socket, _)) = listener.accept().await {
        let Ok(mut conn) = h2::server::handshake(socket).await else {
            continue;
        };
        if std::mem::take(&mut first) {
            held.push(conn);
            continue;
        }
        tokio::spawn(async move {
            while let Some(Ok((request, mut respond))) = conn.accept().await {
                let reset = request
                    .headers()
                    .get("x-reset")
                    .and_then(|v| v.to_str().ok());
                if let Some(code) = reset.and_then(|v| v.parse::<u32>().ok()) {
                    respond.send_reset(Reason::from(code));
                    continue;
                }
                let response = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(())
                    .expect("response");
                let Ok(mut body) = respond.send_response(response, false) else {
                    continue;
                };
                let _ = body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false);
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let _ = body.send_trailers(trailers);
            }
        });
    }
}

#[tokio::test]
async fn a_connection_that_stops_answering_is_dropped_by_keepalive_and_made_again() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    tokio::spawn(hanging_then_answering(listener));
    // The default keepalive (a ping every 30 s, 10 s to answer), on paused
    // time once the call's stream is open.
    let connection = Arc::new(Connection::new(addr, connector()));
    let c = connection.clone();
    // No deadline on the call: only the unanswered ping can end it.
    let call = tokio::spawn(async move { get_profile(&c, request()).await });
    tokio::time::timeout(Duration::from_secs(10), async {
        while current(&connection).is_none_or(|s| s.active.load(Ordering::Relaxed) == 0) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the call's stream opens");
    tokio::time::pause();
    let started = tokio::time::Instant::now();
    let hung = tokio::time::timeout(Duration::from_secs(120), call)
        .await
        .expect("keepalive ended the call")
        .expect("call task")
        .expect_err("no answer");
    let waited = started.elapsed();
    tokio::time::resume();
    assert!(std::error::Error::source(&hung).is_some(), "{hung:?}");
    assert!(
        waited >= Duration::from_secs(35) && waited < Duration::from_secs(80),
        "dropped after {waited:?}: at most one interval and one timeout"
    );
    let answered = get_profile(&connection, request())
        .await
        .expect("a new connection");
    assert!(answered.profile.is_none());
    // A stream the downstream resets is its answer, mapped as gRPC maps
    // HTTP/2 errors, not a transport failure (no source).
    for (reason, code) in [
        (Reason::REFUSED_STREAM, Code::Unavailable),
        (Reason::INTERNAL_ERROR, Code::Internal),
        (Reason::ENHANCE_YOUR_CALM, Code::ResourceExhausted),
    ] {
        let mut r = request();
        let value = u32::from(reason).to_string().parse().expect("ascii");
        r.metadata_mut().insert("x-reset", value);
        let status = get_profile(&connection, r).await.expect_err("reset");
        assert_eq!(status.code(), code, "{status:?}");
        assert!(std::error::Error::source(&status).is_none(), "{status:?}");
    }
}
