//! Deterministic data of the simulated services.
//!
//! Customers `c-1`..`c-N` and users `u-1`..`u-N`; everything about an entity
//! is generated from a PRNG seeded with its number, so every call (and every
//! sim process) returns the same data for the same id.

use prost_types::Timestamp;
use rand::{Rng, SeedableRng, rngs::SmallRng};

use crate::pb::downstream::{
    calls::v1::Call,
    directory::v1::Contact,
    emails::v1::Email,
    favorites::v1::Favorite,
    orders::v1::{Order, OrderStatus},
    profile::v1::Profile,
    reviews::v1::Review,
    sms::v1::Sms,
};

/// 2026-01-01T00:00:00Z: all generated times lie before it.
pub const EPOCH: i64 = 1_767_225_600;
const DAY: i64 = 86_400;

const FIRST: [&str; 16] = [
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Leslie",
    "Margaret", "John", "Sophie", "Tony", "Hedy", "Niklaus",
];
const LAST: [&str; 16] = [
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman",
    "Lamport", "Hamilton", "Backus", "Wilson", "Hoare", "Lamarr", "Wirth",
];
const PRODUCTS: [&str; 12] = [
    "Espresso Machine",
    "Trail Shoes",
    "Desk Lamp",
    "Headphones",
    "Rain Jacket",
    "Chess Set",
    "Cast Iron Pan",
    "Backpack",
    "Keyboard",
    "Tea Kettle",
    "Yoga Mat",
    "Bike Light",
];
const SUBJECTS: [&str; 6] = [
    "Quarterly report",
    "Re: invoice",
    "Lunch on Friday?",
    "Contract draft",
    "Travel plans",
    "Welcome aboard",
];
const TEXTS: [&str; 6] = [
    "On my way",
    "Call me back",
    "Thanks!",
    "See you at 5",
    "Running late",
    "Got it",
];

/// The simulated dataset: how many customers and users exist.
#[derive(Clone, Copy, Debug)]
pub struct Dataset {
    /// Customers are `c-1`..`c-customers`.
    pub customers: u64,
    /// Users are `u-1`..`u-users`.
    pub users: u64,
}

fn number(id: &str, prefix: &str, max: u64) -> Option<u64> {
    let n: u64 = id.strip_prefix(prefix)?.parse().ok()?;
    (1..=max).contains(&n).then_some(n)
}

fn rng(n: u64, salt: u64) -> SmallRng {
    SmallRng::seed_from_u64(n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt)
}

fn ts(seconds: i64) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos: 0 })
}

fn name(n: u64, salt: u64) -> (&'static str, &'static str) {
    let mut r = rng(n, salt);
    (
        FIRST[r.random_range(0..FIRST.len())],
        LAST[r.random_range(0..LAST.len())],
    )
}

/// `count` times within the last `days` days before [`EPOCH`], newest first.
fn times(r: &mut SmallRng, count: usize, days: i64) -> Vec<i64> {
    let mut t: Vec<i64> = (0..count)
        .map(|_| EPOCH - r.random_range(1..days * DAY))
        .collect();
    t.sort_unstable_by(|a, b| b.cmp(a));
    t
}

fn in_window(t: i64, start: Option<&Timestamp>, end: Option<&Timestamp>) -> bool {
    start.is_none_or(|s| t >= s.seconds) && end.is_none_or(|e| t < e.seconds)
}

impl Dataset {
    /// The customer number of `id`, if it exists.
    pub fn customer(&self, id: &str) -> Option<u64> {
        number(id, "c-", self.customers)
    }

    /// The user number of `id`, if it exists.
    pub fn user(&self, id: &str) -> Option<u64> {
        number(id, "u-", self.users)
    }

    /// Customer `n`'s profile.
    pub fn profile(&self, n: u64) -> Profile {
        let (first, last) = name(n, 1);
        let mut r = rng(n, 2);
        Profile {
            customer_id: format!("c-{n}"),
            display_name: format!("{first} {last}"),
            email: format!(
                "{}.{}{n}@example.com",
                first.to_lowercase(),
                last.to_lowercase()
            ),
            tier: ["bronze", "silver", "gold", "platinum"][r.random_range(0..4)].into(),
            country_code: ["US", "DE", "GB", "FR", "JP", "BR"][r.random_range(0..6)].into(),
            created_at: ts(EPOCH - r.random_range(30..1500) * DAY),
        }
    }

    /// Customer `n`'s favorites, newest first.
    pub fn favorites(&self, n: u64) -> Vec<Favorite> {
        let mut r = rng(n, 3);
        let count = r.random_range(0..=12);
        times(&mut r, count, 365)
            .into_iter()
            .map(|t| {
                let p = r.random_range(0..5000u32);
                Favorite {
                    product_id: format!("p-{p}"),
                    product_name: PRODUCTS[p as usize % PRODUCTS.len()].into(),
                    added_at: ts(t),
                }
            })
            .collect()
    }

    /// Customer `n`'s reviews, newest first.
    pub fn reviews(&self, n: u64) -> Vec<Review> {
        let mut r = rng(n, 4);
        let count = r.random_range(0..=15);
        times(&mut r, count, 730)
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let rating = r.random_range(1..=5);
                Review {
                    review_id: format!("r-{n}-{i}"),
                    product_id: format!("p-{}", r.random_range(0..5000u32)),
                    rating,
                    title: ["Awful", "Meh", "Fine", "Good", "Love it"][(rating - 1) as usize]
                        .into(),
                    created_at: ts(t),
                }
            })
            .collect()
    }

    /// Customer `n`'s orders, newest first.
    pub fn orders(&self, n: u64) -> Vec<Order> {
        let mut r = rng(n, 5);
        let count = r.random_range(0..=20);
        let currency = ["USD", "EUR", "GBP"][r.random_range(0..3)];
        times(&mut r, count, 730)
            .into_iter()
            .enumerate()
            .map(|(i, t)| Order {
                order_id: format!("o-{n}-{i}"),
                status: [
                    OrderStatus::Placed,
                    OrderStatus::Shipped,
                    OrderStatus::Delivered,
                    OrderStatus::Cancelled,
                ][r.random_range(0..4)]
                .into(),
                total_minor: r.random_range(500..50_000),
                currency_code: currency.into(),
                placed_at: ts(t),
            })
            .collect()
    }

    fn counterparty(&self, n: u64, r: &mut SmallRng) -> String {
        let other = r.random_range(1..=self.users.max(2));
        let other = if other == n {
            other % self.users.max(2) + 1
        } else {
            other
        };
        format!("u-{other}")
    }

    /// User `n`'s calls in the window, newest first.
    pub fn calls(&self, n: u64, start: Option<&Timestamp>, end: Option<&Timestamp>) -> Vec<Call> {
        let mut r = rng(n, 6);
        let count = r.random_range(0..=30);
        times(&mut r, count, 90)
            .into_iter()
            .enumerate()
            .map(|(i, t)| Call {
                call_id: format!("call-{n}-{i}"),
                counterparty_id: self.counterparty(n, &mut r),
                outbound: r.random_bool(0.5),
                started_at: ts(t),
                duration_seconds: r.random_range(5..3600),
            })
            .filter(|c| in_window(c.started_at.map_or(0, |t| t.seconds), start, end))
            .collect()
    }

    /// User `n`'s e-mails in the window, newest first.
    pub fn emails(&self, n: u64, start: Option<&Timestamp>, end: Option<&Timestamp>) -> Vec<Email> {
        let mut r = rng(n, 7);
        let count = r.random_range(0..=30);
        times(&mut r, count, 90)
            .into_iter()
            .enumerate()
            .map(|(i, t)| Email {
                email_id: format!("email-{n}-{i}"),
                counterparty_id: self.counterparty(n, &mut r),
                outbound: r.random_bool(0.5),
                sent_at: ts(t),
                subject: SUBJECTS[r.random_range(0..SUBJECTS.len())].into(),
            })
            .filter(|e| in_window(e.sent_at.map_or(0, |t| t.seconds), start, end))
            .collect()
    }

    /// User `n`'s SMS messages in the window, newest first.
    pub fn sms(&self, n: u64, start: Option<&Timestamp>, end: Option<&Timestamp>) -> Vec<Sms> {
        let mut r = rng(n, 8);
        let count = r.random_range(0..=40);
        times(&mut r, count, 90)
            .into_iter()
            .enumerate()
            .map(|(i, t)| Sms {
                sms_id: format!("sms-{n}-{i}"),
                counterparty_id: self.counterparty(n, &mut r),
                outbound: r.random_bool(0.5),
                sent_at: ts(t),
                text: TEXTS[r.random_range(0..TEXTS.len())].into(),
            })
            .filter(|s| in_window(s.sent_at.map_or(0, |t| t.seconds), start, end))
            .collect()
    }

    /// The directory entry of user `id`, if the user exists.
    pub fn contact(&self, id: &str) -> Option<Contact> {
        let n = self.user(id)?;
        let (first, last) = name(n, 9);
        Some(Contact {
            user_id: id.to_string(),
            display_name: format!("{first} {last}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Dataset = Dataset {
        customers: 100,
        users: 100,
    };

    #[test]
    fn ids_outside_the_dataset_do_not_exist() {
        assert_eq!(D.customer("c-1"), Some(1));
        assert_eq!(D.customer("c-100"), Some(100));
        for bad in ["c-0", "c-101", "u-1", "c-", "c-x", "c--1"] {
            assert_eq!(D.customer(bad), None, "{bad}");
        }
        assert!(D.contact("u-7").is_some());
        assert!(D.contact("u-101").is_none());
    }

    #[test]
    fn data_is_deterministic_and_newest_first() {
        assert_eq!(D.orders(42), D.orders(42));
        assert_eq!(D.calls(7, None, None), D.calls(7, None, None));
        let calls = D.calls(7, None, None);
        let secs = |c: &Call| c.started_at.map_or(0, |t| t.seconds);
        assert!(calls.windows(2).all(|w| secs(&w[0]) >= secs(&w[1])));
        assert!(calls.iter().all(|c| c.counterparty_id != "u-7"));
    }

    #[test]
    fn window_filters_records() {
        let all = (1..=20).flat_map(|n| D.sms(n, None, None)).count();
        let start = Timestamp {
            seconds: EPOCH - 30 * DAY,
            nanos: 0,
        };
        let recent = (1..=20).flat_map(|n| D.sms(n, Some(&start), None)).count();
        assert!(recent > 0 && recent < all, "{recent} of {all}");
    }
}
