//! The shared Redis tier, so replicas share warm entries.
//!
//! Values are the encoded protobuf answer behind a small header (format
//! version, written-at wall-clock time, the entry's windows), so any replica
//! computes the same age. Every Redis call has its own short timeout and its
//! own circuit breaker; when Redis is slow or down, bfb skips it (counted)
//! and serves from the in-process tier and the downstream. Writes never wait:
//! they run in the background. The connection is made in the background too,
//! so bfb starts and serves while Redis is down. Which Redis (one server,
//! Sentinel, Cluster) is [`super::topology`]'s business.

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use redis::aio::ConnectionManagerConfig;
use tokio::time::Instant;

use super::topology::{Backend, ScanTarget};
use crate::{
    config::{BreakerSettings, RedisTopology},
    resilience::breaker::{Breaker, Outcome},
    telemetry::metrics::{Metrics, SharedLabels},
};

use super::Entry;

/// Wire format version of stored values.
const FORMAT: u8 = 1;
/// Header: format (1) + written-at ms (8) + ttl, revalidate, stale ms (4 each).
const HEADER: usize = 1 + 8 + 4 + 4 + 4;

/// Pub/sub channel of invalidations: payload `entity_id|component,component`.
pub const INVALIDATIONS: &str = "bfb:cache:invalidate";

/// The shared tier.
pub struct SharedTier {
    conn: Arc<OnceLock<Backend>>,
    timeout: Duration,
    breaker: Arc<Breaker>,
    metrics: Arc<Metrics>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Encodes an entry for Redis.
fn encode(e: &Entry) -> Bytes {
    let written = SystemTime::now()
        .checked_sub(e.written.elapsed())
        .unwrap_or(UNIX_EPOCH);
    let mut b = BytesMut::with_capacity(HEADER + e.bytes.len());
    b.put_u8(FORMAT);
    b.put_u64(unix_ms(written));
    b.put_u32(ms(e.ttl));
    b.put_u32(ms(e.revalidate));
    b.put_u32(ms(e.stale_ttl));
    b.put_slice(&e.bytes);
    b.freeze()
}

/// Decodes a stored value; `None` for another format or garbage.
fn decode(mut v: Bytes) -> Option<Entry> {
    if v.len() < HEADER || v.get_u8() != FORMAT {
        return None;
    }
    let written_ms = v.get_u64();
    let ttl = Duration::from_millis(u64::from(v.get_u32()));
    let revalidate = Duration::from_millis(u64::from(v.get_u32()));
    let stale_ttl = Duration::from_millis(u64::from(v.get_u32()));
    let age = Duration::from_millis(unix_ms(SystemTime::now()).saturating_sub(written_ms));
    let now = Instant::now();
    Some(Entry {
        bytes: v,
        written: now.checked_sub(age).unwrap_or(now),
        ttl,
        revalidate,
        stale_ttl,
    })
}

impl SharedTier {
    /// Connects to `topology` in the background; calls made before the
    /// connection exists skip Redis.
    pub fn start(topology: RedisTopology, timeout: Duration, metrics: Arc<Metrics>) -> SharedTier {
        let conn = Arc::new(OnceLock::new());
        let slot = conn.clone();
        tokio::spawn(async move {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(2));
            let mut wait = Duration::from_millis(100);
            loop {
                match Backend::connect(&topology, config.clone(), timeout).await {
                    Ok(backend) => {
                        if let Backend::Sentinel(m) = &backend {
                            m.watch();
                        }
                        let _ = slot.set(backend);
                        tracing::info!("redis cache tier connected");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "redis cache tier unavailable; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        SharedTier {
            conn,
            timeout,
            breaker: Arc::new(Breaker::new(BreakerSettings {
                window: 20,
                min_calls: 5,
                failure_rate: 0.5,
                slow_call_rate: 1.0,
                slow_call: timeout,
                open_for: Duration::from_secs(2),
                half_open_probes: 1,
            })),
            metrics,
        }
    }

    fn count(&self, result: &'static str) {
        self.metrics
            .cache_shared
            .get_or_create(&SharedLabels { result })
            .inc();
    }

    /// Reads `key`, within the tier's timeout.
    pub(super) async fn get(&self, key: &str) -> Option<Entry> {
        let Some(conn) = self.conn.get() else {
            self.count("unconnected");
            return None;
        };
        let Some(permit) = self.breaker.acquire() else {
            self.count("breaker_open");
            return None;
        };
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        let get = conn.query::<Option<Vec<u8>>>(&cmd);
        match tokio::time::timeout(self.timeout, get).await {
            Ok(Ok(value)) => {
                permit.finish(Outcome::Success { slow: false });
                match value.map(Bytes::from).and_then(decode) {
                    Some(e) => {
                        self.count("hit");
                        Some(e)
                    }
                    None => {
                        self.count("miss");
                        None
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis get failed");
                permit.finish(Outcome::Failure);
                self.count(failure(&e));
                None
            }
            Err(_) => {
                permit.finish(Outcome::Failure);
                self.count("timeout");
                None
            }
        }
    }

    /// Deletes the keys `matches` accepts (found with SCAN on every master,
    /// so Redis is not blocked) and publishes the invalidation to every
    /// replica. Returns (keys deleted, published).
    pub(super) async fn invalidate(
        &self,
        pattern: &str,
        matches: impl Fn(&str) -> bool,
        payload: &str,
    ) -> (u64, bool) {
        let Some(conn) = self.conn.get() else {
            return (0, false);
        };
        let mut deleted = 0;
        for mut master in conn.masters().await {
            deleted += scan_delete(&mut master, conn, pattern, &matches).await;
        }
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(INVALIDATIONS).arg(payload);
        let published = conn.query::<u64>(&publish).await.is_ok();
        (deleted, published)
    }

    /// Listens for invalidations from other replicas (reconnecting when the
    /// connection drops, to the new master after a failover, or to the next
    /// node of a cluster) and hands each payload to `apply`.
    pub(super) fn subscribe(&self, apply: impl Fn(String) + Send + Sync + 'static) {
        let conn = self.conn.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut wait = Duration::from_millis(100);
            let mut attempt = 0;
            loop {
                let Some(backend) = conn.get() else {
                    // Not connected yet: subscribe as soon as it is.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let client = backend.pubsub_client(attempt).await;
                attempt += 1;
                if let Some(client) = client {
                    match client.get_async_pubsub().await {
                        Ok(mut pubsub) => {
                            if pubsub.subscribe(INVALIDATIONS).await.is_ok() {
                                wait = Duration::from_millis(100);
                                let mut messages = pubsub.into_on_message();
                                while let Some(msg) = messages.next().await {
                                    if let Ok(payload) = msg.get_payload::<String>() {
                                        apply(payload);
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "invalidation subscriber: redis unavailable")
                        }
                    }
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        });
    }

    /// Writes `key` in the background; it expires when the entry is gone.
    pub(super) fn put(&self, key: String, entry: &Entry) {
        let Some(conn) = self.conn.get() else {
            return;
        };
        let Some(permit) = self.breaker.acquire() else {
            self.count("breaker_open");
            return;
        };
        let conn = conn.clone();
        let value = encode(entry);
        let px = (entry.ttl + entry.stale_ttl).as_millis().max(1);
        let timeout = self.timeout;
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut cmd = redis::cmd("SET");
            cmd.arg(&key)
                .arg(value.as_ref())
                .arg("PX")
                .arg(u64::try_from(px).unwrap_or(u64::MAX));
            let set = conn.query::<()>(&cmd);
            let result = match tokio::time::timeout(timeout, set).await {
                Ok(Ok(())) => {
                    permit.finish(Outcome::Success { slow: false });
                    "written"
                }
                Ok(Err(e)) => {
                    permit.finish(Outcome::Failure);
                    failure(&e)
                }
                Err(_) => {
                    permit.finish(Outcome::Failure);
                    "timeout"
                }
            };
            metrics
                .cache_shared
                .get_or_create(&SharedLabels { result })
                .inc();
        });
    }
}

/// SCANs one master for `pattern` and deletes the keys `matches` accepts,
/// one by one through `conn` (a cluster refuses a DEL of keys in several
/// slots). Returns how many were deleted.
async fn scan_delete(
    master: &mut ScanTarget,
    conn: &Backend,
    pattern: &str,
    matches: &impl Fn(&str) -> bool,
) -> u64 {
    let mut deleted = 0;
    let mut cursor: u64 = 0;
    loop {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500);
        let Ok((next, keys)) = master.query::<(u64, Vec<String>)>(&scan).await else {
            break;
        };
        for key in keys.iter().filter(|k| matches(k)) {
            let mut del = redis::cmd("DEL");
            del.arg(key);
            deleted += conn.query::<u64>(&del).await.unwrap_or(0);
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    deleted
}

/// The result label of a failed Redis call. The connection's own response
/// timeout (equal to the tier's) usually fires before bfb's timer and comes
/// back as an error: count it as the timeout it is.
fn failure(e: &redis::RedisError) -> &'static str {
    if e.is_timeout() { "timeout" } else { "error" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_round_trip_with_their_age() {
        let e = Entry {
            bytes: Bytes::from_static(b"proto"),
            written: Instant::now() - Duration::from_secs(7),
            ttl: Duration::from_secs(30),
            revalidate: Duration::from_secs(10),
            stale_ttl: Duration::from_secs(300),
        };
        let back = decode(encode(&e)).expect("decodes");
        assert_eq!(back.bytes, e.bytes);
        assert_eq!(
            (back.ttl, back.revalidate, back.stale_ttl),
            (e.ttl, e.revalidate, e.stale_ttl)
        );
        let age = back.written.elapsed();
        assert!(
            age >= Duration::from_secs(6) && age <= Duration::from_secs(8),
            "{age:?}"
        );
        assert!(decode(Bytes::from_static(b"\x02garbage-of-some-length")).is_none());
        assert!(decode(Bytes::from_static(b"\x01")).is_none());
    }
}
