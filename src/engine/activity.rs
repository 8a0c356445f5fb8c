//! The user-activity aggregate: calls, e-mails and SMS fetched concurrently,
//! then every counterparty named in one batched directory lookup.

use std::collections::{HashMap, HashSet};

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
};

use super::{Ask, Deadline, Engine, Entity, Job, Outcome, fetch, needed};
use crate::cache::Source;

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
