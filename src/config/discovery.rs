//! `[discovery]`: how host names and SRV names of downstream endpoints are
//! resolved, and how often.

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;

use super::Problems;

/// Where endpoint names are resolved and how often they are re-resolved.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoverySettings {
    /// DNS server to query (`"127.0.0.1:8600"` for a Consul agent, or an IP
    /// for port 53); unset: the system's resolver configuration.
    pub resolver: Option<String>,
    /// How often every name is re-resolved (grpc-go's minimum: 30 s).
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// Least time between two resolutions of one name when a connection
    /// failure asks for an early one.
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// Longest one DNS query may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for DiscoverySettings {
    fn default() -> Self {
        DiscoverySettings {
            resolver: None,
            refresh: Duration::from_secs(30),
            min_interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
        }
    }
}

impl DiscoverySettings {
    /// The configured DNS server's address (port 53 when only an IP is given).
    pub fn resolver_addr(&self) -> Option<Result<SocketAddr, String>> {
        let r = self.resolver.as_deref()?;
        Some(
            r.parse::<SocketAddr>()
                .or_else(|_| r.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                .map_err(|_| format!("{r:?} is not an address; use e.g. \"127.0.0.1:8600\"")),
        )
    }

    pub(super) fn check(&self, p: &mut Problems) {
        if let Some(Err(why)) = self.resolver_addr() {
            p.add("discovery.resolver", why);
        }
        if self.refresh < Duration::from_millis(10) {
            p.add("discovery.refresh", "must be at least 10ms, e.g. \"30s\"");
        }
        if self.min_interval > self.refresh {
            p.add(
                "discovery.min_interval",
                "must be at most discovery.refresh",
            );
        }
        p.positive("discovery.timeout", self.timeout);
    }
}
