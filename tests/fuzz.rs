//! Property-based fuzzing of request decoding, validation and the handlers
//! (with the real sim behind them): arbitrary bytes and arbitrary field
//! values never panic, and every answer is a success or a status a caller can
//! act on. Bounded (proptest's case count) so it runs in `make test`; raise
//! `PROPTEST_CASES` for a longer run.

use std::{collections::BTreeMap, sync::Arc};

use bfb::{
    api::{activity_v1::ActivityV1, customer_v1::CustomerV1, customer_v2::CustomerV2},
    auth::{Caller, Consumers},
    config::{Config, ConsumerSettings},
    engine::Engine,
    pb::bfb::{
        activity::v1::{
            GetUserActivityRequest, StreamUserActivityRequest, TimeWindow,
            user_activity_service_server::UserActivityService,
        },
        common::v1::CachePolicy,
        customer::{
            v1::{
                BatchGetCustomersRequest, GetCustomerRequest,
                customer_aggregate_service_server::CustomerAggregateService,
            },
            v2::{
                self, PageRequest,
                customer_aggregate_service_server::CustomerAggregateService as CustomerV2Service,
            },
        },
    },
    sim::{self, SimConfig},
    telemetry::metrics::Metrics,
};
use futures::StreamExt;
use proptest::prelude::*;
use prost::Message;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

struct Target {
    rt: tokio::runtime::Runtime,
    v1: CustomerV1,
    v2: CustomerV2,
    activity: ActivityV1,
    callers: Vec<Arc<Caller>>,
}

/// The sim and the three adapters over one engine, built once.
fn target() -> &'static Target {
    static TARGET: std::sync::OnceLock<Target> = std::sync::OnceLock::new();
    TARGET.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (v1, v2, activity) = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(sim::serve(
                SimConfig::default(),
                listener,
                std::future::pending(),
            ));
            let mut config = Config::example()
                .expect("config")
                .with_all_endpoints(&[format!("http://{addr}")]);
            // Decoded garbage may ask for a stream of many users: keep cases fast.
            config.batch.stream_max_users = 20;
            let engine = Arc::new(Engine::new(&config, &Arc::new(Metrics::new())).expect("engine"));
            (
                CustomerV1::new(engine.clone()),
                CustomerV2::new(engine.clone()),
                ActivityV1::new(engine),
            )
        });
        let restricted = Consumers::new(&BTreeMap::from([(
            "narrow".to_string(),
            ConsumerSettings {
                identities: vec!["narrow".into()],
                methods: vec![],
                components: vec!["profile".into(), "sms".into()],
                scope: None,
                rate_per_second: None,
                burst: None,
                max_concurrent_rpcs: None,
            },
        )]))
        .get("narrow")
        .expect("consumer");
        Target {
            rt,
            v1,
            v2,
            activity,
            callers: vec![
                Caller::anonymous(),
                Arc::new(Caller::new(restricted, "narrow".into())),
            ],
        }
    })
}

fn request<T>(msg: T, caller: usize) -> Request<T> {
    let mut r = Request::new(msg);
    r.extensions_mut()
        .insert(target().callers[caller % 2].clone());
    r
}

/// Every failure is one a caller can act on, with details, and leaks nothing.
fn check(result: Result<(), Status>) -> Result<(), TestCaseError> {
    let Err(status) = result else { return Ok(()) };
    prop_assert!(
        matches!(
            status.code(),
            Code::InvalidArgument
                | Code::NotFound
                | Code::PermissionDenied
                | Code::Unavailable
                | Code::DeadlineExceeded
        ),
        "unexpected {status:?}"
    );
    if status.code() == Code::InvalidArgument {
        let bad = status.get_details_bad_request();
        prop_assert!(bad.is_some_and(|b| !b.field_violations.is_empty()));
    }
    prop_assert!(!status.message().contains("127.0.0.1"), "{status:?}");
    Ok(())
}

fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        "c-[0-9]{1,6}",
        "u-[0-9]{1,6}",
        ".{0,80}",
        "[a-z0-9._:-]{60,70}",
    ]
}

fn paths() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop_oneof![
            Just("profile".to_string()),
            Just("orders".to_string()),
            Just("reviews".to_string()),
            Just("favorites".to_string()),
            Just("calls".to_string()),
            Just("sms".to_string()),
            Just("emails".to_string()),
            Just("directory".to_string()),
            ".{0,20}",
        ],
        0..5,
    )
}

fn cache() -> impl Strategy<Value = Option<CachePolicy>> {
    prop::option::of(
        (
            any::<bool>(),
            prop::option::of((any::<i64>(), any::<i32>())),
        )
            .prop_map(|(fresh, staleness)| CachePolicy {
                fresh,
                max_staleness: staleness
                    .map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
            }),
    )
}

fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    prop::option::of(
        (
            prop_oneof![any::<i64>(), 1_600_000_000i64..1_800_000_000],
            any::<i32>(),
        )
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), caller in 0usize..2) {
        let t = target();
        t.rt.block_on(async {
            if let Ok(m) = GetCustomerRequest::decode(&bytes[..]) {
                check(t.v1.get_customer(request(m, caller)).await.map(drop))?;
            }
            if let Ok(m) = v2::GetCustomerRequest::decode(&bytes[..]) {
                check(CustomerV2Service::get_customer(&t.v2, request(m, caller)).await.map(drop))?;
            }
            if let Ok(m) = GetUserActivityRequest::decode(&bytes[..]) {
                check(t.activity.get_user_activity(request(m, caller)).await.map(drop))?;
            }
            if let Ok(m) = BatchGetCustomersRequest::decode(&bytes[..]) {
                check(t.v1.batch_get_customers(request(m, caller)).await.map(drop))?;
            }
            if let Ok(m) = StreamUserActivityRequest::decode(&bytes[..]) {
                match t.activity.stream_user_activity(request(m, caller)).await {
                    Ok(stream) => {
                        let items: Vec<_> = stream.into_inner().collect().await;
                        for item in items {
                            check(item.map(drop))?;
                        }
                    }
                    Err(status) => check(Err(status))?,
                }
            }
            Ok::<(), TestCaseError>(())
        })?;
    }

    #[test]
    fn arbitrary_customer_requests_are_answered_or_rejected_cleanly(
        customer_id in id(),
        paths in paths(),
        completeness in prop_oneof![0i32..3, any::<i32>()],
        cache in cache(),
        pages in (any::<i32>(), ".{0,40}"),
        caller in 0usize..2,
    ) {
        let t = target();
        let read_mask = Some(prost_types::FieldMask { paths });
        t.rt.block_on(async {
            let v1 = GetCustomerRequest {
                customer_id: customer_id.clone(),
                read_mask: read_mask.clone(),
                completeness,
                cache,
            };
            check(t.v1.get_customer(request(v1, caller)).await.map(drop))?;
            let v2 = v2::GetCustomerRequest {
                customer_id,
                read_mask,
                completeness,
                cache,
                favorites_page: Some(PageRequest { page_size: pages.0, page_token: pages.1.clone() }),
                orders_page: Some(PageRequest { page_size: 5, page_token: pages.1 }),
            };
            check(CustomerV2Service::get_customer(&t.v2, request(v2, caller)).await.map(drop))
        })?;
    }

    #[test]
    fn arbitrary_activity_requests_are_answered_or_rejected_cleanly(
        user_id in id(),
        paths in paths(),
        start in timestamp(),
        end in timestamp(),
        caller in 0usize..2,
    ) {
        let t = target();
        t.rt.block_on(async {
            let m = GetUserActivityRequest {
                user_id,
                read_mask: Some(prost_types::FieldMask { paths }),
                window: Some(TimeWindow { start_time: start, end_time: end }),
                ..Default::default()
            };
            check(t.activity.get_user_activity(request(m, caller)).await.map(drop))
        })?;
    }
}
