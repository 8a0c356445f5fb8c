//! The user-activity aggregate: calls, e-mails and SMS fetched concurrently,
//! then every counterparty named in one batched directory lookup.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use futures::{Stream, StreamExt};

use prost_types::Timestamp;

use crate::{
    component::{Component, ComponentSet},
    downstream::Loaders,
    error::{Error, Reason},
    pb::downstream::{
        calls::v1::{Call, ListCallsRequest},
        directory::v1::BatchGetContactsRequest,
        emails::v1::{Email, ListEmailsRequest},
        sms::v1::{ListSmsRequest, Sms},
    },
    resilience::CallError,
    telemetry::rpc::RequestContext,
};

use super::{Ask, Deadline, Engine, Entity, Job, Outcome, fetch, needed};
use crate::cache::Source;

/// The users of a stream: explicit ids, or a numbered range made on the fly
/// (a range of 100,000 users is never held as strings at once). Checked by
/// the adapter: a range never passes `u64::MAX`.
#[derive(Debug)]
pub enum Users {
    /// These ids, in order.
    Ids(Vec<String>),
    /// `prefix` + `first`, `first + 1`, ... `count` ids.
    Range {
        /// Text before the number.
        prefix: String,
        /// The first number.
        first: u64,
        /// How many.
        count: u32,
    },
}

impl Users {
    /// The ids, in order.
    pub fn into_ids(self) -> Box<dyn Iterator<Item = String> + Send> {
        match self {
            Users::Ids(ids) => Box::new(ids.into_iter()),
            Users::Range {
                prefix,
                first,
                count,
            } => Box::new(
                // Inclusive: a checked range may end at u64::MAX itself.
                (first..=first.saturating_add(u64::from(count).saturating_sub(1)))
                    .take(count as usize)
                    .map(move |n| format!("{prefix}{n}")),
            ),
        }
    }
}

/// One item of an activity stream: a user and its answer; or, once the
/// caller's deadline has passed, the error that ends the stream.
pub type StreamItem = Result<(String, Result<ActivityParts, Error>), Error>;

/// A validated time window; either bound may be open.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Window {
    /// Inclusive start.
    pub start: Option<Timestamp>,
    /// Exclusive end.
    pub end: Option<Timestamp>,
}

/// The downstream data of one user, as fetched; adapters shape it.
#[derive(Debug)]
pub struct ActivityParts {
    /// From the calls service, newest first.
    pub calls: Outcome<Vec<Call>>,
    /// From the emails service, newest first.
    pub emails: Outcome<Vec<Email>>,
    /// From the sms service, newest first.
    pub sms: Outcome<Vec<Sms>>,
    /// Counterparty id → display name, from one directory call. Skipped when
    /// there was nobody to look up.
    pub names: Outcome<HashMap<String, String>>,
}

impl Engine {
    /// The activity of many users, in order, for a caller whose cache scope
    /// is `scope`. Users are fetched in chunks of `batch.stream_in_flight`,
    /// each chunk's lookups batched together, with the next chunk fetched
    /// while this one is being sent: at most two chunks are held, and the
    /// next is started only when the consumer has taken this one (tonic
    /// takes a message only when HTTP/2 flow control lets it send). Chunks,
    /// not a sliding window: refilling one user at a time would send tiny
    /// batches. The caller's deadline covers the whole stream: once it has
    /// passed, the stream ends with DEADLINE_EXCEEDED.
    pub fn activity_stream(
        self: &Arc<Self>,
        scope: Arc<str>,
        users: Users,
        window: Window,
        ask: Ask,
        deadline: Deadline,
    ) -> impl Stream<Item = StreamItem> + Send + 'static {
        let loaders = self.loaders(deadline);
        // The consumer polls the stream outside the RPC's task scope: each
        // item's work runs in the RPC's context again, so its downstream
        // calls carry the request id and its outcomes count for this RPC.
        let context = RequestContext::current();
        let engine = self.clone();
        let fetch_one = move |user_id: String| {
            let (engine, loaders, scope, window, context) = (
                engine.clone(),
                loaders.clone(),
                scope.clone(),
                window.clone(),
                context.clone(),
            );
            let work = async move {
                let answer = engine
                    .activity((&scope, &user_id), &window, ask, deadline, Some(&loaders))
                    .await;
                (user_id, answer)
            };
            RequestContext::within(context, work)
        };
        let items = futures::stream::iter(users.into_ids())
            .chunks(self.batching.stream_in_flight)
            .map(move |chunk| futures::future::join_all(chunk.into_iter().map(&fetch_one)))
            .buffered(2)
            .flat_map(futures::stream::iter);
        items
            .map(Some)
            .chain(futures::stream::once(async { None }))
            .scan(false, move |ended, item| {
                let out = if *ended {
                    None
                } else if tokio::time::Instant::now() >= deadline.at() {
                    *ended = true;
                    Some(Err(Error::DeadlineExceeded))
                } else {
                    item.map(Ok)
                };
                std::future::ready(out)
            })
    }

    /// Fetches the requested channels of user `id` concurrently, then names
    /// every counterparty with one directory call.
    pub async fn activity(
        &self,
        (scope, id): (&str, &str),
        window: &Window,
        ask: Ask,
        deadline: Deadline,
        loaders: Option<&Loaders>,
    ) -> Result<ActivityParts, Error> {
        let ds = &self.downstreams;
        let requested = ask.requested;
        let needed = needed(requested, self.activity_required, ask.completeness);
        // No channel owns a user: any channel's NOT_FOUND is the user's.
        let entity = Entity {
            kind: "user",
            id,
            owner: None,
        };
        let job = Job {
            entity,
            scope,
            window: Some((
                window.start.map(|t| t.seconds),
                window.end.map(|t| t.seconds),
            )),
            requested,
            needed,
            policy: ask.policy,
            deadline,
            loaders,
        };
        let user_id = || id.to_string();
        let calls = self.part(
            &job,
            Component::Calls,
            (&ds.calls, |l| &l.calls),
            || ListCallsRequest {
                user_id: user_id(),
                start_time: window.start,
                end_time: window.end,
            },
            |r| Ok(r.calls),
        );
        let emails = self.part(
            &job,
            Component::Emails,
            (&ds.emails, |l| &l.emails),
            || ListEmailsRequest {
                user_id: user_id(),
                start_time: window.start,
                end_time: window.end,
            },
            |r| Ok(r.emails),
        );
        let sms = self.part(
            &job,
            Component::Sms,
            (&ds.sms, |l| &l.sms),
            || ListSmsRequest {
                user_id: user_id(),
                start_time: window.start,
                end_time: window.end,
            },
            |r| Ok(r.messages),
        );
        let (calls, emails, sms) = tokio::try_join!(calls, emails, sms)?;

        let ids = counterparties(&calls, &emails, &sms);
        // Names are looked up only for callers that asked for (may read) the
        // directory, and only when there is someone to name.
        let lookup = if ids.is_empty() || !requested.contains(Component::Directory) {
            ComponentSet::EMPTY
        } else {
            ComponentSet::EMPTY.with(Component::Directory)
        };
        let names = fetch(Component::Directory, lookup, needed, entity, || async {
            if let Some(l) = loaders {
                // Merged with the other users' lookups of this request.
                let found = futures::future::try_join_all(
                    ids.iter().map(|id| l.directory.load(id.clone())),
                )
                .await
                .map_err(|e| match e {
                    CallError::NotFound => CallError::Failed(Reason::DownstreamRejected),
                    other => other,
                })?;
                let names = ids
                    .into_iter()
                    .zip(found)
                    .filter_map(|(id, name)| Some((id, name?)))
                    .collect();
                return Ok((names, Source::Live));
            }
            let msg = BatchGetContactsRequest { user_ids: ids };
            let resp = ds
                .directory
                .call(deadline, msg)
                .await
                // The directory answers unknown ids by leaving them out; a
                // NOT_FOUND from it says nothing about the user asked for.
                .map_err(|e| match e {
                    CallError::NotFound => CallError::Failed(Reason::DownstreamRejected),
                    other => other,
                })?;
            let names = resp
                .contacts
                .into_iter()
                .map(|c| (c.user_id, c.display_name))
                .collect();
            Ok((names, Source::Live))
        })
        .await?;
        self.record(&[
            (Component::Calls, calls.state()),
            (Component::Emails, emails.state()),
            (Component::Sms, sms.state()),
            (Component::Directory, names.state()),
        ]);
        Ok(ActivityParts {
            calls,
            emails,
            sms,
            names,
        })
    }
}

/// Every distinct counterparty id in the fetched records, in first-seen order.
fn counterparties(
    calls: &Outcome<Vec<Call>>,
    emails: &Outcome<Vec<Email>>,
    sms: &Outcome<Vec<Sms>>,
) -> Vec<String> {
    let mut seen = HashSet::new();
    let all = calls
        .as_ok()
        .into_iter()
        .flatten()
        .map(|c| &c.counterparty_id)
        .chain(
            emails
                .as_ok()
                .into_iter()
                .flatten()
                .map(|e| &e.counterparty_id),
        )
        .chain(
            sms.as_ok()
                .into_iter()
                .flatten()
                .map(|s| &s.counterparty_id),
        );
    all.filter(|id| seen.insert(id.as_str())).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counterparties_are_distinct_across_channels() {
        let call = |id: &str| Call {
            counterparty_id: id.into(),
            ..Default::default()
        };
        let email = |id: &str| Email {
            counterparty_id: id.into(),
            ..Default::default()
        };
        let ids = counterparties(
            &Outcome::Ok(vec![call("u-2"), call("u-3"), call("u-2")], Source::Live),
            &Outcome::Ok(vec![email("u-3"), email("u-4")], Source::Live),
            &Outcome::Failed(Reason::Timeout),
        );
        assert_eq!(ids, ["u-2", "u-3", "u-4"]);
        let none = counterparties(&Outcome::Skipped, &Outcome::Skipped, &Outcome::Skipped);
        assert!(none.is_empty());
    }
}
