//! Load-balancing strategies.
//!
//! A strategy is a [`Selector`]: built once from the backend list when a
//! config is applied, then asked for one backend per attempt. The caller says
//! which backends are acceptable (healthy, not ejected, not already tried by
//! this request) through `eligible`, so the retry loop simply asks again.
//!
//! Every `select` is lock-free and O(1) or O(log n) in the pool size on its
//! fast path; only when the fast path keeps landing on ineligible backends
//! (most of the pool down) does it fall back to one O(n) scan.
//! Backends with weight 0 are never selected.

mod least_connections;
mod random;
mod round_robin;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use crate::config::{BackendAddr, Strategy};
use crate::state::BackendState;

pub use least_connections::LeastConnections;
pub use random::{PowerOfTwoChoices, WeightedRandom};
pub use round_robin::SmoothRoundRobin;

/// One pool member as the selectors see it.
#[derive(Debug, Clone)]
pub struct Backend {
    pub addr: BackendAddr,
    /// Configured weight; 0 means no new requests.
    pub weight: u32,
    /// Runtime state shared with every snapshot that lists this address.
    pub state: Arc<BackendState>,
}

/// A load-balancing strategy over a fixed backend list.
pub trait Selector: Send + Sync + std::fmt::Debug {
    /// Index into `backends` of the next backend to try, or `None` when no
    /// backend with a non-zero weight is `eligible`. `backends` is the list
    /// the selector was built from.
    fn select(&self, backends: &[Backend], eligible: &dyn Fn(usize) -> bool) -> Option<usize>;
}

/// Builds the selector for `strategy` over `backends`.
pub fn build(strategy: Strategy, backends: &[Backend]) -> Box<dyn Selector> {
    match strategy {
        Strategy::RoundRobin => Box::new(SmoothRoundRobin::build(backends)),
        Strategy::LeastConnections => Box::new(LeastConnections::build(backends)),
        Strategy::Random => Box::new(WeightedRandom::build(backends)),
        Strategy::PowerOfTwoChoices => Box::new(PowerOfTwoChoices::build(backends)),
    }
}

/// How many fast-path candidates a selector tries before scanning.
const FAST_TRIES: usize = 8;

/// The slow path shared by all strategies: the first eligible, weighted
/// backend at or after a rotating start, so a mostly-down pool still spreads
/// its load over the survivors.
#[derive(Debug, Default)]
struct Fallback {
    /// Rotates the scan's starting point between calls.
    next_start: AtomicUsize,
}

impl Fallback {
    /// All indexes `0..n`, starting one further along at each call.
    fn rotation(&self, n: usize) -> impl Iterator<Item = usize> {
        let start = self
            .next_start
            .fetch_add(1, Relaxed)
            .checked_rem(n)
            .unwrap_or(0);
        (start..n).chain(0..start)
    }

    /// Eligible, weighted candidates in rotation order.
    fn candidates<'a>(
        &self,
        backends: &'a [Backend],
        eligible: &'a dyn Fn(usize) -> bool,
    ) -> impl Iterator<Item = usize> + 'a {
        self.rotation(backends.len())
            .filter(move |&i| backends[i].weight > 0 && eligible(i))
    }

    fn scan(&self, backends: &[Backend], eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
        self.candidates(backends, eligible).next()
    }
}

/// Compares load per unit of weight without dividing: is `a` less loaded than `b`?
fn less_loaded(a: &Backend, b: &Backend) -> bool {
    u64::from(a.state.in_flight()) * u64::from(b.weight)
        < u64::from(b.state.in_flight()) * u64::from(a.weight)
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::config::BackendAddr;

    pub fn pool(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                let addr = BackendAddr::from_static(Box::leak(format!("b{i}:1").into_boxed_str()));
                Backend {
                    state: Arc::new(BackendState::new(addr.clone())),
                    addr,
                    weight,
                }
            })
            .collect()
    }

    pub fn all(_: usize) -> bool {
        true
    }
}
