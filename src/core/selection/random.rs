//! Weighted random and power-of-two-choices.
//!
//! Both draw from the weights with [`WeightedDraw`]: O(log n), lock-free
//! (fastrand's thread-local generator).

use super::{less_loaded, Backend, Fallback, Pick, Selector, WeightedDraw, FAST_TRIES};

#[derive(Debug)]
pub struct WeightedRandom {
    /// Candidate source, proportional to weight.
    draw: WeightedDraw,
    /// Slow path once the fast path keeps landing on ineligible backends.
    fallback: Fallback,
}

impl WeightedRandom {
    pub fn build(backends: &[Backend]) -> Self {
        WeightedRandom {
            draw: WeightedDraw::build(backends),
            fallback: Fallback::default(),
        }
    }
}

impl Selector for WeightedRandom {
    fn select(&self, backends: &[Backend], pick: &Pick<'_>) -> Option<usize> {
        let eligible = pick.eligible;
        for _ in 0..FAST_TRIES {
            let i = self.draw.draw()?;
            if eligible(i) {
                return Some(i);
            }
        }
        self.fallback.scan(backends, eligible)
    }
}

/// Two weighted-random candidates; the one with fewer in-flight requests per
/// unit of weight wins (Mitzenmacher's "power of two choices").
#[derive(Debug)]
pub struct PowerOfTwoChoices {
    /// Candidate source, proportional to weight.
    draw: WeightedDraw,
    /// Slow path once the fast path keeps landing on ineligible backends.
    fallback: Fallback,
}

impl PowerOfTwoChoices {
    pub fn build(backends: &[Backend]) -> Self {
        PowerOfTwoChoices {
            draw: WeightedDraw::build(backends),
            fallback: Fallback::default(),
        }
    }
}

impl Selector for PowerOfTwoChoices {
    fn select(&self, backends: &[Backend], pick: &Pick<'_>) -> Option<usize> {
        let eligible = pick.eligible;
        for _ in 0..FAST_TRIES {
            let a = self.draw.draw()?;
            let b = self.draw.draw()?;
            match (eligible(a), eligible(b)) {
                (true, true) if less_loaded(&backends[b], &backends[a]) => return Some(b),
                (true, _) => return Some(a),
                (false, true) => return Some(b),
                (false, false) => {}
            }
        }
        self.fallback.scan(backends, eligible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::selection::testing::{pool, ANY};

    #[test]
    fn weighted_random_follows_weights() {
        let b = pool(&[3, 1, 0]);
        let r = WeightedRandom::build(&b);
        let mut counts = [0u32; 3];
        for _ in 0..40_000 {
            counts[r.select(&b, &ANY).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0);
        let share = f64::from(counts[0]) / 40_000.0;
        assert!((0.72..0.78).contains(&share), "{counts:?}");
    }

    #[test]
    fn p2c_prefers_the_less_loaded() {
        let b = pool(&[1, 1]);
        let _busy: Vec<_> = (0..10).map(|_| b[0].state.start()).collect();
        let p = PowerOfTwoChoices::build(&b);
        let picks0 = (0..1000).filter(|_| p.select(&b, &ANY) == Some(0)).count();
        // Index 0 wins only when both draws land on it (~25 %).
        assert!(picks0 < 350, "{picks0}");
    }

    #[test]
    fn p2c_skips_ineligible() {
        let b = pool(&[1, 1, 1]);
        let p = PowerOfTwoChoices::build(&b);
        for _ in 0..100 {
            assert_eq!(p.select(&b, &Pick::any(&|i| i == 2)), Some(2));
        }
    }
}
