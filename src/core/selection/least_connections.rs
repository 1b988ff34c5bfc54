//! Least connections: the backend with the fewest in-flight requests per unit
//! of weight.
//!
//! Pools up to [`EXACT_LIMIT`] backends are scanned whole (exact, and a scan
//! of a few dozen atomics is cheaper than any index). Ties go to whoever comes
//! first from a rotating start, so an idle pool is still shared round-robin
//! rather than always hitting the first backend (as nginx does). Larger pools
//! compare [`SAMPLES`] weighted-random candidates instead, as Envoy's
//! LEAST_REQUEST does, which keeps selection O(log n) at 10,000 backends.

use super::random::WeightedRandom;
use super::{less_loaded, Backend, Fallback, Pick, Selector};

/// Largest pool scanned exhaustively.
pub const EXACT_LIMIT: usize = 64;
/// Candidates compared per pick in larger pools.
const SAMPLES: usize = 8;

#[derive(Debug)]
pub struct LeastConnections {
    /// Candidate source for large pools.
    sampler: Option<WeightedRandom>,
    /// Slow path once the fast path keeps landing on ineligible backends.
    fallback: Fallback,
}

impl LeastConnections {
    pub fn build(backends: &[Backend]) -> Self {
        LeastConnections {
            sampler: (backends.len() > EXACT_LIMIT).then(|| WeightedRandom::build(backends)),
            fallback: Fallback::default(),
        }
    }
}

impl Selector for LeastConnections {
    fn select(&self, backends: &[Backend], pick: &Pick<'_>) -> Option<usize> {
        let eligible = pick.eligible;
        let better = |best: Option<usize>, i: usize| match best {
            Some(b) if !less_loaded(&backends[i], &backends[b]) => Some(b),
            _ => Some(i),
        };
        if let Some(sampler) = &self.sampler {
            let best = (0..SAMPLES)
                .filter_map(|_| sampler.select(backends, pick))
                .fold(None, better);
            return best.or_else(|| self.fallback.scan(backends, eligible));
        }
        // Exact: the least loaded of all, ties to the first in rotation.
        self.fallback
            .candidates(backends, eligible)
            .fold(None, better)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::selection::testing::{pool, ANY};

    #[test]
    fn picks_least_loaded_per_weight() {
        let b = pool(&[1, 2, 1]);
        let _g: Vec<_> = [0, 0, 1, 1, 1, 2, 2]
            .iter()
            .map(|&i| b[i].state.start())
            .collect();
        // loads: 2/1, 3/2, 2/1 → index 1.
        let lc = LeastConnections::build(&b);
        for _ in 0..5 {
            assert_eq!(lc.select(&b, &ANY), Some(1));
        }
    }

    #[test]
    fn idle_pool_rotates() {
        let b = pool(&[1, 1, 1]);
        let lc = LeastConnections::build(&b);
        let picks: Vec<_> = (0..3).map(|_| lc.select(&b, &ANY).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2]);
    }

    #[test]
    fn large_pool_avoids_loaded() {
        let b = pool(&vec![1; 1000]);
        let _g: Vec<_> = (0..500).map(|i| b[i].state.start()).collect();
        let lc = LeastConnections::build(&b);
        let loaded = (0..1000)
            .filter(|_| lc.select(&b, &ANY).unwrap() < 500)
            .count();
        assert!(loaded < 20, "{loaded}");
    }
}
