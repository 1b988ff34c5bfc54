//! What DNS discovery found for each discovered pool: the backends its
//! name resolves to now, kept across reloads that leave the pool's
//! `discovery` as it was (no re-resolution burst on every save), and the
//! last resolution as operators see it on `/status` and `/metrics`.
//!
//! The resolving itself is `crate::discovery`'s; this is the data it hands
//! over, which a config's discovered pools are filled from.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use crate::config::discovery::Discovery;
use crate::config::{BackendConfig, Config, PoolName};

/// One pool's discovered backends, for the discovery that found them.
#[derive(Debug, Clone)]
struct Found {
    discovery: Discovery,
    backends: Vec<BackendConfig>,
}

/// The last resolution of a pool's name, for `/status`.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub at: SystemTime,
    /// `ok`, `empty` (NXDOMAIN, or no records), or the failure
    /// (`timeout`, `SERVFAIL`, …: the last good set kept serving).
    pub result: String,
    /// What the name resolved to last time it did: address and TTL (s).
    pub addresses: Vec<(String, u32)>,
    /// CPU time the last change of the set took to apply (ms).
    pub applied_cpu_ms: Option<f64>,
}

/// Per-pool counters of resolutions, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counts {
    pub ok: AtomicU64,
    pub empty: AtomicU64,
    pub failed: AtomicU64,
}

/// Every discovered pool's current set and last resolution.
#[derive(Debug, Default)]
pub struct Discovered {
    found: Mutex<HashMap<PoolName, Found>>,
    status: Mutex<HashMap<PoolName, (Resolution, Arc<Counts>)>>,
}

impl Discovered {
    /// `config` with each discovered pool's backends as last found, when
    /// they were found for the discovery it has (else none yet: 503 until
    /// the first resolution).
    pub fn fill(&self, mut config: Config) -> Config {
        let found = self.found.lock().unwrap_or_else(PoisonError::into_inner);
        for pool in &mut config.pools {
            let Some(discovery) = &pool.discovery else {
                continue;
            };
            if let Some(f) = found.get(&pool.name).filter(|f| &f.discovery == discovery) {
                if pool.backends != f.backends {
                    Arc::make_mut(pool).backends = f.backends.clone();
                }
            }
        }
        config
    }

    /// Keeps `backends` as what `discovery` of `pool` found. `false` when
    /// they are what was found last time (nothing to apply).
    pub fn store(
        &self,
        pool: &PoolName,
        discovery: &Discovery,
        backends: Vec<BackendConfig>,
    ) -> bool {
        let mut found = self.found.lock().unwrap_or_else(PoisonError::into_inner);
        if found
            .get(pool)
            .is_some_and(|f| &f.discovery == discovery && f.backends == backends)
        {
            return false;
        }
        found.insert(
            pool.clone(),
            Found {
                discovery: discovery.clone(),
                backends,
            },
        );
        true
    }

    /// Forgets pools `config` no longer discovers.
    pub fn retain(&self, config: &Config) {
        let keep = |name: &PoolName| {
            config
                .pool(name.as_str())
                .is_some_and(|p| p.discovery.is_some())
        };
        self.found
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|name, _| keep(name));
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|name, _| keep(name));
    }

    /// Records a resolution of `pool`'s name; `addresses` is `None` when it
    /// failed (the last good ones are kept).
    pub fn record(&self, pool: &PoolName, result: String, addresses: Option<Vec<(String, u32)>>) {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = status.entry(pool.clone()).or_insert_with(|| {
            (
                Resolution {
                    at: SystemTime::now(),
                    result: String::new(),
                    addresses: Vec::new(),
                    applied_cpu_ms: None,
                },
                Arc::default(),
            )
        });
        entry.0.at = SystemTime::now();
        entry.0.result = result;
        if let Some(addresses) = addresses {
            entry.0.addresses = addresses;
        }
    }

    /// How long (CPU ms) the last change of `pool`'s set took to apply.
    pub fn applied_in(&self, pool: &PoolName, cpu_ms: f64) {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((r, _)) = status.get_mut(pool) {
            r.applied_cpu_ms = Some(cpu_ms);
        }
    }

    /// The counters of `pool`'s resolutions.
    pub fn counts(&self, pool: &PoolName) -> Arc<Counts> {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            &status
                .entry(pool.clone())
                .or_insert_with(|| {
                    (
                        Resolution {
                            at: SystemTime::now(),
                            result: "pending".to_owned(),
                            addresses: Vec::new(),
                            applied_cpu_ms: None,
                        },
                        Arc::default(),
                    )
                })
                .1,
        )
    }

    /// Every discovered pool's last resolution and counters.
    pub fn status(&self) -> Vec<(PoolName, Resolution, Arc<Counts>)> {
        let status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<_> = status
            .iter()
            .map(|(name, (r, c))| (name.clone(), r.clone(), Arc::clone(c)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}
