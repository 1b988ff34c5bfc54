//! The retry budget: retries capped to a share of recent traffic, kept per
//! pool across reloads.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::config::RetryBudgetConfig;
use crate::core::state::Clock;

/// Caps retries to a share of recent traffic (Envoy and Linkerd call this
/// a retry budget), lock-free:
/// * each original request deposits `ratio` tokens into a balance capped at
///   ten seconds' worth, and a retry may spend a whole token;
/// * independently, `min_retries_per_second` retries are allowed in every
///   clock second, so a freshly started or quiet proxy can still retry.
#[derive(Debug)]
pub struct RetryBudget {
    clock: Clock,
    /// Ratio balance, in thousandths of a retry.
    milli_tokens: AtomicI64,
    /// The clock second `floor_used` counts for.
    floor_second: AtomicU64,
    /// Retries taken from the per-second floor in `floor_second`.
    floor_used: AtomicU64,
}

/// Seconds of ratio deposits the balance may bank: bounds a burst of retries
/// after a long healthy spell.
const BUDGET_WINDOW_SECS: i64 = 10;

impl RetryBudget {
    pub fn new(clock: Clock) -> Self {
        RetryBudget {
            clock,
            milli_tokens: AtomicI64::new(0),
            floor_second: AtomicU64::new(0),
            floor_used: AtomicU64::new(0),
        }
    }

    /// Credits one original request.
    pub fn deposit(&self, cfg: &RetryBudgetConfig) {
        let add = (cfg.ratio * 1000.0) as i64;
        // Enough for ten seconds of the floor, and never less than 100 retries.
        let cap = 1000 * BUDGET_WINDOW_SECS * i64::from(cfg.min_retries_per_second.max(10));
        let _ = self
            .milli_tokens
            .fetch_update(Relaxed, Relaxed, |t| (t < cap).then(|| (t + add).min(cap)));
    }

    /// Takes one retry from the per-second floor or the ratio balance.
    pub fn try_withdraw(&self, cfg: &RetryBudgetConfig) -> bool {
        let second = self.clock.now_ms() / 1000;
        let seen = self.floor_second.load(Relaxed);
        if seen != second
            && self
                .floor_second
                .compare_exchange(seen, second, Relaxed, Relaxed)
                .is_ok()
        {
            self.floor_used.store(0, Relaxed);
        }
        if self.floor_used.fetch_add(1, Relaxed) < u64::from(cfg.min_retries_per_second) {
            return true;
        }
        self.milli_tokens
            .fetch_update(Relaxed, Relaxed, |t| (t >= 1000).then_some(t - 1000))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn budget_allows_the_floor_each_second_plus_the_ratio() {
        let budget = RetryBudget::new(Clock::new());
        let cfg = RetryBudgetConfig {
            ratio: 0.5,
            min_retries_per_second: 2,
        };
        // A fresh proxy can retry at once, up to the floor.
        assert!(budget.try_withdraw(&cfg));
        assert!(budget.try_withdraw(&cfg));
        assert!(!budget.try_withdraw(&cfg));
        // Four requests earn two retries.
        for _ in 0..4 {
            budget.deposit(&cfg);
        }
        assert!(budget.try_withdraw(&cfg));
        assert!(budget.try_withdraw(&cfg));
        assert!(!budget.try_withdraw(&cfg));
        // The next second brings the floor back.
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert!(budget.try_withdraw(&cfg));
    }
}
