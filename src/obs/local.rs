//! lb's own resource shortages: out of file descriptors (its
//! `RLIMIT_NOFILE`, or the system's table), kernel buffers or memory, or
//! local addresses and ports for outgoing connections.
//!
//! Such a failure says nothing about the backend lb was connecting to, the
//! client it was accepting or the config it was reading: [`Shortage::of`] is
//! the one classification every path asks (the HTTP/1 fast path, the hyper
//! client, tcp mode, health probes, accepting, the config poll). What it
//! recognises is never charged to a backend (no passive-health failure, no
//! `connect_failure`, no failed probe) nor counted as a rejected config: a
//! client gets 503 (nginx answers 500 and marks nothing), and the shortage
//! is counted in `lb_local_errors_total{op,kind}` and logged at most once
//! per [`LOG_EVERY_MS`] and op (a flood of failed connects does not hide a
//! failed config read), with how many went unlogged.

use std::error::Error as StdError;
use std::fmt::Display;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The body of lb's 503 when a request failed on one.
pub const EXHAUSTED_BODY: &str = "lb: 503 Service Unavailable (lb is out of local resources)\n";

/// One warning per this many milliseconds at most, whatever the rate.
pub const LOG_EVERY_MS: u64 = 10_000;

/// Which resource lb ran out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortage {
    /// `EMFILE`: lb's own file-descriptor limit (`RLIMIT_NOFILE`, `ulimit -n`).
    FdLimit,
    /// `ENFILE`: the system-wide file table.
    SystemFdLimit,
    /// `ENOBUFS`, `ENOMEM`: kernel buffers or memory.
    Buffers,
    /// `EADDRNOTAVAIL` on connect: no local port or address left.
    LocalAddress,
}

impl Shortage {
    pub const ALL: [Shortage; 4] = [
        Shortage::FdLimit,
        Shortage::SystemFdLimit,
        Shortage::Buffers,
        Shortage::LocalAddress,
    ];

    /// The shortage `e` reports, if it is one.
    pub fn of(e: &io::Error) -> Option<Shortage> {
        match e.raw_os_error()? {
            libc::EMFILE => Some(Shortage::FdLimit),
            libc::ENFILE => Some(Shortage::SystemFdLimit),
            libc::ENOBUFS | libc::ENOMEM => Some(Shortage::Buffers),
            libc::EADDRNOTAVAIL => Some(Shortage::LocalAddress),
            _ => None,
        }
    }

    /// [`Shortage::of`] the first `io::Error` in `err`'s chain (hyper's
    /// client wraps the connector's error).
    pub fn in_chain(err: &(dyn StdError + 'static)) -> Option<Shortage> {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                return Shortage::of(io);
            }
            cur = e.source();
        }
        None
    }

    /// The `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            Shortage::FdLimit => "fd_limit",
            Shortage::SystemFdLimit => "system_fd_limit",
            Shortage::Buffers => "no_buffers",
            Shortage::LocalAddress => "no_local_address",
        }
    }

    /// What the operator should look at.
    fn advice(self) -> &'static str {
        match self {
            Shortage::FdLimit => "lb's file-descriptor limit (raise ulimit -n / LimitNOFILE)",
            Shortage::SystemFdLimit => "the system's file table (fs.file-max)",
            Shortage::Buffers => "kernel buffers or memory",
            Shortage::LocalAddress => {
                "local ports for outgoing connections (net.ipv4.ip_local_port_range)"
            }
        }
    }
}

/// What lb was doing when it ran short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Connecting to a backend for a request (or a tcp-mode connection).
    Connect,
    /// Accepting a client connection.
    Accept,
    /// An active health probe.
    HealthCheck,
    /// Reading the config file (the poll, an event, SIGHUP).
    ConfigRead,
}

impl Op {
    pub const ALL: [Op; 4] = [Op::Connect, Op::Accept, Op::HealthCheck, Op::ConfigRead];

    /// The `op` label.
    pub fn label(self) -> &'static str {
        match self {
            Op::Connect => "connect",
            Op::Accept => "accept",
            Op::HealthCheck => "health_check",
            Op::ConfigRead => "config_read",
        }
    }
}

/// Shortages counted, by op and kind, and the state of the rate-limited log.
#[derive(Debug)]
pub struct LocalErrors {
    /// Indexed `[op as usize][shortage as usize]`.
    counts: [[AtomicU64; 4]; 4],
    /// By op: when (lb's clock, ms) its last warning was logged; `NEVER` before.
    last_logged_ms: [AtomicU64; 4],
    /// By op: shortages since that warning.
    unlogged: [AtomicU64; 4],
}

const NEVER: u64 = u64::MAX;

impl Default for LocalErrors {
    fn default() -> Self {
        LocalErrors {
            counts: Default::default(),
            last_logged_ms: std::array::from_fn(|_| AtomicU64::new(NEVER)),
            unlogged: Default::default(),
        }
    }
}

impl LocalErrors {
    /// Counts one shortage without logging (for a caller with its own
    /// rate-limited log line).
    pub fn count(&self, op: Op, shortage: Shortage) {
        self.counts[op as usize][shortage as usize].fetch_add(1, Relaxed);
    }

    /// Counts one shortage and warns about it, unless a warning went out in
    /// the last [`LOG_EVERY_MS`] (`now_ms` on lb's clock); `what` says what
    /// failed (`connecting to 10.0.0.1:80: Too many open files`).
    pub fn record(&self, op: Op, shortage: Shortage, now_ms: u64, what: impl Display) {
        self.count(op, shortage);
        let (last_logged, unlogged) = (
            &self.last_logged_ms[op as usize],
            &self.unlogged[op as usize],
        );
        let last = last_logged.load(Relaxed);
        let due = last == NEVER || now_ms.saturating_sub(last) >= LOG_EVERY_MS;
        if due
            && last_logged
                .compare_exchange(last, now_ms, Relaxed, Relaxed)
                .is_ok()
        {
            let earlier = unlogged.swap(0, Relaxed);
            tracing::warn!(
                op = op.label(),
                kind = shortage.label(),
                "{what}: lb is out of {} ({earlier} more such errors since the last report); no backend is blamed",
                shortage.advice()
            );
        } else {
            unlogged.fetch_add(1, Relaxed);
        }
    }

    /// Every (op, kind, count), zeros included.
    pub fn counts(&self) -> impl Iterator<Item = (Op, Shortage, u64)> + '_ {
        Op::ALL.into_iter().flat_map(move |op| {
            Shortage::ALL.into_iter().map(move |shortage| {
                (
                    op,
                    shortage,
                    self.counts[op as usize][shortage as usize].load(Relaxed),
                )
            })
        })
    }

    /// All shortages of `op` so far.
    pub fn total(&self, op: Op) -> u64 {
        self.counts[op as usize]
            .iter()
            .map(|n| n.load(Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_lbs_own_shortages_and_nothing_else() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(Shortage::of(&os(libc::EMFILE)), Some(Shortage::FdLimit));
        assert_eq!(
            Shortage::of(&os(libc::ENFILE)),
            Some(Shortage::SystemFdLimit)
        );
        assert_eq!(Shortage::of(&os(libc::ENOBUFS)), Some(Shortage::Buffers));
        assert_eq!(
            Shortage::of(&os(libc::EADDRNOTAVAIL)),
            Some(Shortage::LocalAddress)
        );
        for backend_fault in [libc::ECONNREFUSED, libc::ETIMEDOUT, libc::EHOSTUNREACH] {
            assert_eq!(Shortage::of(&os(backend_fault)), None);
        }
        assert_eq!(Shortage::of(&io::Error::other("no os error")), None);
        // Found inside a wrapping error's chain too.
        #[derive(Debug)]
        struct Wrap(io::Error);
        impl Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("client error (Connect)")
            }
        }
        impl StdError for Wrap {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        assert_eq!(
            Shortage::in_chain(&Wrap(os(libc::EMFILE))),
            Some(Shortage::FdLimit)
        );
        assert_eq!(Shortage::in_chain(&Wrap(os(libc::ECONNREFUSED))), None);
    }

    #[test]
    fn counts_every_shortage_and_logs_once_per_interval() {
        let errors = LocalErrors::default();
        for ms in [0, 1, 2] {
            errors.record(Op::Connect, Shortage::FdLimit, ms, "x");
        }
        let connect = Op::Connect as usize;
        assert_eq!(errors.total(Op::Connect), 3);
        assert_eq!(errors.last_logged_ms[connect].load(Relaxed), 0);
        assert_eq!(errors.unlogged[connect].load(Relaxed), 2);
        // Another op has its own interval: logged at once.
        errors.record(Op::ConfigRead, Shortage::FdLimit, 5, "y");
        assert_eq!(
            errors.last_logged_ms[Op::ConfigRead as usize].load(Relaxed),
            5
        );
        errors.record(Op::Connect, Shortage::Buffers, LOG_EVERY_MS, "z");
        assert_eq!(errors.last_logged_ms[connect].load(Relaxed), LOG_EVERY_MS);
        assert_eq!(errors.unlogged[connect].load(Relaxed), 0);
        assert_eq!(errors.total(Op::Connect), 4);
    }
}
