//! Smooth weighted round robin, nginx's algorithm: weights 5, 1, 1 give
//! `a a b a c a a`, never `a a a a a b c`.
//!
//! nginx walks every peer on every pick under a lock (O(n)). The sequence only
//! depends on the weights, so it is computed once at build time into a
//! schedule of length Σw/gcd, and a request takes the next slot with one
//! atomic increment: O(1) and lock-free. Weights are capped at 256, so the
//! schedule of a 10,000-backend pool is at most 2.56 M slots (10 MiB).
//!
//! For pools where nginx's O(n·Σw) construction would be slow, the schedule is
//! built in O(Σw·log n) by earliest-deadline-first (slot k of backend i is due
//! at (k + ½)/wᵢ), which has the same proportions and smoothness but may
//! order ties differently.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::{Backend, Fallback, Pick, Selector, FAST_TRIES};

/// Above this many inner-loop steps (n·Σw) the EDF construction is used.
const EXACT_BUILD_LIMIT: u64 = 4_000_000;

#[derive(Debug)]
pub struct SmoothRoundRobin {
    /// Backend indexes in serving order; one cycle of the smooth sequence.
    schedule: Box<[u32]>,
    /// Next slot of `schedule` (mod its length), shared by all requests.
    cursor: AtomicUsize,
    /// Slow path once the fast path keeps landing on ineligible backends.
    fallback: Fallback,
}

impl SmoothRoundRobin {
    pub fn build(backends: &[Backend]) -> Self {
        let weights: Vec<u64> = backends.iter().map(|b| u64::from(b.weight)).collect();
        let g = weights.iter().copied().fold(0, gcd).max(1);
        let weights: Vec<u64> = weights.iter().map(|w| w / g).collect();
        let total: u64 = weights.iter().sum();
        let schedule = if total * weights.len() as u64 <= EXACT_BUILD_LIMIT {
            nginx_schedule(&weights, total)
        } else {
            edf_schedule(&weights, total)
        };
        SmoothRoundRobin {
            schedule: schedule.into_boxed_slice(),
            cursor: AtomicUsize::new(0),
            fallback: Fallback::default(),
        }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// nginx's `ngx_http_upstream_get_peer`, run for one full cycle.
fn nginx_schedule(weights: &[u64], total: u64) -> Vec<u32> {
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best: Option<usize> = None;
        for (i, &w) in weights.iter().enumerate() {
            if w == 0 {
                continue;
            }
            current[i] += w as i64;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let Some(b) = best else { break };
        current[b] -= total as i64;
        out.push(b as u32);
    }
    out
}

/// Earliest-deadline-first: same counts per cycle, O(Σw·log n).
fn edf_schedule(weights: &[u64], total: u64) -> Vec<u32> {
    // Deadline of slot k of backend i is (2k+1)/(2wᵢ); compare as fractions.
    #[derive(PartialEq, Eq)]
    struct Due {
        num: u64,
        weight: u64,
        index: u32,
    }
    impl Ord for Due {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            (u128::from(self.num) * u128::from(o.weight))
                .cmp(&(u128::from(o.num) * u128::from(self.weight)))
                .then(self.index.cmp(&o.index))
        }
    }
    impl PartialOrd for Due {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    let mut heap: BinaryHeap<Reverse<Due>> = weights
        .iter()
        .enumerate()
        .filter(|(_, &w)| w > 0)
        .map(|(i, &w)| {
            Reverse(Due {
                num: 1,
                weight: w,
                index: i as u32,
            })
        })
        .collect();
    let mut out = Vec::with_capacity(total as usize);
    while out.len() < total as usize {
        let Some(Reverse(mut due)) = heap.pop() else {
            break;
        };
        out.push(due.index);
        due.num += 2;
        heap.push(Reverse(due));
    }
    out
}

impl Selector for SmoothRoundRobin {
    fn select(&self, backends: &[Backend], pick: &Pick<'_>) -> Option<usize> {
        let eligible = pick.eligible;
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        for _ in 0..FAST_TRIES.min(len) {
            let i = self.schedule[self.cursor.fetch_add(1, Relaxed) % len] as usize;
            if eligible(i) {
                return Some(i);
            }
        }
        self.fallback.scan(backends, eligible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::selection::testing::{pool, ANY};

    fn names(rr: &SmoothRoundRobin, b: &[Backend], n: usize) -> String {
        (0..n)
            .map(|_| (b'a' + rr.select(b, &ANY).unwrap() as u8) as char)
            .collect()
    }

    #[test]
    fn nginx_sequence_for_5_1_1() {
        let b = pool(&[5, 1, 1]);
        let rr = SmoothRoundRobin::build(&b);
        assert_eq!(names(&rr, &b, 14), "aabacaaaabacaa");
    }

    #[test]
    fn equal_weights_rotate_in_order() {
        let b = pool(&[1, 1, 1]);
        assert_eq!(names(&SmoothRoundRobin::build(&b), &b, 6), "abcabc");
        let b = pool(&[3, 3, 3]);
        assert_eq!(names(&SmoothRoundRobin::build(&b), &b, 6), "abcabc");
    }

    #[test]
    fn zero_weight_is_never_picked() {
        let b = pool(&[1, 0, 2]);
        let s = names(&SmoothRoundRobin::build(&b), &b, 30);
        assert!(!s.contains('b'));
        assert_eq!(s.matches('c').count(), 20);
    }

    #[test]
    fn skips_ineligible() {
        let b = pool(&[1, 1, 1]);
        let rr = SmoothRoundRobin::build(&b);
        for _ in 0..10 {
            assert_ne!(rr.select(&b, &Pick::any(&|i| i != 1)), Some(1));
        }
        assert_eq!(rr.select(&b, &Pick::any(&|_| false)), None);
    }

    #[test]
    fn edf_matches_proportions_and_is_smooth() {
        let w = [5u64, 1, 1];
        let s = edf_schedule(&w, 7);
        assert_eq!(s.iter().filter(|&&i| i == 0).count(), 5);
        // No backend of weight 1 appears twice in a row; a never runs more than 3.
        let big: Vec<u64> = (0..1000).map(|i| 1 + i % 7).collect();
        let total = big.iter().sum();
        let s = edf_schedule(&big, total);
        assert_eq!(s.len() as u64, total);
        for (i, &w) in big.iter().enumerate() {
            assert_eq!(s.iter().filter(|&&x| x as usize == i).count() as u64, w);
        }
    }
}
