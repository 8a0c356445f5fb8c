//! The TLS accept loop: accepted sockets wait, each under a deadline, until
//! their client speaks; then they handshake in a task of their own. Both
//! stages are capped, and the loop never waits for room: it makes room.
//!
//! Why this shape: a semaphore in front of `accept` (the first design) let
//! 256 idle sockets lock every client out for the whole handshake timeout.
//!
//! - **Silent sockets** (accepted, nothing received) cost a file descriptor
//!   and a small future, so many may wait: `tls.max_pending_connections`
//!   (default 4096). The loop owns them itself (a `FuturesUnordered` of
//!   "readable" futures, polled before new accepts), so it knows exactly
//!   which have sent nothing; at the cap the oldest is closed. A real
//!   client sends its ClientHello the moment it connects and leaves this
//!   stage at once. The cap is deliberately large: closing a socket makes a
//!   flooding attacker reconnect at once, and a small cap turns that into a
//!   churn that keeps the kernel's accept queue full (new SYNs are then
//!   dropped and retried after a second).
//! - **Handshakes** (the client spoke) hold rustls' buffers and CPU:
//!   `tls.max_handshakes` (default 256) run at once; at the cap the oldest
//!   is dropped, so a slow-handshake flood cannot stop new clients either.
//!
//! Everything is bounded: at most `max_pending_connections +
//! max_handshakes` sockets are held before their connection is served.

use std::{collections::VecDeque, future::Future, io, time::Duration};

use futures::{
    StreamExt,
    future::{AbortHandle, Abortable},
    stream::FuturesUnordered,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::Instant,
};

use crate::telemetry::metrics::{GaugeGuard, HandshakeMetrics};

/// A socket in the waiting room: resolves to (its id, the socket, its
/// deadline, what its client did).
type Waiting = std::pin::Pin<Box<dyn Future<Output = (u64, TcpStream, Instant, Spoke)> + Send>>;

/// What a silent socket's client did while it waited.
enum Spoke {
    /// Sent its first bytes: on to the handshake.
    Yes,
    /// Closed the connection (or it failed).
    Left,
    /// Nothing, until the deadline.
    Silent,
}

/// The caps of the two stages and the time a socket has to complete both.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// Accepted sockets that have sent nothing yet.
    pub max_silent: usize,
    /// Handshakes running at once.
    pub max_handshakes: usize,
    /// From accept to a completed handshake.
    pub timeout: Duration,
}

/// Accepts from `listener` until `tx` closes; every socket that completes
/// `handshake` within the timeout of its accept is sent to `tx`.
pub(super) async fn run<C, H, F>(
    listener: TcpListener,
    limits: Limits,
    metrics: HandshakeMetrics,
    tx: mpsc::Sender<C>,
    handshake: H,
) where
    C: Send + 'static,
    H: Fn(TcpStream) -> F,
    F: Future<Output = io::Result<C>> + Send + 'static,
{
    // Silent sockets by id, oldest (lowest id) first, and their futures.
    let mut silent: VecDeque<(u64, AbortHandle)> = VecDeque::new();
    let mut waiting: FuturesUnordered<Abortable<Waiting>> = FuturesUnordered::new();
    // Running handshakes, oldest first; finished ones are pruned when room
    // is needed.
    let mut handshakes: VecDeque<tokio::task::AbortHandle> = VecDeque::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            // Sockets that spoke (or timed out) first: they free room and
            // must not wait behind a flood of new accepts.
            biased;
            Some(done) = waiting.next(), if !waiting.is_empty() => {
                // Aborted (shed): already out of `silent`, socket dropped.
                let Ok((id, tcp, deadline, spoke)) = done else { continue };
                if let Ok(at) = silent.binary_search_by_key(&id, |(id, _)| *id) {
                    silent.remove(at);
                }
                match spoke {
                    Spoke::Yes => {}
                    Spoke::Left => continue,
                    Spoke::Silent => {
                        metrics.dropped("timeout");
                        tracing::debug!("TLS client sent nothing before tls.handshake_timeout");
                        continue;
                    }
                }
                make_room(&mut handshakes, limits.max_handshakes, &metrics);
                let work = handshake(tcp);
                let (tx, metrics) = (tx.clone(), metrics.clone());
                let task = tokio::spawn(async move {
                    let in_progress = metrics.started();
                    match tokio::time::timeout_at(deadline, work).await {
                        Ok(Ok(conn)) => {
                            drop(in_progress);
                            let _ = tx.send(conn).await;
                        }
                        Ok(Err(e)) => {
                            metrics.dropped("failed");
                            tracing::info!(error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics.dropped("timeout");
                            tracing::info!("TLS handshake timed out");
                        }
                    }
                });
                handshakes.push_back(task.abort_handle());
            }
            accepted = listener.accept() => {
                let tcp = match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                if silent.len() >= limits.max_silent.max(1)
                    && let Some((_, oldest)) = silent.pop_front()
                {
                    // Dropping its future closes the socket.
                    oldest.abort();
                    metrics.dropped("shed");
                    tracing::debug!("silent TLS connection shed: at tls.max_pending_connections");
                }
                let deadline = Instant::now() + limits.timeout;
                let (abort, registration) = AbortHandle::new_pair();
                let guard = metrics.started();
                let id = next_id;
                next_id += 1;
                waiting.push(Abortable::new(
                    Box::pin(async move {
                        let _in_progress: GaugeGuard = guard;
                        // `peek`, not `readable`: readiness may be a false
                        // positive; a byte is proof. EOF or an error: gone.
                        let mut first = [0u8; 1];
                        let heard = tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await;
                        let spoke = match heard {
                            Ok(Ok(n)) if n > 0 => Spoke::Yes,
                            Ok(_) => Spoke::Left,
                            Err(_) => Spoke::Silent,
                        };
                        (id, tcp, deadline, spoke)
                    }),
                    registration,
                ));
                silent.push_back((id, abort));
            }
            () = tx.closed() => return,
        }
    }
}

/// Makes room for one more handshake: drops the oldest when at `max`.
fn make_room(
    handshakes: &mut VecDeque<tokio::task::AbortHandle>,
    max: usize,
    metrics: &HandshakeMetrics,
) {
    let max = max.max(1);
    if handshakes.len() < max {
        return;
    }
    handshakes.retain(|t| !t.is_finished());
    if handshakes.len() >= max
        && let Some(oldest) = handshakes.pop_front()
    {
        // Dropping the task closes its socket.
        oldest.abort();
        metrics.dropped("shed");
        tracing::debug!("TLS handshake shed: at tls.max_handshakes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn at_the_cap_the_oldest_running_handshake_goes() {
        let metrics = crate::telemetry::metrics::Metrics::new().handshakes();
        let tasks: Vec<_> = (0..3)
            .map(|_| tokio::spawn(std::future::pending::<()>()))
            .collect();
        let mut running: VecDeque<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        make_room(&mut running, 4, &metrics);
        assert_eq!(running.len(), 3, "under the cap nothing goes");
        make_room(&mut running, 3, &metrics);
        assert_eq!(running.len(), 2);
        let mut tasks = tasks.into_iter();
        let oldest = tasks.next().expect("task");
        assert!(oldest.await.expect_err("aborted").is_cancelled());
        // Finished ones are pruned before anything is dropped.
        let second = tasks.next().expect("task");
        second.abort();
        let _ = second.await;
        make_room(&mut running, 2, &metrics);
        assert_eq!(
            running.len(),
            1,
            "the finished one pruned, the live one kept"
        );
        assert!(!running[0].is_finished());
    }
}
