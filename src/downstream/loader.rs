//! DataLoader-style batching: single lookups made by concurrent work go
//! downstream as one batch call. A loader collects requests for a short
//! `window` after the first one (or until `max_batch`), sends them as one
//! batch through the downstream's batch RPC, and hands each caller its own
//! item's result; a per-item error (NOT_FOUND) stays with that item.
//!
//! A loader belongs to one inbound request (a BatchGetCustomers or one
//! StreamUserActivity): batches never mix callers, so the identity and
//! request id that go downstream are that caller's, and the batch runs
//! under that caller's deadline. Written here rather than taken from the
//! `dataloader` crate because it must carry bfb's deadline, error type and
//! request context, which that crate's `BatchFn` has no place for.

use std::{future::Future, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use crate::resilience::CallError;
use crate::{deadline::Deadline, error::Reason, telemetry::rpc::RequestContext};

type Reply<T> = oneshot::Sender<Result<T, CallError>>;

/// The batch call of a loader: the collected requests, in order, to one
/// result per request, in the same order.
pub type BatchFn<M, T> = Arc<
    dyn Fn(Vec<M>, Deadline) -> BoxFuture<'static, Result<Vec<Result<T, CallError>>, CallError>>
        + Send
        + Sync,
>;

/// Collects single requests into batch calls (see the module docs).
pub struct Loader<M, T> {
    tx: mpsc::UnboundedSender<(M, Reply<T>)>,
}

// By hand: a derive would require `M: Clone, T: Clone`.
impl<M, T> Clone for Loader<M, T> {
    fn clone(&self) -> Self {
        Loader {
            tx: self.tx.clone(),
        }
    }
}

impl<M: Send + 'static, T: Send + 'static> Loader<M, T> {
    /// A loader whose batches run under `deadline`, in the current request's
    /// context. Its collector stops when the last clone is dropped.
    pub fn new(
        deadline: Deadline,
        window: Duration,
        max_batch: usize,
        batch: BatchFn<M, T>,
    ) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(M, Reply<T>)>();
        let context = RequestContext::current();
        let collect = async move {
            while let Some(first) = rx.recv().await {
                let mut items = vec![first];
                let until = tokio::time::Instant::now() + window;
                while items.len() < max_batch {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(item)) => items.push(item),
                        Ok(None) | Err(_) => break,
                    }
                }
                // In the request's context: the batch carries its request id
                // and caller downstream like any call made for it.
                let send = dispatch(items, deadline, batch.clone());
                tokio::spawn(RequestContext::within(context.clone(), send));
            }
        };
        tokio::spawn(collect);
        Loader { tx }
    }

    /// This request's result, from the batch it lands in.
    pub fn load(
        &self,
        message: M,
    ) -> impl Future<Output = Result<T, CallError>> + Send + use<M, T> {
        let (reply, result) = oneshot::channel();
        let sent = self.tx.send((message, reply));
        async move {
            if sent.is_err() {
                return Err(CallError::Failed(Reason::Unavailable));
            }
            // The collector never drops a reply without answering unless the
            // runtime is shutting down.
            result
                .await
                .unwrap_or(Err(CallError::Failed(Reason::Unavailable)))
        }
    }
}

/// Sends one batch and answers its callers; callers that already went away
/// are left out of the batch.
async fn dispatch<M, T>(items: Vec<(M, Reply<T>)>, deadline: Deadline, batch: BatchFn<M, T>)
where
    M: Send + 'static,
    T: Send + 'static,
{
    let (messages, replies): (Vec<M>, Vec<Reply<T>>) =
        items.into_iter().filter(|(_, r)| !r.is_closed()).unzip();
    if messages.is_empty() {
        return;
    }
    let expected = messages.len();
    match batch(messages, deadline).await {
        Ok(results) if results.len() == expected => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        Ok(_) => {
            for reply in replies {
                let _ = reply.send(Err(CallError::Failed(Reason::BadResponse)));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// A per-item outcome of a batch RPC: the answer, or the item's gRPC code.
pub fn item<T>(response: Option<T>, error_code: u32) -> Result<T, CallError> {
    match (error_code, response) {
        (0, Some(r)) => Ok(r),
        (5, _) => Err(CallError::NotFound),
        (0, None) => Err(CallError::Failed(Reason::BadResponse)),
        _ => Err(CallError::Failed(Reason::DownstreamError)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn deadline() -> Deadline {
        Deadline::detached(Duration::from_secs(5), &crate::config::Deadlines::default())
    }

    /// Doubles each number; 13 is "not found". Counts batches.
    fn doubler(
        calls: Arc<AtomicUsize>,
        sizes: Arc<std::sync::Mutex<Vec<usize>>>,
    ) -> BatchFn<u32, u32> {
        Arc::new(move |items: Vec<u32>, _| {
            calls.fetch_add(1, Ordering::Relaxed);
            sizes.lock().expect("lock").push(items.len());
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(items
                    .into_iter()
                    .map(|n| {
                        if n == 13 {
                            Err(CallError::NotFound)
                        } else {
                            Ok(n * 2)
                        }
                    })
                    .collect())
            })
        })
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_loads_become_capped_batches_with_per_item_results() {
        let calls = Arc::new(AtomicUsize::new(0));
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let loader = Loader::new(
            deadline(),
            Duration::from_millis(2),
            40,
            doubler(calls.clone(), sizes.clone()),
        );
        let results = futures::future::join_all((0..100).map(|n| loader.load(n))).await;
        for (n, r) in results.into_iter().enumerate() {
            if n == 13 {
                assert_eq!(r, Err(CallError::NotFound), "stays with its item");
            } else {
                assert_eq!(r, Ok(n as u32 * 2));
            }
        }
        assert_eq!(
            calls.load(Ordering::Relaxed),
            3,
            "100 loads, batches of at most 40"
        );
        assert_eq!(*sizes.lock().expect("lock"), [40, 40, 20]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_batch_fails_each_item_and_the_next_batch_is_new() {
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let f = fail.clone();
        let batch: BatchFn<u32, u32> = Arc::new(move |items: Vec<u32>, _| {
            let fail = f.swap(false, Ordering::Relaxed);
            Box::pin(async move {
                if fail {
                    Err(CallError::Failed(Reason::Unavailable))
                } else {
                    Ok(items.into_iter().map(Ok).collect())
                }
            })
        });
        let loader = Loader::new(deadline(), Duration::from_millis(1), 10, batch);
        let (a, b) = tokio::join!(loader.load(1), loader.load(2));
        assert_eq!(a, Err(CallError::Failed(Reason::Unavailable)));
        assert_eq!(b, Err(CallError::Failed(Reason::Unavailable)));
        assert_eq!(loader.load(3).await, Ok(3));
    }

    #[test]
    fn batch_items_map_codes() {
        assert_eq!(item(Some(1), 0), Ok(1));
        assert_eq!(item::<u8>(None, 5), Err(CallError::NotFound));
        assert_eq!(
            item::<u8>(None, 0),
            Err(CallError::Failed(Reason::BadResponse))
        );
        assert_eq!(
            item::<u8>(None, 13),
            Err(CallError::Failed(Reason::DownstreamError))
        );
    }
}
