//! `bfb.activity.v1.UserActivityService`: the v1 adapter over the engine.

use std::{collections::HashMap, sync::Arc};

use futures::{StreamExt, stream::BoxStream};
use prost_types::Duration as PbDuration;
use tonic::{Request, Response, Status};
use tonic_types::FieldViolation;

use crate::{
    component::Component,
    engine::{
        ActivityParts, Ask, Engine,
        activity::{Users, Window},
    },
    error::Error,
    pb::{
        bfb::activity::v1::{
            ActivitySummary, Call, Calls, Channel, Counterparty, Direction, Email, Emails,
            GetUserActivityRequest, GetUserActivityResponse, Sms, SmsMessages,
            StreamUserActivityRequest, StreamUserActivityResponse, TimeWindow, TimelineEntry,
            UserActivity, stream_user_activity_request,
            user_activity_service_server::UserActivityService,
        },
        downstream,
    },
};

use super::{
    Common, Rpc, aggregate_status, check_common, check_options, check_timestamp, handle,
    newest_first, rpc_status,
};

/// The v1 user-activity service.
pub struct ActivityV1 {
    engine: Arc<Engine>,
}

impl ActivityV1 {
    /// A v1 adapter over `engine`.
    pub fn new(engine: Arc<Engine>) -> ActivityV1 {
        ActivityV1 { engine }
    }
}

// Handlers written out rather than `async fn`: see `super::Boxed`.
#[tonic::async_trait]
impl UserActivityService for ActivityV1 {
    fn get_user_activity<'s, 'f>(
        &'s self,
        request: Request<GetUserActivityRequest>,
    ) -> super::Boxed<'f, GetUserActivityResponse>
    where
        's: 'f,
    {
        Box::pin(handle(
            &self.engine,
            "GetUserActivity",
            request,
            |req, call| self.get_user_activity(req, call),
        ))
    }

    type StreamUserActivityStream = BoxStream<'static, Result<StreamUserActivityResponse, Status>>;

    fn stream_user_activity<'s, 'f>(
        &'s self,
        request: Request<StreamUserActivityRequest>,
    ) -> super::Boxed<'f, Self::StreamUserActivityStream>
    where
        's: 'f,
    {
        Box::pin(handle(
            &self.engine,
            "StreamUserActivity",
            request,
            // Lazily, so the loaders are made inside the RPC's context and
            // the stream's downstream calls carry its request id and caller.
            move |req, call| async move { self.stream_user_activity(req, call) },
        ))
    }
}

/// Checks a stream's users: ids, or a range served whole (never cut short).
fn check_users(users: Option<Users>, max: u32, v: &mut Vec<FieldViolation>) -> Users {
    let Some(users) = users else {
        v.push(FieldViolation::new("users", "set user_ids or user_range"));
        return Users::Ids(Vec::new());
    };
    match &users {
        Users::Ids(ids) => {
            super::check_ids("user_ids.ids", ids, max as usize, v);
        }
        Users::Range {
            prefix,
            first,
            count,
        } => {
            if *count == 0 || *count > max {
                v.push(FieldViolation::new(
                    "user_range.count",
                    format!("must be between 1 and {max}"),
                ));
            }
            let Some(last) = first.checked_add(u64::from(*count).saturating_sub(1)) else {
                // Never served short: a range past the largest number is refused.
                v.push(FieldViolation::new(
                    "user_range",
                    format!(
                        "first + count - 1 is past the largest number (2^64 - 1); \
                             at most {} users from this first",
                        u64::MAX - first + 1
                    ),
                ));
                return users;
            };
            // Every id of the range must be a valid id; the longest is
            // the last one.
            let last_id = format!("{prefix}{last}");
            if last_id.len() > super::MAX_ID_LEN {
                v.push(FieldViolation::new(
                    "user_range",
                    format!(
                        "the range's last id is {} characters, over the {} an id may have; \
                             shorten the prefix or lower first + count",
                        last_id.len(),
                        super::MAX_ID_LEN
                    ),
                ));
            } else {
                super::check_id("user_range.prefix", &last_id, v);
            }
        }
    }
    users
}

impl ActivityV1 {
    fn stream_user_activity(
        &self,
        req: StreamUserActivityRequest,
        call: Rpc,
    ) -> Result<Response<BoxStream<'static, Result<StreamUserActivityResponse, Status>>>, Status>
    {
        let mut violations = Vec::new();
        let users = req.users.map(|u| match u {
            stream_user_activity_request::Users::UserIds(ids) => Users::Ids(ids.ids),
            stream_user_activity_request::Users::UserRange(r) => Users::Range {
                prefix: r.prefix,
                first: r.first,
                count: r.count,
            },
        });
        let max = self.engine.batching().stream_max_users;
        let users = check_users(users, max, &mut violations);
        let window = check_window(req.window, &mut violations);
        let c = check_options(
            req.read_mask.as_ref(),
            &Component::ACTIVITY,
            req.completeness,
            req.cache.as_ref(),
            &mut violations,
        );
        let ask = ask(&c, violations, &call)?;
        let scope = Arc::from(call.caller.scope());
        let stream = self
            .engine
            .activity_stream(scope, users, window, ask, call.deadline)
            .map(|item| match item {
                Ok((user_id, Ok(parts))) => {
                    let r = shape(user_id.clone(), parts);
                    Ok(StreamUserActivityResponse {
                        user_id,
                        activity: r.activity,
                        status: r.status,
                        error: None,
                    })
                }
                Ok((user_id, Err(e))) => Ok(StreamUserActivityResponse {
                    user_id,
                    error: Some(rpc_status(e)),
                    ..Default::default()
                }),
                Err(e) => Err(Status::from(e)),
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// What an activity caller gets: the components it asked for (narrowed by
/// authorization), and counterparties named when it may read the directory.
fn ask(c: &Common, violations: Vec<FieldViolation>, call: &Rpc) -> Result<Ask, Error> {
    let mut ask = c.ask(violations, &call.caller)?;
    if call.caller.components().contains(Component::Directory) {
        ask.requested = ask.requested.with(Component::Directory);
    }
    Ok(ask)
}

impl ActivityV1 {
    async fn get_user_activity(
        &self,
        req: GetUserActivityRequest,
        call: Rpc,
    ) -> Result<Response<GetUserActivityResponse>, Status> {
        let mut violations = Vec::new();
        let window = check_window(req.window, &mut violations);
        let c = check_common(
            "user_id",
            &req.user_id,
            req.read_mask.as_ref(),
            &Component::ACTIVITY,
            req.completeness,
            req.cache.as_ref(),
            &mut violations,
        );
        let ask = ask(&c, violations, &call)?;
        let parts = self
            .engine
            .activity(
                (call.caller.scope(), &req.user_id),
                &window,
                ask,
                call.deadline,
                None,
            )
            .await?;
        Ok(Response::new(shape(req.user_id, parts)))
    }
}

fn check_window(window: Option<TimeWindow>, violations: &mut Vec<FieldViolation>) -> Window {
    let Some(w) = window else {
        return Window::default();
    };
    if let Some(t) = &w.start_time {
        check_timestamp("window.start_time", t, violations);
    }
    if let Some(t) = &w.end_time {
        check_timestamp("window.end_time", t, violations);
    }
    if let (Some(s), Some(e)) = (&w.start_time, &w.end_time)
        && (e.seconds, e.nanos) <= (s.seconds, s.nanos)
    {
        violations.push(FieldViolation::new(
            "window.end_time",
            "must be after window.start_time",
        ));
    }
    Window {
        start: w.start_time,
        end: w.end_time,
    }
}

/// Shapes the engine's parts into the v1 response: records named from the
/// directory, one merged timeline, and a summary over what was returned.
fn shape(user_id: String, parts: ActivityParts) -> GetUserActivityResponse {
    let status = aggregate_status(&[
        (Component::Calls, parts.calls.state()),
        (Component::Emails, parts.emails.state()),
        (Component::Sms, parts.sms.state()),
        (Component::Directory, parts.names.state()),
    ]);
    let no_names = HashMap::new();
    let names = parts.names.as_ok().unwrap_or(&no_names);
    let who = |id: String| Counterparty {
        display_name: names.get(&id).cloned().unwrap_or_default(),
        id,
    };
    let direction = |outbound: bool| {
        if outbound {
            Direction::Outbound
        } else {
            Direction::Inbound
        }
    };

    let calls = parts.calls.ok().map(|calls| Calls {
        records: calls
            .into_iter()
            .map(|c: downstream::calls::v1::Call| Call {
                call_id: c.call_id,
                counterparty: Some(who(c.counterparty_id)),
                direction: direction(c.outbound).into(),
                started_at: c.started_at,
                duration: Some(PbDuration {
                    seconds: i64::from(c.duration_seconds),
                    nanos: 0,
                }),
            })
            .collect(),
    });
    let emails = parts.emails.ok().map(|emails| Emails {
        records: emails
            .into_iter()
            .map(|e| Email {
                email_id: e.email_id,
                counterparty: Some(who(e.counterparty_id)),
                direction: direction(e.outbound).into(),
                sent_at: e.sent_at,
                subject: e.subject,
            })
            .collect(),
    });
    let sms = parts.sms.ok().map(|sms| SmsMessages {
        records: sms
            .into_iter()
            .map(|s| Sms {
                sms_id: s.sms_id,
                counterparty: Some(who(s.counterparty_id)),
                direction: direction(s.outbound).into(),
                sent_at: s.sent_at,
                text: s.text,
            })
            .collect(),
    });

    let timeline = timeline(calls.as_ref(), emails.as_ref(), sms.as_ref());
    let summary = summary(calls.as_ref(), emails.as_ref(), sms.as_ref(), &timeline);
    GetUserActivityResponse {
        activity: Some(UserActivity {
            user_id,
            calls,
            emails,
            sms,
            timeline,
            summary: Some(summary),
        }),
        status: Some(status),
    }
}

fn timeline(
    calls: Option<&Calls>,
    emails: Option<&Emails>,
    sms: Option<&SmsMessages>,
) -> Vec<TimelineEntry> {
    let entry =
        |time, channel: Channel, id: &String, who: &Option<Counterparty>, dir| TimelineEntry {
            time,
            channel: channel.into(),
            record_id: id.clone(),
            counterparty: who.clone(),
            direction: dir,
        };
    let mut out: Vec<TimelineEntry> = calls
        .into_iter()
        .flat_map(|c| &c.records)
        .map(|c| {
            entry(
                c.started_at,
                Channel::Call,
                &c.call_id,
                &c.counterparty,
                c.direction,
            )
        })
        .chain(emails.into_iter().flat_map(|e| &e.records).map(|e| {
            entry(
                e.sent_at,
                Channel::Email,
                &e.email_id,
                &e.counterparty,
                e.direction,
            )
        }))
        .chain(sms.into_iter().flat_map(|s| &s.records).map(|s| {
            entry(
                s.sent_at,
                Channel::Sms,
                &s.sms_id,
                &s.counterparty,
                s.direction,
            )
        }))
        .collect();
    out.sort_by(|a, b| newest_first(a.time.as_ref(), b.time.as_ref()));
    out
}

fn summary(
    calls: Option<&Calls>,
    emails: Option<&Emails>,
    sms: Option<&SmsMessages>,
    timeline: &[TimelineEntry],
) -> ActivitySummary {
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let call_seconds: i64 = calls
        .into_iter()
        .flat_map(|c| &c.records)
        .filter_map(|c| c.duration.map(|d| d.seconds))
        .sum();
    ActivitySummary {
        call_count: count(calls.map_or(0, |c| c.records.len())),
        email_count: count(emails.map_or(0, |e| e.records.len())),
        sms_count: count(sms.map_or(0, |s| s.records.len())),
        total_call_duration: Some(PbDuration {
            seconds: call_seconds,
            nanos: 0,
        }),
        last_contact_time: timeline.first().and_then(|e| e.time),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cache::Source, engine::Outcome, error::Reason};
    use downstream::{calls::v1 as c, sms::v1 as s};
    use prost_types::Timestamp;

    fn range(prefix: &str, first: u64, count: u32) -> (Vec<FieldViolation>, Users) {
        let mut v = Vec::new();
        let users = check_users(
            Some(Users::Range {
                prefix: prefix.into(),
                first,
                count,
            }),
            100,
            &mut v,
        );
        (v, users)
    }

    #[test]
    fn a_range_is_served_whole_or_refused() {
        let (v, _) = range("u-", u64::MAX - 1, 3);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].field, "user_range");
        assert!(v[0].description.contains("at most 2 users"), "{v:?}");

        let (v, users) = range("", u64::MAX - 2, 3);
        assert!(v.is_empty(), "{v:?}");
        let ids: Vec<_> = users.into_ids().collect();
        assert_eq!(ids.len(), 3, "ends at u64::MAX itself: {ids:?}");
        assert_eq!(ids[2], u64::MAX.to_string());

        let (v, _) = range(&"p".repeat(50), 1_000_000_000_000_000, 3);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].field, "user_range");
        assert!(
            v[0].description.contains("last id is 66 characters"),
            "{v:?}"
        );

        let (v, _) = range("u/", 1, 3);
        assert_eq!(
            v[0].field, "user_range.prefix",
            "charset problems name the prefix"
        );
    }

    fn ts(seconds: i64) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos: 0 })
    }

    #[test]
    fn timeline_merges_channels_newest_first_with_names() {
        let parts = ActivityParts {
            calls: Outcome::Ok(
                vec![
                    c::Call {
                        call_id: "c1".into(),
                        counterparty_id: "u-2".into(),
                        started_at: ts(30),
                        duration_seconds: 60,
                        outbound: true,
                    },
                    c::Call {
                        call_id: "c2".into(),
                        counterparty_id: "u-9".into(),
                        started_at: ts(10),
                        duration_seconds: 5,
                        outbound: false,
                    },
                ],
                Source::Live,
            ),
            emails: Outcome::Failed(Reason::Timeout),
            sms: Outcome::Ok(
                vec![s::Sms {
                    sms_id: "s1".into(),
                    counterparty_id: "u-2".into(),
                    sent_at: ts(20),
                    ..Default::default()
                }],
                Source::Live,
            ),
            names: Outcome::Ok(
                HashMap::from([("u-2".to_string(), "Ada".to_string())]),
                Source::Live,
            ),
        };
        let resp = shape("u-1".into(), parts);
        let a = resp.activity.expect("activity");
        let ids: Vec<_> = a.timeline.iter().map(|e| e.record_id.as_str()).collect();
        assert_eq!(ids, ["c1", "s1", "c2"]);
        assert_eq!(
            a.timeline[0]
                .counterparty
                .as_ref()
                .expect("who")
                .display_name,
            "Ada"
        );
        assert_eq!(
            a.timeline[2]
                .counterparty
                .as_ref()
                .expect("who")
                .display_name,
            ""
        );
        let sum = a.summary.expect("summary");
        assert_eq!((sum.call_count, sum.email_count, sum.sms_count), (2, 0, 1));
        assert_eq!(sum.total_call_duration.expect("d").seconds, 65);
        assert_eq!(sum.last_contact_time, ts(30));
        assert!(a.emails.is_none());
        let status = resp.status.expect("status");
        assert!(status.degraded);
        assert_eq!(status.components["emails"].reason, "TIMEOUT");
    }

    #[test]
    fn window_end_must_follow_start() {
        let mut v = Vec::new();
        let w = TimeWindow {
            start_time: ts(10),
            end_time: ts(10),
        };
        check_window(Some(w), &mut v);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].field, "window.end_time");
        let mut v = Vec::new();
        check_window(
            Some(TimeWindow {
                start_time: Some(Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                end_time: None,
            }),
            &mut v,
        );
        assert_eq!(v[0].field, "window.start_time");
    }
}
