//! Cache semantics on paused time, with a fake downstream.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU32, Ordering},
};

use super::*;
use crate::pb::downstream::profile::v1::{GetProfileResponse, Profile};

const TTL: Duration = Duration::from_secs(10);
const SWR: Duration = Duration::from_secs(5);
const STALE: Duration = Duration::from_secs(60);

fn settings() -> CacheSettings {
    CacheSettings {
        enabled: true,
        ttl: TTL,
        stale_while_revalidate: SWR,
        stale_ttl: STALE,
        jitter: 0.0,
        ..CacheSettings::default()
    }
}

fn cache(s: CacheSettings) -> Arc<Cache> {
    Cache::new(&s, &Deadlines::default(), Arc::new(Metrics::new()))
}

fn deadline() -> Deadline {
    Deadline::detached(Duration::from_secs(2), &Deadlines::default())
}

/// A fake downstream: counts calls, answers with the call number as the
/// display name, or fails with `Unavailable` while `down` is set.
#[derive(Clone, Default)]
struct Fake {
    calls: Arc<AtomicU32>,
    down: Arc<AtomicBool>,
    error: Option<CallError>,
}

impl Fake {
    fn live(&self) -> impl Fn(Deadline) -> BoxLive + Send + Sync + 'static {
        let f = self.clone();
        move |_| {
            let n = f.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let down = f.down.load(Ordering::SeqCst);
            let error = f.error.unwrap_or(CallError::Failed(Reason::Unavailable));
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if down {
                    return Err(error);
                }
                Ok(GetProfileResponse {
                    profile: Some(Profile {
                        display_name: n.to_string(),
                        ..Default::default()
                    }),
                })
            })
        }
    }
    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

type BoxLive = futures::future::BoxFuture<'static, Result<GetProfileResponse, CallError>>;

fn key(id: &str) -> Key<'_> {
    Key {
        component: Component::Profile,
        scope: "",
        id,
        window: None,
    }
}

async fn get(
    c: &Arc<Cache>,
    f: &Fake,
    policy: Policy,
    required: bool,
) -> Result<(String, Source), CallError> {
    c.fetch(key("c-1"), policy, required, deadline(), f.live())
        .await
        .map(|(v, s): (GetProfileResponse, Source)| (v.profile.unwrap_or_default().display_name, s))
}

#[tokio::test(start_paused = true)]
async fn a_miss_is_fetched_once_then_served_fresh() {
    let (c, f) = (cache(settings()), Fake::default());
    assert_eq!(
        get(&c, &f, Policy::default(), false).await,
        Ok(("1".into(), Source::Live))
    );
    tokio::time::advance(Duration::from_secs(3)).await;
    let (v, s) = get(&c, &f, Policy::default(), false).await.expect("hit");
    assert_eq!(v, "1");
    assert!(matches!(s, Source::Cache { age } if age >= Duration::from_secs(3)));
    assert_eq!(f.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn stale_entries_are_served_at_once_and_refreshed_once() {
    let (c, f) = (cache(settings()), Fake::default());
    get(&c, &f, Policy::default(), false).await.expect("warm");
    tokio::time::advance(TTL + Duration::from_secs(1)).await;
    for _ in 0..5 {
        let (v, s) = get(&c, &f, Policy::default(), false).await.expect("stale");
        assert_eq!(v, "1", "the stale value, at once");
        assert!(matches!(s, Source::Cache { .. }));
    }
    // Let the single background refresh finish.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(f.calls(), 2, "one refresh for five stale reads");
    let (v, s) = get(&c, &f, Policy::default(), false)
        .await
        .expect("fresh again");
    assert_eq!(v, "2");
    assert!(matches!(s, Source::Cache { age } if age < Duration::from_secs(1)));
}

#[tokio::test(start_paused = true)]
async fn past_revalidation_a_failure_falls_back_to_the_kept_entry() {
    let (c, f) = (cache(settings()), Fake::default());
    get(&c, &f, Policy::default(), false).await.expect("warm");
    tokio::time::advance(TTL + SWR + Duration::from_secs(1)).await;
    f.down.store(true, Ordering::SeqCst);
    let (v, s) = get(&c, &f, Policy::default(), false)
        .await
        .expect("fallback");
    assert_eq!(v, "1");
    assert!(matches!(
        s,
        Source::Fallback { age, reason: Reason::Unavailable } if age > TTL + SWR
    ));
    // Required components may not use it unless configured.
    assert_eq!(
        get(&c, &f, Policy::default(), true).await,
        Err(CallError::Failed(Reason::Unavailable))
    );
    let lenient = cache(CacheSettings {
        allow_stale_required: true,
        ..settings()
    });
    f.down.store(false, Ordering::SeqCst);
    get(&lenient, &f, Policy::default(), true)
        .await
        .expect("warm");
    tokio::time::advance(TTL + SWR + Duration::from_secs(1)).await;
    f.down.store(true, Ordering::SeqCst);
    assert!(matches!(
        get(&lenient, &f, Policy::default(), true).await,
        Ok((_, Source::Fallback { .. }))
    ));
    // Past stale_ttl the entry is gone.
    tokio::time::advance(STALE).await;
    assert!(get(&c, &f, Policy::default(), false).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn errors_that_say_nothing_about_availability_do_not_fall_back() {
    for error in [
        CallError::NotFound,
        CallError::Failed(Reason::DownstreamRejected),
    ] {
        let c = cache(settings());
        let f = Fake {
            error: Some(error),
            ..Fake::default()
        };
        get(&c, &f, Policy::default(), false).await.expect("warm");
        tokio::time::advance(TTL + SWR + Duration::from_secs(1)).await;
        f.down.store(true, Ordering::SeqCst);
        assert_eq!(get(&c, &f, Policy::default(), false).await, Err(error));
    }
}

#[tokio::test(start_paused = true)]
async fn fresh_bypasses_reads_and_max_staleness_bounds_everything() {
    let (c, f) = (cache(settings()), Fake::default());
    get(&c, &f, Policy::default(), false).await.expect("warm");
    let fresh = Policy {
        fresh: true,
        max_staleness: None,
    };
    assert_eq!(
        get(&c, &f, fresh, false).await,
        Ok(("2".into(), Source::Live))
    );
    // ... and stored its answer for others.
    assert_eq!(
        get(&c, &f, Policy::default(), false).await.map(|(v, _)| v),
        Ok("2".into())
    );
    // FRESH never falls back.
    f.down.store(true, Ordering::SeqCst);
    assert!(get(&c, &f, fresh, false).await.is_err());

    tokio::time::advance(Duration::from_secs(5)).await;
    let bounded = Policy {
        fresh: false,
        max_staleness: Some(Duration::from_secs(1)),
    };
    // The entry is 5 s old: too old to serve, and too old to fall back to.
    assert_eq!(
        get(&c, &f, bounded, false).await,
        Err(CallError::Failed(Reason::Unavailable))
    );
    f.down.store(false, Ordering::SeqCst);
    assert!(matches!(
        get(&c, &f, bounded, false).await,
        Ok((_, Source::Live))
    ));
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_make_one_call_and_errors_are_not_cached() {
    let (c, f) = (cache(settings()), Fake::default());
    f.down.store(true, Ordering::SeqCst);
    assert!(get(&c, &f, Policy::default(), false).await.is_err());
    f.down.store(false, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (c, f) = (c.clone(), f.clone());
        tasks.push(tokio::spawn(async move {
            get(&c, &f, Policy::default(), false).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("join").map(|(v, _)| v), Ok("2".into()));
    }
    assert_eq!(
        f.calls(),
        2,
        "one failed call, then one call for a hundred callers"
    );
}

#[tokio::test(start_paused = true)]
async fn disabled_components_are_always_live() {
    let (c, f) = (
        cache(CacheSettings {
            enabled: false,
            ..settings()
        }),
        Fake::default(),
    );
    for _ in 0..3 {
        assert!(matches!(
            get(&c, &f, Policy::default(), false).await,
            Ok((_, Source::Live))
        ));
    }
    assert_eq!(f.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn invalidation_drops_one_entitys_entries() {
    let (c, f) = (cache(settings()), Fake::default());
    for id in ["c-1", "c-10"] {
        c.fetch(key(id), Policy::default(), false, deadline(), f.live())
            .await
            .map(|(_, s): (GetProfileResponse, Source)| s)
            .expect("warm");
    }
    assert_eq!(
        c.invalidate("c-1", &[Component::Orders]).await,
        (0, 0, false),
        "other component"
    );
    assert_eq!(c.invalidate("c-1", &[]).await, (1, 0, false));
    assert_eq!(f.calls(), 2);
    get(&c, &f, Policy::default(), false)
        .await
        .expect("refetched");
    assert_eq!(f.calls(), 3, "c-1 was dropped");
    c.fetch(key("c-10"), Policy::default(), false, deadline(), f.live())
        .await
        .map(|(_, s): (GetProfileResponse, Source)| s)
        .expect("still cached");
    assert_eq!(f.calls(), 3, "c-10 was kept");
}

#[test]
fn keys_differ_in_everything_that_changes_the_answer() {
    let base = Key {
        component: Component::Calls,
        scope: "",
        id: "u-1",
        window: Some((Some(1), None)),
    };
    let variants = [
        Key {
            component: Component::Emails,
            ..base
        },
        Key {
            scope: "report-svc",
            ..base
        },
        Key { id: "u-2", ..base },
        Key {
            window: Some((Some(2), None)),
            ..base
        },
        Key {
            window: Some((Some(1), Some(9))),
            ..base
        },
        Key {
            window: None,
            ..base
        },
    ];
    let rendered = base.render();
    assert!(
        rendered.starts_with("downstream.calls.v1|"),
        "contract version in the key: {rendered}"
    );
    let mut all: Vec<String> = variants.iter().map(Key::render).collect();
    all.push(rendered);
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "{all:?}");
}

#[tokio::test]
async fn the_cache_stays_within_its_byte_bound() {
    let c = cache(CacheSettings {
        max_bytes: 1024 * 1024,
        ..settings()
    });
    let big = GetProfileResponse {
        profile: Some(Profile {
            display_name: "x".repeat(1000),
            ..Default::default()
        }),
    };
    for i in 0..10_000 {
        let id = format!("c-{i}");
        let v = big.clone();
        let _ = c
            .fetch(key(&id), Policy::default(), false, deadline(), move |_| {
                let v = v.clone();
                async move { Ok::<_, CallError>(v) }
            })
            .await;
    }
    let (entries, bytes) = c.usage().await;
    assert!(bytes <= 1024 * 1024, "{bytes} bytes in {entries} entries");
    assert!(entries > 100 && entries < 10_000, "{entries}");
}
