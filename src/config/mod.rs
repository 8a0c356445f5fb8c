//! Typed configuration, read from TOML and validated once at load time.
//!
//! Unknown keys are rejected (`deny_unknown_fields`) so a typo cannot silently
//! fall back to a default. [`Config::load`] returns every problem at once, each
//! saying where it is and what to change; `bfb check-config` prints them.
//!
//! This module holds the loader, the validation and the small sections;
//! `server` (inbound limits, lifecycle, telemetry), `cache` and `downstream`
//! (timeouts, bulkhead, breaker, retry, hedge) hold the larger sections.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::Path, time::Duration};

use serde::Deserialize;

use crate::component::{Component, ComponentSet, names};

mod auth;
mod cache;
mod discovery;
mod downstream;
mod load;
mod server;

pub use self::{
    auth::{
        AuthMode, AuthSettings, ConsumerSettings, JwtSettings, MtlsSettings, TlsSettings,
        jwt_algorithm, valid_scope, valid_trust_domain,
    },
    cache::{CacheSettings, ComponentCache, ComponentCacheSection, RedisSentinel, RedisTopology},
    discovery::DiscoverySettings,
    downstream::{
        BreakerSettings, DownstreamSettings, DownstreamTls, EjectionSettings, HedgeSettings,
        RetrySettings,
    },
    server::{LogFormat, ServerSettings, TelemetrySettings},
};

/// The embedded default configuration: the one `bfb demo` runs on, pointing at
/// `bfb sim`'s default address.
pub const EXAMPLE: &str = include_str!("../../config/bfb.example.toml");

/// bfb's whole configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Address of the operators' admin gRPC server (`bfb.admin.v1`); unset:
    /// none. Same TLS and authentication as `listen`.
    pub admin_listen: Option<SocketAddr>,
    /// Who callers are and what each may do.
    pub auth: AuthSettings,
    /// TLS on the gRPC and admin listeners; unset: plaintext.
    pub tls: Option<TlsSettings>,
    /// How long a call may take overall.
    pub deadlines: Deadlines,
    /// Inbound protection and HTTP/2 limits.
    pub server: ServerSettings,
    /// Which components each aggregate needs.
    pub aggregates: Aggregates,
    /// Many entities per call.
    pub batch: BatchSettings,
    /// Traces, metrics and logs.
    pub telemetry: TelemetrySettings,
    /// How endpoint names are resolved.
    pub discovery: DiscoverySettings,
    /// The component cache.
    pub cache: CacheSettings,
    /// Every downstream's settings, `downstream_defaults` merged with its own section.
    pub downstreams: BTreeMap<Component, DownstreamSettings>,
}

/// The file as written. Downstream sections stay raw TOML tables until each
/// is merged over `downstream_defaults`, so a section can override any key,
/// however deep, and the result is still checked by one typed struct.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: SocketAddr,
    #[serde(default)]
    admin_listen: Option<SocketAddr>,
    auth: AuthSettings,
    #[serde(default)]
    tls: Option<TlsSettings>,
    #[serde(default)]
    deadlines: Deadlines,
    #[serde(default)]
    server: ServerSettings,
    #[serde(default)]
    aggregates: Aggregates,
    #[serde(default)]
    batch: BatchSettings,
    #[serde(default)]
    telemetry: TelemetrySettings,
    #[serde(default)]
    discovery: DiscoverySettings,
    #[serde(default)]
    cache: CacheSettings,
    #[serde(default)]
    downstream_defaults: toml::Table,
    downstreams: BTreeMap<String, toml::Table>,
}

/// Deadline handling for inbound calls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Deadlines {
    /// Deadline for a call whose caller sent no `grpc-timeout`.
    #[serde(with = "humantime_serde")]
    pub default: Duration,
    /// Upper bound on any caller's deadline.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Time kept back from every downstream call for merging and answering,
    /// so bfb answers before the caller's deadline passes.
    #[serde(with = "humantime_serde")]
    pub reserve: Duration,
    /// A downstream call is not started with less time than this left; the
    /// component fails at once instead (reason `NO_BUDGET`).
    #[serde(with = "humantime_serde")]
    pub min_call_budget: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            default: Duration::from_secs(2),
            max: Duration::from_secs(30),
            reserve: Duration::from_millis(3),
            min_call_budget: Duration::from_millis(2),
        }
    }
}

/// `[batch]`: many entities per call (BatchGetCustomers, StreamUserActivity)
/// and the batching of their downstream lookups.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchSettings {
    /// Most ids one BatchGetCustomers may ask for; more is INVALID_ARGUMENT.
    pub max_ids: usize,
    /// Most users one StreamUserActivity may cover.
    pub stream_max_users: u32,
    /// Users of a stream being fetched at once (bounded fan-out; a slow
    /// reader holds the stream back instead of making bfb buffer).
    pub stream_in_flight: usize,
    /// How long a loader collects lookups after the first before it sends
    /// them as one downstream batch.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Largest downstream batch; a full batch is sent at once.
    pub max_batch: usize,
    /// Largest directory batch. Names are looked up per counterparty, dozens
    /// per user, so its batches are larger.
    pub max_directory_batch: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            max_ids: 100,
            stream_max_users: 100_000,
            stream_in_flight: 64,
            window: Duration::from_millis(1),
            max_batch: 100,
            max_directory_batch: 1000,
        }
    }
}

/// Per-aggregate settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aggregates {
    /// The customer aggregate.
    pub customer: AggregateSection,
    /// The user-activity aggregate.
    pub activity: AggregateSection,
}

impl Default for Aggregates {
    fn default() -> Self {
        Aggregates {
            customer: AggregateSection {
                required: ComponentSet::of(&[Component::Profile]),
            },
            activity: AggregateSection {
                required: ComponentSet::EMPTY,
            },
        }
    }
}

/// Settings of one aggregate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateSection {
    /// Components without which a BEST_EFFORT answer is not worth sending: if
    /// one of them fails, the call fails. The others are optional. Read from
    /// a list of names; an unknown name is a problem at load.
    #[serde(deserialize_with = "component_names")]
    pub required: ComponentSet,
}

/// A list of component names as a set; an unknown name fails the load with
/// the names that exist.
fn component_names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ComponentSet, D::Error> {
    let listed = Vec::<String>::deserialize(d)?;
    listed.iter().try_fold(ComponentSet::EMPTY, |set, name| {
        Component::from_name(name)
            .map(|c| set.with(c))
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "unknown component {name:?}; expected any of: {}",
                    names(&Component::ALL)
                ))
            })
    })
}

/// One thing wrong with a config: where, and what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the setting, e.g. `downstreams.orders.timeout`.
    pub path: String,
    /// What is wrong and what to change.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("{0}")]
    Parse(String),
    /// The file parsed, but some settings are not usable.
    #[error("{} problem(s):\n{}", .0.len(), .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// Collects problems with their paths.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn positive(&mut self, path: impl Into<String>, v: Duration) {
        if v.is_zero() {
            self.add(path, "must be more than 0");
        }
    }

    fn fraction(&mut self, path: impl Into<String>, v: f64) {
        if !(0.0..=1.0).contains(&v) {
            self.add(path, "must be between 0 and 1");
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text)
    }

    /// The embedded default config (a unit test keeps it valid).
    pub fn example() -> Result<Config, ConfigError> {
        Config::parse(EXAMPLE)
    }

    /// Parses and validates config text: every problem is reported at once,
    /// each with its TOML path (only a TOML syntax error stops the reading
    /// early, with its line and column).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string().trim().to_string()))?;
        let mut problems = Problems::default();
        let Some(raw) = load::deserialize_all::<RawConfig>(table, "", &mut problems) else {
            return Err(ConfigError::Invalid(problems.0));
        };
        let mut downstreams = BTreeMap::new();
        for (name, section) in raw.downstreams {
            let path = format!("downstreams.{name}");
            let Some(component) = Component::from_name(&name) else {
                problems.add(
                    path,
                    format!(
                        "unknown downstream; expected one of: {}",
                        names(&Component::ALL)
                    ),
                );
                continue;
            };
            let mut merged = raw.downstream_defaults.clone();
            merge(&mut merged, section);
            // A problem with `downstream_defaults` shows under every
            // downstream that inherits it.
            if let Some(settings) =
                load::deserialize_all::<DownstreamSettings>(merged, &path, &mut problems)
            {
                downstreams.insert(component, settings);
            }
        }
        for c in Component::ALL {
            let path = format!("downstreams.{c}");
            if !downstreams.contains_key(&c)
                && !problems.0.iter().any(|p| p.path.starts_with(&path))
            {
                problems.add(
                    format!("downstreams.{c}"),
                    format!("missing; add a [downstreams.{c}] section with an endpoint"),
                );
            }
        }
        let config = Config {
            listen: raw.listen,
            admin_listen: raw.admin_listen,
            auth: raw.auth,
            tls: raw.tls,
            deadlines: raw.deadlines,
            server: raw.server,
            aggregates: raw.aggregates,
            batch: raw.batch,
            telemetry: raw.telemetry,
            discovery: raw.discovery,
            cache: raw.cache,
            downstreams,
        };
        config.check(&mut problems);
        if problems.0.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems.0))
        }
    }

    /// Every problem with this config's values.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Problems::default();
        self.check(&mut problems);
        problems.0
    }

    fn check(&self, p: &mut Problems) {
        let d = &self.deadlines;
        p.positive("deadlines.default", d.default);
        if d.max < d.default {
            p.add(
                "deadlines.max",
                format!(
                    "must be at least deadlines.default ({})",
                    humantime::format_duration(d.default)
                ),
            );
        }
        if d.reserve >= d.default {
            p.add(
                "deadlines.reserve",
                "must be much smaller than deadlines.default, e.g. \"3ms\"",
            );
        }
        self.server.check(self.tls.as_ref(), p);
        self.cache.check(p);
        self.auth.check(self.tls.as_ref(), p);
        let b = &self.batch;
        if !(1..=1000).contains(&b.max_ids) {
            p.add("batch.max_ids", "must be between 1 and 1000");
        }
        if !(1..=1000).contains(&b.max_batch) {
            p.add(
                "batch.max_batch",
                "must be between 1 and 1000 (the downstream batch limit)",
            );
        }
        if !(1..=1000).contains(&b.max_directory_batch) {
            p.add(
                "batch.max_directory_batch",
                "must be between 1 and 1000 (the directory's batch limit)",
            );
        }
        if !(1..=1000).contains(&b.stream_in_flight) {
            p.add("batch.stream_in_flight", "must be between 1 and 1000");
        }
        if b.stream_max_users == 0 {
            p.add("batch.stream_max_users", "must be at least 1");
        }
        if b.window > Duration::from_millis(100) {
            p.add("batch.window", "must be at most 100ms, e.g. \"1ms\"");
        }
        self.telemetry.check(p);
        self.discovery.check(p);
        for (c, ds) in &self.downstreams {
            ds.check(&format!("downstreams.{c}"), p);
        }
        for (path, section, allowed) in [
            (
                "aggregates.customer.required",
                &self.aggregates.customer,
                &Component::CUSTOMER[..],
            ),
            (
                "aggregates.activity.required",
                &self.aggregates.activity,
                &[
                    Component::Calls,
                    Component::Emails,
                    Component::Sms,
                    Component::Directory,
                ][..],
            ),
        ] {
            for c in section.required.iter() {
                if !allowed.contains(&c) {
                    p.add(
                        path,
                        format!(
                            "component {:?} is not part of this aggregate; expected any of: {}",
                            c.name(),
                            names(allowed)
                        ),
                    );
                }
            }
        }
    }

    /// A downstream's settings.
    pub fn downstream(&self, c: Component) -> Option<&DownstreamSettings> {
        self.downstreams.get(&c)
    }

    /// Replaces every downstream's endpoints (the demo points them at its
    /// own sims).
    pub fn with_all_endpoints(mut self, endpoints: &[String]) -> Config {
        for settings in self.downstreams.values_mut() {
            match endpoints {
                [one] => {
                    settings.endpoint = one.clone();
                    settings.endpoints.clear();
                }
                many => {
                    settings.endpoint.clear();
                    settings.endpoints = many.to_vec();
                }
            }
        }
        self
    }

    /// A downstream's settings, mutable (tests adjust them).
    pub fn downstream_mut(&mut self, c: Component) -> Option<&mut DownstreamSettings> {
        self.downstreams.get_mut(&c)
    }
}

/// Merges `over` into `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|_| format!("{endpoint:?} is not a URI; use e.g. \"http://10.0.0.5:50061\""))?;
    match uri.scheme_str() {
        Some("http" | "https") => {
            if uri.host().is_none() || uri.port_u16().is_none() {
                return Err(format!("{endpoint:?} needs a host and a port"));
            }
        }
        Some(SRV_SCHEME) => {
            if uri.host().is_none() || uri.port().is_some() || uri.path() != "/" {
                return Err(format!(
                    "{endpoint:?}: an SRV name takes no port or path, e.g. \"{SRV_SCHEME}://_grpc._tcp.orders.service.consul\""
                ));
            }
        }
        _ => {
            return Err(format!(
                "{endpoint:?} needs an http://, https:// or {SRV_SCHEME}:// scheme"
            ));
        }
    }
    Ok(())
}

/// The scheme of an endpoint whose addresses and ports come from DNS SRV
/// records (Consul's DNS interface, Kubernetes named ports).
pub const SRV_SCHEME: &str = "dns+srv";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_is_valid() {
        let c = Config::parse(EXAMPLE).expect("example parses");
        for comp in Component::ALL {
            assert!(c.downstream(comp).is_some(), "{comp} missing");
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
            listen = "127.0.0.1:0"
            [auth]
            mode = "none"
            [deadlines]
            default = "1s"
            max = "500ms"
            reserve = "3ms"
            min_call_budget = "1ms"
            [aggregates.customer]
            required = ["profile", "calls"]
            [aggregates.activity]
            required = []
            [downstreams.profile]
            endpoint = "ftp://x:1"
            [downstreams.bogus]
            endpoint = "http://127.0.0.1:1"
            [downstreams.orders]
            endpoint = "http://127.0.0.1:1"
            timeout = "0s"
            retry = { budget_ttl = "2m" }
            [downstreams.reviews]
            endpoint = "http://127.0.0.1:1"
            breaker = { windw = 3 }
        "#;
        let Err(ConfigError::Invalid(problems)) = Config::parse(text) else {
            panic!("expected problems");
        };
        let paths: Vec<_> = problems.iter().map(|p| p.path.as_str()).collect();
        assert!(paths.contains(&"deadlines.max"));
        assert!(paths.contains(&"aggregates.customer.required"));
        assert!(paths.contains(&"downstreams.profile.endpoint"));
        assert!(paths.contains(&"downstreams.bogus"));
        assert!(paths.contains(&"downstreams.orders.timeout"));
        assert!(paths.contains(&"downstreams.orders.retry.budget_ttl"));
        assert!(
            paths.contains(&"downstreams.reviews.breaker.windw"),
            "{problems:?}"
        );
        assert!(paths.contains(&"downstreams.calls"));
    }

    #[test]
    fn mistakes_found_while_parsing_are_all_reported() {
        let text = EXAMPLE
            .replace("[telemetry]", "[telemetry]\nlog_formatt = \"json\"")
            .replace("default = \"2s\"", "default = \"2 fortnights please\"");
        let sms = text.find("[downstreams.sms]").expect("sms section");
        let endpoint = sms + text[sms..].find("endpoint").expect("sms endpoint");
        let line_end = endpoint + text[endpoint..].find('\n').expect("line");
        let text = format!("{}{}", &text[..endpoint], &text[line_end + 1..]);
        let Err(ConfigError::Invalid(problems)) = Config::parse(&text) else {
            panic!("expected problems");
        };
        let found: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert!(
            found.contains(&"telemetry.log_formatt: unknown key; did you mean log_format?".into()),
            "{found:?}"
        );
        assert!(
            found.iter().any(|p| p.starts_with("deadlines.default: ")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("downstreams.sms.endpoint: missing; this key is required")),
            "{found:?}"
        );
    }

    #[test]
    fn component_lists_are_typed_at_load() {
        let unknown = EXAMPLE.replace(
            "required = [\"profile\"]",
            "required = [\"profile\", \"profil\"]",
        );
        let Err(ConfigError::Invalid(problems)) = Config::parse(&unknown) else {
            panic!("an unknown name is refused");
        };
        assert_eq!(
            problems[0].path, "aggregates.customer.required",
            "{problems:?}"
        );
        assert!(problems[0].message.contains("\"profil\""), "{problems:?}");
        let ok = Config::parse(EXAMPLE).expect("example");
        assert_eq!(
            ok.aggregates.customer.required,
            ComponentSet::of(&[Component::Profile])
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = EXAMPLE.replace("[deadlines]", "[deadlines]\ndefualt = \"1s\"");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("defualt"), "{err}");
    }

    #[test]
    fn sections_override_defaults_key_by_key() {
        let text = EXAMPLE.replace(
            "[downstreams.orders]",
            "[downstreams.orders]\nmax_concurrency = 7\nbreaker = { open_for = \"9s\" }",
        );
        let c = Config::parse(&text).expect("valid");
        let d = c.downstream(Component::Directory).expect("directory");
        assert_eq!(d.timeout, Duration::from_millis(300));
        let p = c.downstream(Component::Profile).expect("profile");
        assert_eq!(p.timeout, Duration::from_secs(1));
        let o = c.downstream(Component::Orders).expect("orders");
        assert_eq!(o.max_concurrency, 7);
        assert_eq!(o.breaker.open_for, Duration::from_secs(9));
        // The rest of the breaker section still comes from the defaults.
        assert_eq!(o.breaker.window, p.breaker.window);
        assert_eq!(o.breaker.min_calls, 20);
    }
}
