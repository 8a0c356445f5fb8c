//! The cache key format, in one place: how a key is written, which entity a
//! key belongs to, and the Redis pattern that finds an entity's keys.
//!
//! `contract|component|scope|id|window`. Ids and scopes cannot contain `|`
//! or glob characters (validated at the API and at config load), so keys
//! cannot collide and an entity's pattern is exact up to the component.

use crate::component::Component;

/// A cache key: everything that changes the answer.
pub struct Key<'a> {
    /// The component (and so the downstream and its contract version).
    pub component: Component,
    /// The consumer's visibility scope.
    pub scope: &'a str,
    /// The entity id.
    pub id: &'a str,
    /// The time window, for windowed components.
    pub window: Option<(Option<i64>, Option<i64>)>,
}

impl Key<'_> {
    /// The key as stored.
    pub(super) fn render(&self) -> String {
        let bound = |b: Option<i64>| b.map_or_else(|| "-".to_string(), |v| v.to_string());
        let window = self.window.map_or_else(
            || "-".to_string(),
            |(s, e)| format!("{}..{}", bound(s), bound(e)),
        );
        format!(
            "{}|{}|{}|{}|{}",
            self.component.contract(),
            self.component.name(),
            self.scope,
            self.id,
            window
        )
    }
}

/// Whether stored `key` belongs to entity `id` (and one of `components`, if
/// any).
pub(super) fn belongs_to(key: &str, id: &str, components: &[Component]) -> bool {
    let mut parts = key.split('|');
    let (_contract, component, _scope, key_id) =
        (parts.next(), parts.next(), parts.next(), parts.next());
    key_id == Some(id)
        && (components.is_empty()
            || component.is_some_and(|c| components.iter().any(|x| x.name() == c)))
}

/// The Redis `SCAN MATCH` pattern of entity `id`'s keys (every scope,
/// component and window; [`belongs_to`] filters the components).
pub(super) fn pattern(id: &str) -> String {
    format!("*|{id}|*")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_belongs_to_its_entity_and_component_only() {
        let key = Key {
            component: Component::Orders,
            scope: "reports",
            id: "c-1",
            window: None,
        }
        .render();
        assert!(belongs_to(&key, "c-1", &[]));
        assert!(belongs_to(&key, "c-1", &[Component::Orders]));
        assert!(!belongs_to(&key, "c-1", &[Component::Profile]));
        assert!(!belongs_to(&key, "c-10", &[]));
        let windowed = Key {
            component: Component::Calls,
            scope: "s",
            id: "u-1",
            window: Some((Some(5), None)),
        }
        .render();
        assert!(windowed.ends_with("|u-1|5..-"), "{windowed}");
        // The Redis pattern finds exactly the entity's keys (glob `*`).
        let glob = pattern("c-1");
        assert!(glob.starts_with('*') && glob.ends_with('*'));
        assert!(key.contains(&glob[1..glob.len() - 1]));
    }
}
