//! The components an aggregate is made of, and sets of them as parsed from a
//! `read_mask`.
//!
//! Each component is fetched from exactly one downstream service, so a
//! [`Component`] also names the downstream it comes from. `directory` is the
//! enrichment step of the activity aggregate: it has a status entry but cannot
//! be selected in a read mask.

use std::fmt;

use tonic_types::FieldViolation;

/// One part of an aggregate, and the downstream service it comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// Customer basics, from the profile service.
    Profile,
    /// Favorite products, from the favorites service.
    Favorites,
    /// Product reviews, from the reviews service.
    Reviews,
    /// Orders, from the orders service.
    Orders,
    /// Phone calls, from the calls service.
    Calls,
    /// E-mails, from the emails service.
    Emails,
    /// SMS messages, from the sms service.
    Sms,
    /// Counterparty names, from the directory service.
    Directory,
}

impl Component {
    /// Every component, in a fixed order (also the index order of per-component arrays).
    pub const ALL: [Component; 8] = [
        Component::Profile,
        Component::Favorites,
        Component::Reviews,
        Component::Orders,
        Component::Calls,
        Component::Emails,
        Component::Sms,
        Component::Directory,
    ];
    /// The components that carry data (every one but the directory, which
    /// only names counterparties): what the cache may hold.
    pub const DATA: [Component; 7] = [
        Component::Profile,
        Component::Favorites,
        Component::Reviews,
        Component::Orders,
        Component::Calls,
        Component::Emails,
        Component::Sms,
    ];
    /// The components of the customer aggregate that a read mask may name.
    pub const CUSTOMER: [Component; 4] = [
        Component::Profile,
        Component::Favorites,
        Component::Reviews,
        Component::Orders,
    ];
    /// The components of the activity aggregate that a read mask may name.
    pub const ACTIVITY: [Component; 3] = [Component::Calls, Component::Emails, Component::Sms];

    /// The name used in read masks, config, status maps and error details.
    pub const fn name(self) -> &'static str {
        match self {
            Component::Profile => "profile",
            Component::Favorites => "favorites",
            Component::Reviews => "reviews",
            Component::Orders => "orders",
            Component::Calls => "calls",
            Component::Emails => "emails",
            Component::Sms => "sms",
            Component::Directory => "directory",
        }
    }

    /// The downstream contract (package and version) the component comes
    /// from; part of cache keys, so a new contract version never reads
    /// entries written under the old one.
    pub const fn contract(self) -> &'static str {
        match self {
            Component::Profile => "downstream.profile.v1",
            Component::Favorites => "downstream.favorites.v1",
            Component::Reviews => "downstream.reviews.v1",
            Component::Orders => "downstream.orders.v1",
            Component::Calls => "downstream.calls.v1",
            Component::Emails => "downstream.emails.v1",
            Component::Sms => "downstream.sms.v1",
            Component::Directory => "downstream.directory.v1",
        }
    }

    /// Position in [`Component::ALL`], for per-component arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Parses a component name.
    pub fn from_name(name: &str) -> Option<Component> {
        Component::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of components: a bit mask, so it is `Copy` and costs nothing on the
/// request path.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct ComponentSet(u16);

impl ComponentSet {
    /// The empty set.
    pub const EMPTY: ComponentSet = ComponentSet(0);

    /// The set of the given components.
    pub fn of(components: &[Component]) -> ComponentSet {
        components
            .iter()
            .fold(ComponentSet::EMPTY, |set, &c| set.with(c))
    }

    /// This set plus `c`.
    #[must_use]
    pub const fn with(self, c: Component) -> ComponentSet {
        ComponentSet(self.0 | (1 << c as u16))
    }

    /// Whether `c` is in the set.
    pub const fn contains(self, c: Component) -> bool {
        self.0 & (1 << c as u16) != 0
    }

    /// The components in both sets.
    #[must_use]
    pub const fn intersect(self, other: ComponentSet) -> ComponentSet {
        ComponentSet(self.0 & other.0)
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The members, in [`Component::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Component> {
        Component::ALL
            .into_iter()
            .filter(move |&c| self.contains(c))
    }

    /// Parses a read mask's paths against the components an aggregate allows.
    /// No paths means all of them. Unknown or repeated paths become field
    /// violations on `field` (e.g. `read_mask.paths[1]`).
    pub fn from_read_mask(
        paths: &[String],
        allowed: &[Component],
        field: &str,
        violations: &mut Vec<FieldViolation>,
    ) -> ComponentSet {
        if paths.is_empty() {
            return ComponentSet::of(allowed);
        }
        let mut set = ComponentSet::EMPTY;
        for (i, path) in paths.iter().enumerate() {
            match allowed.iter().find(|c| c.name() == path) {
                Some(&c) => set = set.with(c),
                None => violations.push(unknown(format!("{field}.paths[{i}]"), path, allowed)),
            }
        }
        set
    }
}

impl fmt::Debug for ComponentSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// The violation of `field` naming `name`, which is none of `allowed`. The
/// name comes from the request, so it is echoed cut to 32 characters: the
/// error must not grow with the input.
pub fn unknown(field: String, name: &str, allowed: &[Component]) -> FieldViolation {
    const MAX: usize = 32;
    let echoed = match name.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &name[..end]),
        None => name.to_string(),
    };
    FieldViolation::new(
        field,
        format!(
            "unknown component {echoed:?}; expected one of: {}",
            names(allowed)
        ),
    )
}

/// `a, b, c` for error messages.
pub fn names(components: &[Component]) -> String {
    components
        .iter()
        .map(|c| c.name())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_mask_means_every_allowed_component() {
        let mut v = Vec::new();
        let set = ComponentSet::from_read_mask(&[], &Component::CUSTOMER, "read_mask", &mut v);
        assert!(v.is_empty());
        assert_eq!(set, ComponentSet::of(&Component::CUSTOMER));
        assert!(!set.contains(Component::Calls));
    }

    #[test]
    fn mask_selects_named_components_and_reports_unknown_ones() {
        let mut v = Vec::new();
        let paths = ["orders".to_string(), "calls".into(), "profile".into()];
        let set = ComponentSet::from_read_mask(&paths, &Component::CUSTOMER, "read_mask", &mut v);
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            [Component::Profile, Component::Orders]
        );
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].field, "read_mask.paths[1]");
        assert!(v[0].description.contains("\"calls\""));
    }

    #[test]
    fn names_round_trip() {
        for c in Component::ALL {
            assert_eq!(Component::from_name(c.name()), Some(c));
            assert_eq!(Component::ALL[c.index()], c);
        }
        assert_eq!(Component::from_name("nope"), None);
    }
}
