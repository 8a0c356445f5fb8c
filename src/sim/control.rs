//! `bfb.sim.v1.SimControl`: change behaviour and read stats at run time.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tonic::{Code, Request, Response, Status};

use crate::{
    component::{Component, names},
    pb::bfb::sim::v1::{
        Behavior as PbBehavior, GetStatsRequest, GetStatsResponse, ResetRequest, ResetResponse,
        ServiceStats, SetBehaviorRequest, SetBehaviorResponse, sim_control_server::SimControl,
    },
};

use super::state::{Behavior, SimState};

/// The control service over a sim's state.
pub struct Control {
    state: Arc<SimState>,
    served: Vec<Component>,
}

impl Control {
    /// Controls `state`; reports stats of the `served` services.
    pub fn new(state: Arc<SimState>, served: Vec<Component>) -> Control {
        Control { state, served }
    }
}

fn duration(d: Option<prost_types::Duration>, field: &str) -> Result<Duration, Status> {
    let Some(d) = d else {
        return Ok(Duration::ZERO);
    };
    Duration::try_from(d)
        .map_err(|_| Status::invalid_argument(format!("{field} must be a non-negative duration")))
}

fn to_pb_duration(d: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

fn fraction(v: f64, field: &str) -> Result<f64, Status> {
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(Status::invalid_argument(format!(
            "{field} must be between 0 and 1"
        )))
    }
}

impl TryFrom<PbBehavior> for Behavior {
    type Error = Status;
    fn try_from(b: PbBehavior) -> Result<Behavior, Status> {
        Ok(Behavior {
            latency: duration(b.latency, "behavior.latency")?,
            slow_fraction: fraction(b.slow_fraction, "behavior.slow_fraction")?,
            slow_extra: duration(b.slow_extra, "behavior.slow_extra")?,
            error_rate: fraction(b.error_rate, "behavior.error_rate")?,
            error_code: match b.error_code {
                0 => Code::Unavailable,
                1..=16 => Code::from_i32(b.error_code),
                _ => {
                    return Err(Status::invalid_argument(
                        "behavior.error_code must be 1 to 16",
                    ));
                }
            },
            retry_pushback_ms: b.retry_pushback_ms,
        })
    }
}

impl From<Behavior> for PbBehavior {
    fn from(b: Behavior) -> PbBehavior {
        PbBehavior {
            latency: to_pb_duration(b.latency),
            slow_fraction: b.slow_fraction,
            slow_extra: to_pb_duration(b.slow_extra),
            error_rate: b.error_rate,
            error_code: b.error_code as i32,
            retry_pushback_ms: b.retry_pushback_ms,
        }
    }
}

#[tonic::async_trait]
impl SimControl for Control {
    async fn set_behavior(
        &self,
        req: Request<SetBehaviorRequest>,
    ) -> Result<Response<SetBehaviorResponse>, Status> {
        let req = req.into_inner();
        let service = Component::from_name(&req.service)
            .filter(|c| self.served.contains(c))
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "unknown service {:?}; this sim serves: {}",
                    req.service,
                    names(&self.served)
                ))
            })?;
        let behavior = Behavior::try_from(req.behavior.unwrap_or_default())?;
        self.state.set_behavior(service, behavior);
        Ok(Response::new(SetBehaviorResponse {}))
    }

    async fn get_stats(
        &self,
        _req: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        let services: HashMap<String, ServiceStats> = self
            .served
            .iter()
            .map(|&c| {
                let s = self.state.stats(c);
                let stats = ServiceStats {
                    calls: s.calls,
                    cancelled: s.cancelled,
                    in_flight: s.in_flight,
                    last_grpc_timeout: s.last_timeout.and_then(to_pb_duration),
                    last_metadata: s.last_metadata.into_iter().collect(),
                    behavior: Some(s.behavior.into()),
                };
                (c.name().to_string(), stats)
            })
            .collect();
        Ok(Response::new(GetStatsResponse {
            services,
            peak_total_in_flight: self.state.peak_in_flight(),
            connections_accepted: self.state.connections_accepted(),
        }))
    }

    async fn reset(&self, _req: Request<ResetRequest>) -> Result<Response<ResetResponse>, Status> {
        self.state.reset();
        Ok(Response::new(ResetResponse {}))
    }
}
