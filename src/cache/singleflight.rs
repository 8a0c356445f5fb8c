//! Request coalescing: concurrent fetches of one key share one call.
//!
//! Hand-written (~60 lines) over `futures::future::Shared` because bfb needs
//! two properties the crates we looked at do not combine: errors are never
//! remembered (the next caller after a failure starts a new call), and when
//! every waiter goes away (caller cancelled or deadline passed) the shared
//! call is dropped, which cancels the downstream request. The map holds only
//! weak handles; the waiters hold the strong ones.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::future::{BoxFuture, FutureExt, Shared, WeakShared};

type Flight<V> = Shared<BoxFuture<'static, V>>;
/// The map's view of a flight: its generation and a weak handle.
type WeakFlight<V> = (u64, WeakShared<BoxFuture<'static, V>>);

/// Coalesces concurrent calls by key.
pub struct SingleFlight<V: Clone> {
    flights: Mutex<HashMap<String, WeakFlight<V>>>,
    next: AtomicU64,
}

impl<V: Clone + Send + Sync + 'static> Default for SingleFlight<V> {
    fn default() -> Self {
        SingleFlight {
            flights: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        }
    }
}

impl<V: Clone + Send + Sync + 'static> SingleFlight<V> {
    /// Runs `make()` for `key`, or joins the call already running for it.
    /// Returns the value and whether this caller led the call.
    pub async fn run<F, Fut>(&self, key: &str, make: F) -> (V, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let (flight, generation, leader) = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            match flights.get(key).and_then(|(_, weak)| weak.upgrade()) {
                Some(flight) => (flight, 0, false),
                None => {
                    let flight: Flight<V> = make().boxed().shared();
                    let generation = self.next.fetch_add(1, Ordering::Relaxed);
                    if let Some(weak) = flight.downgrade() {
                        flights.insert(key.to_string(), (generation, weak));
                    }
                    (flight, generation, true)
                }
            }
        };
        let value = flight.await;
        if leader {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            if flights.get(key).is_some_and(|(g, _)| *g == generation) {
                flights.remove(key);
            }
        }
        (value, leader)
    }

    /// Keys with a call in flight (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        self.flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|(_, w)| w.upgrade().is_some())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{sync::Arc, time::Duration};

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_call() {
        let sf = Arc::new(SingleFlight::<u32>::default());
        let calls = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (sf, calls) = (sf.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                sf.run("k", || async move {
                    calls.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    7
                })
                .await
            }));
        }
        let mut leaders = 0;
        for t in tasks {
            let (v, led) = t.await.expect("join");
            assert_eq!(v, 7);
            leaders += usize::from(led);
        }
        assert_eq!((calls.load(Ordering::Relaxed), leaders), (1, 1));
        assert_eq!(sf.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_not_remembered() {
        let sf = SingleFlight::<Result<u32, &'static str>>::default();
        let (v, _) = sf.run("k", || async { Err("down") }).await;
        assert_eq!(v, Err("down"));
        let (v, led) = sf.run("k", || async { Ok(1) }).await;
        assert_eq!((v, led), (Ok(1), true));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_nobody_waits_for_is_dropped() {
        let sf = Arc::new(SingleFlight::<u32>::default());
        let dropped = Arc::new(AtomicU64::new(0));
        struct OnDrop(Arc<AtomicU64>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let d = dropped.clone();
        let waiter = tokio::spawn({
            let sf = sf.clone();
            async move {
                sf.run("k", move || async move {
                    let _guard = OnDrop(d);
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    1
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(
            dropped.load(Ordering::Relaxed),
            1,
            "the shared call was cancelled"
        );
        let (v, led) = sf.run("k", || async { 2 }).await;
        assert_eq!((v, led), (2, true), "a new leader starts");
    }
}
