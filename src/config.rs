//! Typed configuration, read from TOML and validated once at load time.
//!
//! Unknown keys are rejected (`deny_unknown_fields`) so a typo cannot silently
//! fall back to a default. [`Config::load`] returns every problem at once, each
//! saying where it is and what to change; `bfb check-config` prints them.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::Path, time::Duration};

use serde::Deserialize;

use crate::component::{Component, ComponentSet, names};

/// The embedded default configuration: the one `bfb demo` runs on, pointing at
/// `bfb sim`'s default address.
pub const EXAMPLE: &str = include_str!("../config/bfb.example.toml");

/// bfb's whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// How long a call may take overall.
    #[serde(default)]
    pub deadlines: Deadlines,
    /// Which components each aggregate needs.
    #[serde(default)]
    pub aggregates: Aggregates,
    /// Settings every downstream gets unless its own section overrides them.
    #[serde(default)]
    pub downstream_defaults: DownstreamDefaults,
    /// One section per downstream service, keyed by component name.
    pub downstreams: BTreeMap<String, DownstreamSection>,
}

/// Deadline handling for inbound calls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
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
                required: vec!["profile".into()],
            },
            activity: AggregateSection { required: vec![] },
        }
    }
}

/// Settings of one aggregate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateSection {
    /// Components without which a BEST_EFFORT answer is not worth sending: if
    /// one of them fails, the call fails. The others are optional.
    pub required: Vec<String>,
}

/// Defaults for every downstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownstreamDefaults {
    /// Longest a single call to the downstream may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest a TCP connect to the downstream may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for DownstreamDefaults {
    fn default() -> Self {
        DownstreamDefaults {
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
        }
    }
}

/// One downstream's section; unset fields take `downstream_defaults`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownstreamSection {
    /// `http://host:port` of the service.
    pub endpoint: String,
    /// Overrides `downstream_defaults.timeout`.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Overrides `downstream_defaults.connect_timeout`.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
}

/// A downstream's settings with the defaults applied.
#[derive(Debug, Clone)]
pub struct DownstreamSettings {
    /// `http://host:port` of the service.
    pub endpoint: String,
    /// Longest a single call may take.
    pub timeout: Duration,
    /// Longest a TCP connect may take.
    pub connect_timeout: Duration,
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

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The embedded default config (a unit test keeps it valid).
    pub fn example() -> Result<Config, ConfigError> {
        Config::parse(EXAMPLE)
    }

    /// Every problem with this config.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut problem = |path: &str, message: String| {
            out.push(Problem {
                path: path.to_string(),
                message,
            })
        };
        let d = &self.deadlines;
        if d.default.is_zero() {
            problem(
                "deadlines.default",
                "must be more than 0, e.g. \"2s\"".into(),
            );
        }
        if d.max < d.default {
            problem(
                "deadlines.max",
                format!(
                    "must be at least deadlines.default ({})",
                    humantime::format_duration(d.default)
                ),
            );
        }
        if d.reserve >= d.default {
            problem(
                "deadlines.reserve",
                "must be much smaller than deadlines.default, e.g. \"3ms\"".into(),
            );
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
            for name in &section.required {
                if !allowed.iter().any(|c| c.name() == name) {
                    problem(
                        path,
                        format!(
                            "unknown component {name:?}; expected any of: {}",
                            names(allowed)
                        ),
                    );
                }
            }
        }
        let defaults = &self.downstream_defaults;
        for (path, v) in [
            ("downstream_defaults.timeout", defaults.timeout),
            (
                "downstream_defaults.connect_timeout",
                defaults.connect_timeout,
            ),
        ] {
            if v.is_zero() {
                problem(path, "must be more than 0, e.g. \"1s\"".into());
            }
        }
        for c in Component::ALL {
            if !self.downstreams.contains_key(c.name()) {
                problem(
                    &format!("downstreams.{c}"),
                    format!("missing; add a [downstreams.{c}] section with an endpoint"),
                );
            }
        }
        for (name, section) in &self.downstreams {
            let path = format!("downstreams.{name}");
            if Component::from_name(name).is_none() {
                problem(
                    &path,
                    format!(
                        "unknown downstream; expected one of: {}",
                        names(&Component::ALL)
                    ),
                );
            }
            if let Err(why) = check_endpoint(&section.endpoint) {
                problem(&format!("{path}.endpoint"), why);
            }
            for (key, v) in [
                ("timeout", section.timeout),
                ("connect_timeout", section.connect_timeout),
            ] {
                if v.is_some_and(|v| v.is_zero()) {
                    problem(&format!("{path}.{key}"), "must be more than 0".into());
                }
            }
        }
        out
    }

    /// A downstream's settings with defaults applied. Validation guarantees
    /// every component has a section.
    pub fn downstream(&self, c: Component) -> Option<DownstreamSettings> {
        let s = self.downstreams.get(c.name())?;
        let d = &self.downstream_defaults;
        Some(DownstreamSettings {
            endpoint: s.endpoint.clone(),
            timeout: s.timeout.unwrap_or(d.timeout),
            connect_timeout: s.connect_timeout.unwrap_or(d.connect_timeout),
        })
    }

    /// Replaces every downstream endpoint (the demo points them at its own sim).
    pub fn with_all_endpoints(mut self, endpoint: &str) -> Config {
        for section in self.downstreams.values_mut() {
            section.endpoint = endpoint.to_string();
        }
        self
    }
}

impl AggregateSection {
    /// The required components as a set (names were validated at load).
    pub fn required_set(&self) -> ComponentSet {
        self.required
            .iter()
            .filter_map(|n| Component::from_name(n))
            .fold(ComponentSet::EMPTY, ComponentSet::with)
    }
}

fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|_| format!("{endpoint:?} is not a URI; use e.g. \"http://10.0.0.5:50061\""))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("{endpoint:?} needs an http:// or https:// scheme")),
    }
    if uri.host().is_none() || uri.port_u16().is_none() {
        return Err(format!("{endpoint:?} needs a host and a port"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_is_valid() {
        let c = Config::parse(EXAMPLE).expect("example parses");
        assert!(c.problems().is_empty());
        for comp in Component::ALL {
            assert!(c.downstream(comp).is_some(), "{comp} missing");
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
            listen = "127.0.0.1:0"
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
            timeout = "0s"
        "#;
        let Err(ConfigError::Invalid(problems)) = Config::parse(text) else {
            panic!("expected problems");
        };
        let paths: Vec<_> = problems.iter().map(|p| p.path.as_str()).collect();
        assert!(paths.contains(&"deadlines.max"));
        assert!(paths.contains(&"aggregates.customer.required"));
        assert!(paths.contains(&"downstreams.profile.endpoint"));
        assert!(paths.contains(&"downstreams.bogus"));
        assert!(paths.contains(&"downstreams.bogus.timeout"));
        assert!(paths.contains(&"downstreams.orders"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = EXAMPLE.replace("[deadlines]", "[deadlines]\ndefualt = \"1s\"");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("defualt"), "{err}");
    }

    #[test]
    fn section_overrides_defaults() {
        let c = Config::example().expect("example");
        let d = c.downstream(Component::Directory).expect("directory");
        assert_eq!(d.timeout, Duration::from_millis(300));
        let p = c.downstream(Component::Profile).expect("profile");
        assert_eq!(p.timeout, c.downstream_defaults.timeout);
    }
}
