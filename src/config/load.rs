//! Deserializing a config so that every problem is reported at once, each
//! with its TOML path.
//!
//! serde stops at the first error. So: deserialize, and on an error take its
//! path (`serde_path_to_error`), record it, remove the offending key (its
//! default then applies) and try again, until the rest deserializes or the
//! error cannot be stepped over (a required key is missing). Each round
//! removes one key, so this ends.

use serde::de::DeserializeOwned;

use super::Problems;

/// Deserializes `table` as a `T`, adding every problem found to `problems`
/// with its path under `prefix` (e.g. `downstreams.orders`). `None` when some
/// problem could not be stepped over.
pub(super) fn deserialize_all<T: DeserializeOwned>(
    mut table: toml::Table,
    prefix: &str,
    problems: &mut Problems,
) -> Option<T> {
    loop {
        let error = match serde_path_to_error::deserialize(toml::Value::Table(table.clone())) {
            Ok(value) => return Some(value),
            Err(e) => e,
        };
        let at = error.path().to_string();
        let at = if at == "." { String::new() } else { at };
        let message = error.inner().to_string();
        let (path, message) = explain(&at, message.trim());
        problems.add(join(prefix, &path), message);
        if at.is_empty() || !remove(&mut table, &at) {
            return None;
        }
    }
}

/// The path and message of one serde error, said for a person: a missing
/// key is named in the path, an unknown one gets the closest known name.
fn explain(at: &str, message: &str) -> (String, String) {
    if let Some(field) = between(message, "missing field `", "`") {
        return (join(at, field), "missing; this key is required".into());
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let unknown = rest.split('`').next().unwrap_or_default();
        let expected: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
        let path = if at.ends_with(unknown) {
            at.to_string()
        } else {
            join(at, unknown)
        };
        let closest = expected
            .iter()
            .map(|k| (strsim::levenshtein(unknown, k), *k))
            .min()
            .filter(|(d, k)| *d <= (k.len() / 3).max(2));
        let message = match closest {
            Some((_, k)) => format!("unknown key; did you mean {k}?"),
            None if expected.is_empty() => "unknown key".to_string(),
            None => format!("unknown key; expected one of: {}", expected.join(", ")),
        };
        return (path, message);
    }
    (at.to_string(), message.to_string())
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = &s[s.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

fn join(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty()) {
        (true, _) => path.to_string(),
        (_, true) => prefix.to_string(),
        _ => format!("{prefix}.{path}"),
    }
}

/// Removes the key at `path` (`a.b.c`; an indexed `a.b[2]` removes `b`).
/// False when there is no such key.
fn remove(table: &mut toml::Table, path: &str) -> bool {
    let keys: Vec<&str> = path
        .split('.')
        .map(|k| k.split('[').next().unwrap_or(k))
        .collect();
    let Some((last, parents)) = keys.split_last() else {
        return false;
    };
    let mut at = table;
    for key in parents {
        match at.get_mut(*key) {
            Some(toml::Value::Table(t)) => at = t,
            _ => return false,
        }
    }
    at.remove(*last).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        #[serde(default)]
        inner: Inner,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    #[allow(dead_code)]
    struct Inner {
        log_format: String,
        #[serde(with = "humantime_serde")]
        delay: std::time::Duration,
    }

    #[test]
    fn every_problem_is_found_with_its_path() {
        let table: toml::Table = toml::from_str(
            "name = \"x\"\n[inner]\nlog_formatt = \"json\"\ndelay = \"2 fortnights\"\nzzz = 1\n",
        )
        .expect("toml");
        let mut problems = Problems::default();
        let outer: Option<Outer> = deserialize_all(table, "", &mut problems);
        assert!(outer.is_some(), "the rest deserializes with defaults");
        let found: Vec<String> = problems.0.iter().map(ToString::to_string).collect();
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found.contains(&"inner.log_formatt: unknown key; did you mean log_format?".into()),
            "{found:?}"
        );
        assert!(
            found.iter().any(|p| p.starts_with("inner.delay: ")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("inner.zzz: unknown key; expected one of")),
            "{found:?}"
        );

        let mut problems = Problems::default();
        let table: toml::Table = toml::from_str("[inner]\n").expect("toml");
        let none: Option<Outer> = deserialize_all(table, "top", &mut problems);
        assert!(none.is_none());
        assert_eq!(
            problems.0[0].to_string(),
            "top.name: missing; this key is required"
        );
    }
}
