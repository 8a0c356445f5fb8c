//! The configured consumers: what each may call and read, its cache scope,
//! and its rate and concurrency limits.

use std::{
    collections::{BTreeMap, HashMap},
    num::NonZeroU32,
    sync::{Arc, LazyLock},
    time::Duration,
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter, clock::Clock};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    component::{Component, ComponentSet},
    config::ConsumerSettings,
    error::Error,
};

/// A method rule: one method, or every method of a service.
#[derive(Debug)]
enum MethodRule {
    Exact(String),
    /// `package.Service/`.
    Service(String),
}

/// One consumer, as configured.
#[derive(Debug)]
pub struct Consumer {
    /// Its name in the config (in logs, metrics and downstream metadata).
    pub name: Arc<str>,
    /// Its visibility scope, part of cache keys.
    pub scope: Arc<str>,
    /// The components it may read.
    pub components: ComponentSet,
    /// `None`: every method (authentication off).
    methods: Option<Vec<MethodRule>>,
    limiter: Option<DefaultDirectRateLimiter>,
    slots: Option<Arc<Semaphore>>,
}

impl Consumer {
    fn from_settings(name: &str, s: &ConsumerSettings) -> Consumer {
        let methods = s
            .methods
            .iter()
            .map(|m| match m.strip_suffix('*') {
                Some(service) => MethodRule::Service(service.to_string()),
                None => MethodRule::Exact(m.clone()),
            })
            .collect();
        let limiter = s.rate_per_second.and_then(NonZeroU32::new).map(|rate| {
            let burst = s.burst.and_then(NonZeroU32::new).unwrap_or(rate);
            RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
        });
        Consumer {
            name: name.into(),
            scope: s.scope.as_deref().unwrap_or(name).into(),
            components: s
                .components
                .iter()
                .filter_map(|c| Component::from_name(c))
                .fold(ComponentSet::EMPTY, ComponentSet::with),
            methods: Some(methods),
            limiter,
            slots: s.max_concurrent_rpcs.map(|n| Arc::new(Semaphore::new(n))),
        }
    }

    /// Whether it may call `method` (`package.Service/Method`).
    pub fn may_call(&self, method: &str) -> bool {
        let Some(rules) = &self.methods else {
            return true;
        };
        rules.iter().any(|r| match r {
            MethodRule::Exact(m) => m == method,
            MethodRule::Service(prefix) => method.starts_with(prefix.as_str()),
        })
    }

    /// Takes one call from its rate and, if it has a concurrency share, a
    /// slot the call holds until it ends. Over either: RESOURCE_EXHAUSTED
    /// with when to retry.
    pub fn admit(&self, retry_after: Duration) -> Result<Option<OwnedSemaphorePermit>, Error> {
        if let Some(limiter) = &self.limiter
            && let Err(not_until) = limiter.check()
        {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            tracing::debug!(consumer = %self.name, "rate limited");
            return Err(Error::RateLimited {
                retry_after: wait.max(Duration::from_millis(1)),
            });
        }
        match &self.slots {
            None => Ok(None),
            Some(slots) => slots.clone().try_acquire_owned().map(Some).map_err(|_| {
                tracing::debug!(consumer = %self.name, "at its concurrency share");
                Error::ConsumerOverloaded { retry_after }
            }),
        }
    }
}

/// Consumers by identity.
pub struct Consumers {
    by_identity: HashMap<String, Arc<Consumer>>,
}

impl Consumers {
    /// The consumers of a validated config.
    pub fn new(settings: &BTreeMap<String, ConsumerSettings>) -> Consumers {
        let mut by_identity = HashMap::new();
        for (name, s) in settings {
            let consumer = Arc::new(Consumer::from_settings(name, s));
            for id in &s.identities {
                by_identity.insert(id.clone(), consumer.clone());
            }
        }
        Consumers { by_identity }
    }

    /// The consumer an identity belongs to.
    pub fn get(&self, identity: &str) -> Option<Arc<Consumer>> {
        self.by_identity.get(identity).cloned()
    }
}

/// Who is calling: the consumer and the authenticated identity (a request
/// extension, put there by the auth layer).
#[derive(Debug)]
pub struct Caller {
    /// The consumer.
    pub consumer: Arc<Consumer>,
    /// The identity it authenticated as (SPIFFE ID or token subject).
    pub principal: Arc<str>,
}

static ANONYMOUS: LazyLock<Arc<Caller>> = LazyLock::new(|| {
    Arc::new(Caller {
        consumer: Arc::new(Consumer {
            name: "anonymous".into(),
            scope: "".into(),
            components: ComponentSet::of(&Component::ALL),
            methods: None,
            limiter: None,
            slots: None,
        }),
        principal: "anonymous".into(),
    })
});

impl Caller {
    /// A caller of `consumer` authenticated as `principal`.
    pub fn new(consumer: Arc<Consumer>, principal: Arc<str>) -> Caller {
        Caller {
            consumer,
            principal,
        }
    }

    /// Every caller when authentication is off: all methods, all
    /// components, the empty scope, no limits.
    pub fn anonymous() -> Arc<Caller> {
        ANONYMOUS.clone()
    }

    /// The components it may read.
    pub fn components(&self) -> ComponentSet {
        self.consumer.components
    }

    /// Its cache scope.
    pub fn scope(&self) -> &str {
        &self.consumer.scope
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(methods: &[&str], rate: Option<u32>, slots: Option<usize>) -> ConsumerSettings {
        ConsumerSettings {
            identities: vec!["id".into()],
            methods: methods.iter().map(|m| m.to_string()).collect(),
            components: vec!["calls".into(), "sms".into()],
            scope: None,
            rate_per_second: rate,
            burst: None,
            max_concurrent_rpcs: slots,
        }
    }

    #[test]
    fn methods_match_exactly_or_by_service() {
        let c = Consumer::from_settings(
            "r",
            &settings(
                &[
                    "bfb.activity.v1.UserActivityService/*",
                    "bfb.customer.v1.CustomerAggregateService/GetCustomer",
                ],
                None,
                None,
            ),
        );
        assert!(c.may_call("bfb.activity.v1.UserActivityService/GetUserActivity"));
        assert!(c.may_call("bfb.customer.v1.CustomerAggregateService/GetCustomer"));
        assert!(!c.may_call("bfb.customer.v2.CustomerAggregateService/GetCustomer"));
        assert!(!c.may_call("bfb.activity.v1.UserActivityServiceX/GetUserActivity"));
        assert!(!c.may_call("bfb.admin.v1.CacheAdmin/InvalidateEntity"));
        assert_eq!(&*c.scope, "r", "scope defaults to the name");
        assert!(c.components.contains(Component::Sms));
        assert!(!c.components.contains(Component::Emails));
    }

    #[test]
    fn rate_and_concurrency_limits_reject_with_retry_after() {
        let c = Consumer::from_settings("r", &settings(&[], Some(2), None));
        assert!(c.admit(Duration::ZERO).is_ok());
        assert!(c.admit(Duration::ZERO).is_ok());
        match c.admit(Duration::ZERO) {
            Err(Error::RateLimited { retry_after }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1));
            }
            other => panic!("expected rate limited, got {other:?}"),
        }
        let c = Consumer::from_settings("r", &settings(&[], None, Some(1)));
        let held = c.admit(Duration::from_millis(5)).expect("first");
        assert!(matches!(
            c.admit(Duration::from_millis(5)),
            Err(Error::ConsumerOverloaded { .. })
        ));
        drop(held);
        assert!(c.admit(Duration::from_millis(5)).is_ok());
    }
}
