//! Consistent hashing with Google's Maglev table (Eisenbud et al., NSDI 2016),
//! weighted as Envoy weights it.
//!
//! Each weighted backend owns a pseudo-random permutation of the table's M
//! slots, derived only from its address ([`hash::stable`] with two seeds), and
//! backends take turns claiming their next free slot until the table is full;
//! a backend of weight w takes a turn in w of every `max weight` rounds. A
//! key is served by `table[key mod M]`: one division and one load, O(1).
//!
//! * Turns go in address order, not file order, and nothing is random: the
//!   table depends only on the set of (address, weight) pairs, so every
//!   replica reading the same config builds the same table.
//! * M is a prime at least 100 × the pool (65,537 at minimum): with that
//!   many slots per backend the shares stay within a few percent of the
//!   weights, and removing one backend moves little beyond its own keys.
//! * A key whose backend is not eligible goes to the next slots of the
//!   table, which belong to other backends in no particular order, so a
//!   failed backend's keys spread over the rest; when it recovers the same
//!   lookup finds it again.
//! * A request without a key is served by smooth round robin.
//!
//! The table is built when the pool changes (see [`super::same_build`]):
//! 10,000 backends take tens of milliseconds, off the request path.

use super::hash;
use super::round_robin::SmoothRoundRobin;
use super::{Backend, Pick, Selector};

/// Slots tried after the key's own before scanning the pool.
const WALK: usize = 32;
/// Fewest slots in a table.
const MIN_TABLE: u64 = 65_537;
/// Slots per weighted backend aimed for.
const SLOTS_PER_BACKEND: u64 = 100;
/// Most slots in a table (4 bytes each), reached above 50,000 backends.
const MAX_TABLE: u64 = 5_000_011;

/// Seeds of a backend's permutation: where it starts and how it steps.
const OFFSET_SEED: u64 = 0x6d61_676c_6576_0001;
const SKIP_SEED: u64 = 0x6d61_676c_6576_0002;

#[derive(Debug)]
pub struct Maglev {
    /// Slot → backend index; length M (prime).
    table: Box<[u32]>,
    /// For requests without a key.
    keyless: SmoothRoundRobin,
}

impl Maglev {
    pub fn build(backends: &[Backend]) -> Self {
        Maglev {
            table: populate(backends).into_boxed_slice(),
            keyless: SmoothRoundRobin::build(backends),
        }
    }

    /// Number of slots (M).
    pub fn table_len(&self) -> usize {
        self.table.len()
    }
}

fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

fn table_size(weighted: usize) -> u64 {
    let mut m = (weighted as u64 * SLOTS_PER_BACKEND).clamp(MIN_TABLE, MAX_TABLE);
    while !is_prime(m) {
        m += 1;
    }
    m
}

/// Maglev's population loop with Envoy's weighting.
fn populate(backends: &[Backend]) -> Vec<u32> {
    struct Entry {
        /// The backend's index in the pool.
        index: u32,
        /// Its weight: it takes a turn in `weight` of every `max_weight` rounds.
        weight: u64,
        /// Position of this backend's permutation, (offset + skip·k) mod M.
        next: u64,
        /// Step of the permutation, in 1..M (M is prime, so every slot is reached).
        skip: u64,
        /// Round at which this backend takes its next turn, × max weight.
        due: u64,
    }
    impl Entry {
        /// Next position of the permutation; both terms are below M, so a
        /// subtraction replaces the division (the build's hot loop).
        fn step(&mut self, m: u64) {
            self.next += self.skip;
            if self.next >= m {
                self.next -= m;
            }
        }
    }
    let mut order: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].weight > 0)
        .collect();
    if order.is_empty() {
        return Vec::new();
    }
    order.sort_by(|&a, &b| backends[a].addr.cmp(&backends[b].addr));
    let m = table_size(order.len());
    let max_weight = order
        .iter()
        .map(|&i| u64::from(backends[i].weight))
        .max()
        .unwrap_or(1);
    let mut entries: Vec<Entry> = order
        .iter()
        .map(|&i| {
            let addr = backends[i].addr.as_str().as_bytes();
            Entry {
                index: i as u32,
                weight: u64::from(backends[i].weight),
                next: hash::stable(addr, OFFSET_SEED) % m,
                skip: hash::stable(addr, SKIP_SEED) % (m - 1) + 1,
                due: 0,
            }
        })
        .collect();
    const EMPTY: u32 = u32::MAX;
    let mut table = vec![EMPTY; m as usize];
    let mut filled = 0u64;
    let mut round = 1u64;
    while filled < m {
        for e in entries.iter_mut() {
            if round * e.weight < e.due {
                continue;
            }
            e.due += max_weight;
            while table[e.next as usize] != EMPTY {
                e.step(m);
            }
            table[e.next as usize] = e.index;
            e.step(m);
            filled += 1;
            if filled == m {
                break;
            }
        }
        round += 1;
    }
    table
}

impl Selector for Maglev {
    fn select(&self, backends: &[Backend], pick: &Pick<'_>) -> Option<usize> {
        let Some(key) = pick.key else {
            return self.keyless.select(backends, pick);
        };
        let m = self.table.len();
        if m == 0 {
            return None;
        }
        let slot = (key % m as u64) as usize;
        for step in 0..WALK.min(m) {
            let i = self.table[(slot + step) % m] as usize;
            if (pick.eligible)(i) {
                return Some(i);
            }
        }
        // Most of the pool is down: the first eligible backend from a point
        // the key decides, so the same key still lands in the same place.
        let n = backends.len();
        let start = (hash::mix(key) % n as u64) as usize;
        (start..n)
            .chain(0..start)
            .find(|&i| backends[i].weight > 0 && (pick.eligible)(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::selection::testing::pool;

    fn key(i: u64) -> u64 {
        hash::stable(format!("user-{i}").as_bytes(), 0)
    }

    fn owner(m: &Maglev, b: &[Backend], k: u64) -> usize {
        m.select(
            b,
            &Pick {
                key: Some(k),
                eligible: &|_| true,
            },
        )
        .unwrap()
    }

    #[test]
    fn spread_follows_weights() {
        let b = pool(&[1, 2, 3, 0, 4]);
        let m = Maglev::build(&b);
        assert!(is_prime(m.table_len() as u64));
        let mut slots = [0usize; 5];
        for &i in m.table.iter() {
            slots[i as usize] += 1;
        }
        assert_eq!(slots[3], 0);
        for (i, w) in [(0, 1.0), (1, 2.0), (2, 3.0), (4, 4.0)] {
            let share = slots[i] as f64 / m.table_len() as f64;
            assert!((share / (w / 10.0) - 1.0).abs() < 0.02, "{i}: {share}");
        }
        let mut keys = [0usize; 5];
        for k in 0..100_000 {
            keys[owner(&m, &b, key(k))] += 1;
        }
        for (i, w) in [(0, 1.0), (1, 2.0), (2, 3.0), (4, 4.0)] {
            let share = keys[i] as f64 / 100_000.0;
            assert!((share / (w / 10.0) - 1.0).abs() < 0.05, "{i}: {share}");
        }
    }

    #[test]
    fn removing_one_moves_only_its_keys() {
        let b = pool(&[1; 10]);
        let before = Maglev::build(&b);
        let fewer: Vec<Backend> = b
            .iter()
            .filter(|x| x.addr.as_str() != "b3:1")
            .cloned()
            .collect();
        let after = Maglev::build(&fewer);
        let (mut stayed, mut others) = (0, 0);
        for k in 0..20_000 {
            let was = &b[owner(&before, &b, key(k))].addr;
            if was.as_str() == "b3:1" {
                continue;
            }
            others += 1;
            if &fewer[owner(&after, &fewer, key(k))].addr == was {
                stayed += 1;
            }
        }
        assert!(stayed as f64 / others as f64 >= 0.97, "{stayed}/{others}");
    }

    #[test]
    fn order_of_the_list_does_not_matter() {
        let b = pool(&[1, 2, 3]);
        let rev: Vec<Backend> = b.iter().rev().cloned().collect();
        let (m1, m2) = (Maglev::build(&b), Maglev::build(&rev));
        for k in 0..1000 {
            assert_eq!(
                b[owner(&m1, &b, key(k))].addr,
                rev[owner(&m2, &rev, key(k))].addr
            );
        }
    }

    #[test]
    fn unavailable_backend_sends_its_keys_elsewhere_and_gets_them_back() {
        let b = pool(&[1, 1, 1]);
        let m = Maglev::build(&b);
        let keys: Vec<u64> = (0..300).map(key).collect();
        let home: Vec<usize> = keys.iter().map(|&k| owner(&m, &b, k)).collect();
        let down = |i: usize| i != 1;
        for (&k, &h) in keys.iter().zip(&home) {
            let p = Pick {
                key: Some(k),
                eligible: &down,
            };
            let now = m.select(&b, &p).unwrap();
            assert_ne!(now, 1);
            if h != 1 {
                assert_eq!(now, h);
            }
            assert_eq!(m.select(&b, &p), Some(now));
        }
        for (&k, &h) in keys.iter().zip(&home) {
            assert_eq!(owner(&m, &b, k), h);
        }
        let none = Pick {
            key: Some(keys[0]),
            eligible: &|_| false,
        };
        assert_eq!(m.select(&b, &none), None);
    }

    #[test]
    fn keyless_requests_rotate() {
        let b = pool(&[1, 1, 1]);
        let m = Maglev::build(&b);
        let picks: Vec<_> = (0..6)
            .map(|_| m.select(&b, &crate::core::selection::testing::ANY).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }
}
