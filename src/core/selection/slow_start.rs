//! Slow start (Envoy's and HAProxy's `slowstart`): a backend that joined by a
//! reload, came back up after failing health checks, or whose passive
//! ejection just ended takes a share of its weight that grows linearly from
//! [`FLOOR`] to 1 over the window.
//!
//! It wraps any strategy instead of being one: a warming backend is admitted
//! as a candidate with probability equal to its current share, and when it is
//! turned away the strategy goes on to its next candidate exactly as for an
//! unavailable backend. With weighted random that is the same as scaling its
//! weight; with round robin, hashing and the load-aware strategies it is
//! close to it. For a request with a hash key the coin is the key's own hash,
//! not a random draw, so a key that has moved to the warming backend stays
//! there while the ramp grows. Backends of the startup config do not ramp.
//!
//! Cost when nobody is warming: one atomic load per candidate; the clock is
//! read only when a candidate has a ramp, and a ramp seen to be over is
//! cleared so it costs nothing afterwards.

use std::cell::Cell;
use std::time::Duration;

use super::hash;
use super::{Backend, Pick, Selector};
use crate::core::state::Clock;

/// Share of its weight a backend takes when its ramp starts (Envoy's
/// `min_weight_percent` default).
pub const FLOOR: f64 = 0.1;

#[derive(Debug)]
pub struct SlowStart {
    /// The configured strategy.
    inner: Box<dyn Selector>,
    /// Ramp length in ms (`slow_start`).
    window_ms: u64,
    /// The state table's clock, which stamps `ramp_start_ms`.
    clock: Clock,
}

impl SlowStart {
    pub fn wrap(inner: Box<dyn Selector>, window: Duration, clock: Clock) -> Self {
        SlowStart {
            inner,
            window_ms: (window.as_millis() as u64).max(1),
            clock,
        }
    }

    /// Share of its weight a backend whose ramp started at `start` gets at `now`.
    pub fn share(&self, start: u64, now: u64) -> f64 {
        let elapsed = now.saturating_sub(start);
        if start == 0 || elapsed >= self.window_ms {
            return 1.0;
        }
        FLOOR + (1.0 - FLOOR) * elapsed as f64 / self.window_ms as f64
    }
}

impl Selector for SlowStart {
    fn select(&self, backends: &[Backend], pick: &Pick<'_>) -> Option<usize> {
        // Read once, and only if some candidate is ramping (0 = not yet).
        let now = Cell::new(0u64);
        let admit = |i: usize| {
            if !(pick.eligible)(i) {
                return false;
            }
            let state = &backends[i].state;
            let start = state.ramp_start_ms();
            if start == 0 {
                return true;
            }
            if now.get() == 0 {
                now.set(self.clock.now_ms());
            }
            let share = self.share(start, now.get());
            if share >= 1.0 {
                state.ramp_over(start);
                return true;
            }
            let coin = match pick.key {
                Some(key) => hash::unit(hash::mix(key ^ hash::mix(i as u64 + 1))),
                None => fastrand::f64(),
            };
            coin < share
        };
        let warming = Pick {
            key: pick.key,
            eligible: &admit,
        };
        // If every candidate was turned away, anyone eligible beats nobody.
        self.inner
            .select(backends, &warming)
            .or_else(|| self.inner.select(backends, pick))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::selection::testing::{pool, ANY};
    use crate::core::selection::WeightedRandom;

    #[test]
    fn share_ramps_linearly_from_the_floor() {
        let s = SlowStart::wrap(
            Box::new(WeightedRandom::build(&pool(&[1]))),
            Duration::from_secs(10),
            Clock::new(),
        );
        assert_eq!(s.share(0, 5_000), 1.0);
        assert_eq!(s.share(1_000, 1_000), FLOOR);
        assert!((s.share(1_000, 6_000) - 0.55).abs() < 1e-9);
        assert_eq!(s.share(1_000, 11_000), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_recovered_backend_ramps_up() {
        let b = pool(&[1, 1]);
        let clock = Clock::new();
        let s = SlowStart::wrap(
            Box::new(WeightedRandom::build(&b)),
            Duration::from_secs(10),
            clock,
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        // BackendState::new uses its own clock; both start at the same paused instant.
        b[1].state.set_healthy(false);
        b[1].state.set_healthy(true);
        let share = |s: &SlowStart| {
            (0..20_000)
                .filter(|_| s.select(&b, &ANY) == Some(1))
                .count() as f64
                / 20_000.0
        };
        // Weight 0.1 against 1: about 9 %.
        let early = share(&s);
        assert!((0.06..0.13).contains(&early), "{early}");
        tokio::time::advance(Duration::from_secs(5)).await;
        let mid = share(&s);
        assert!((0.30..0.40).contains(&mid), "{mid}");
        tokio::time::advance(Duration::from_secs(5)).await;
        let full = share(&s);
        assert!((0.46..0.54).contains(&full), "{full}");
        // Seen to be over, the ramp is forgotten: picks skip the clock again.
        assert_eq!(b[1].state.ramp_start_ms(), 0);
    }
}
