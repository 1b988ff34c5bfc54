//! Latency-aware balancing as Linkerd and Finagle do it: power of two
//! choices over a cost of peak-EWMA latency × (in flight + 1).
//!
//! The estimate itself lives in each backend's state (it survives reloads
//! and is fed by the retry loop with the time to the response head); see
//! `BackendState::record_latency`. It jumps to a slow sample at once, moves
//! toward faster ones with time constant `decay`, and decays toward zero
//! while the backend gets no samples, so a backend that was slow and is
//! avoided is tried again after a few decay periods (from 150 ms to below
//! 1 ms takes ln 150 ≈ 5 periods).
//!
//! Two distinct weighted-random candidates are drawn; the lower cost per
//! unit of weight wins. A backend without samples yet wins (it is explored
//! once); two such compare by in-flight requests.
//!
//! Both estimates decay by the same factor from a common "now", so they
//! compare without reading the clock: a·e^(−(now−tₐ)/τ) < b·e^(−(now−t_b)/τ)
//! ⟺ a < b·e^((t_b−tₐ)/τ). One `exp` per pick, no clock read.

use std::time::Duration;

use super::{less_loaded, Backend, Fallback, Pick, Selector, WeightedDraw, FAST_TRIES};
use crate::core::state::Clock;

#[derive(Debug)]
pub struct PeakEwma {
    /// Candidate source, proportional to weight.
    draw: WeightedDraw,
    /// Time constant of the estimate (`peak_ewma.decay`).
    decay: Duration,
    /// The state table's clock, read only on the slow path.
    clock: Clock,
    /// Slow path once the fast path keeps landing on ineligible backends.
    fallback: Fallback,
}

impl PeakEwma {
    pub fn build(backends: &[Backend], decay: Duration, clock: Clock) -> Self {
        PeakEwma {
            draw: WeightedDraw::build(backends),
            decay,
            clock,
            fallback: Fallback::default(),
        }
    }

    /// Expected wait per unit of weight if `b` got the next request.
    fn cost(&self, b: &Backend, now_ms: u64) -> f64 {
        let latency = b.state.latency_estimate_ns(now_ms, self.decay) + 1.0;
        latency * load(b)
    }

    /// Whether `b` costs less than `a` now.
    fn cheaper(&self, b: &Backend, a: &Backend) -> bool {
        let ((ea, ta), (eb, tb)) = (a.state.latency_sample(), b.state.latency_sample());
        match (ea == 0.0, eb == 0.0) {
            (true, true) => less_loaded(b, a),
            (true, false) => false,
            (false, true) => true,
            (false, false) => {
                let tau_ms = self.decay.as_secs_f64() * 1000.0;
                let a_now = ea * ((ta as f64 - tb as f64) / tau_ms).exp();
                eb * load(b) < a_now * load(a)
            }
        }
    }

    /// A second candidate other than `a` (when the pool has one): another
    /// draw, or after a few equal draws (a pool of two), the next weighted
    /// backend.
    fn other_than(&self, a: usize, backends: &[Backend]) -> Option<usize> {
        (0..4)
            .filter_map(|_| self.draw.draw())
            .find(|&b| b != a)
            .or_else(|| {
                let n = backends.len();
                (a + 1..n).chain(0..a).find(|&i| backends[i].weight > 0)
            })
    }
}

/// (in flight + 1) per unit of weight.
fn load(b: &Backend) -> f64 {
    f64::from(b.state.in_flight() + 1) / f64::from(b.weight.max(1))
}

impl Selector for PeakEwma {
    fn select(&self, backends: &[Backend], pick: &Pick<'_>) -> Option<usize> {
        let eligible = pick.eligible;
        for _ in 0..FAST_TRIES {
            let a = self.draw.draw()?;
            let b = self.other_than(a, backends).unwrap_or(a);
            match (eligible(a), b != a && eligible(b)) {
                (true, true) => {
                    let pick_b = self.cheaper(&backends[b], &backends[a]);
                    return Some(if pick_b { b } else { a });
                }
                (true, false) => return Some(a),
                (false, true) => return Some(b),
                (false, false) => {}
            }
        }
        let now = self.clock.now_ms();
        self.fallback
            .candidates(backends, eligible)
            .min_by(|&x, &y| {
                self.cost(&backends[x], now)
                    .total_cmp(&self.cost(&backends[y], now))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::selection::testing::{pool, ANY};

    #[tokio::test(start_paused = true)]
    async fn avoids_the_slow_backend_until_its_estimate_decays() {
        let b = pool(&[1, 1, 1]);
        let decay = Duration::from_secs(2);
        let p = PeakEwma::build(&b, decay, Clock::new());
        let ms = Duration::from_millis;
        b[0].state.record_latency(ms(150), decay);
        b[1].state.record_latency(ms(1), decay);
        b[2].state.record_latency(ms(1), decay);
        let slow = (0..1000).filter(|_| p.select(&b, &ANY) == Some(0)).count();
        assert_eq!(slow, 0);
        // Nobody picks it; after ln(150) ≈ 5 periods it costs less than 1 ms.
        tokio::time::advance(decay * 6).await;
        b[1].state.record_latency(ms(1), decay);
        b[2].state.record_latency(ms(1), decay);
        let slow = (0..1000).filter(|_| p.select(&b, &ANY) == Some(0)).count();
        assert!(slow > 400, "{slow}");
    }

    #[test]
    fn in_flight_counts_when_latencies_are_equal() {
        let b = pool(&[1, 1]);
        let p = PeakEwma::build(&b, Duration::from_secs(10), Clock::new());
        let _busy: Vec<_> = (0..3).map(|_| b[0].state.start()).collect();
        for _ in 0..100 {
            assert_eq!(p.select(&b, &ANY), Some(1));
        }
        assert_eq!(p.select(&b, &Pick::any(&|i| i == 0)), Some(0));
    }
}
