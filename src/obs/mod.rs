//! What operators see, below the core so that every layer can count and
//! log: the metric families and per-backend counters ([`metrics`]; their
//! exposition, which reads the live pools, is the admin listener's), the
//! access log, lb's own log, and the classification of lb's own resource
//! shortages ([`local`]), so no path blames a backend for them.

pub mod access_log;
pub mod local;
pub mod logging;
pub mod metrics;
pub mod tls;
