//! How an attempt on a backend failed: what the retry policy, passive
//! health and the counters reason about, for every protocol.

use crate::obs::local::Shortage;
use crate::obs::metrics::{AttemptOutcome, RetryReason};

/// How one attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No connection: nothing was sent, always safe to retry.
    Connect,
    /// The connection broke after (part of) the request was sent.
    Reset,
    /// The backend refused the request before processing any of it (an
    /// HTTP/2 `REFUSED_STREAM`, a stream above a graceful GOAWAY's last
    /// stream id, or an HTTP/2 connection that failed before the backend
    /// sent a byte): safe to send elsewhere, whatever the method.
    Refused,
    /// No response head within the per-try or request timeout.
    Timeout,
    /// The backend answered something lb cannot relay (an unasked-for 101).
    Protocol,
    /// No connection because lb itself ran short (its fd limit, buffers,
    /// local ports): nothing is said about the backend, nothing is charged.
    Local(Shortage),
}

/// The kind of a failed connect to a backend: [`FailureKind::Local`] when
/// the error is lb's own shortage, [`FailureKind::Connect`] otherwise.
pub fn connect_failure(e: &std::io::Error) -> FailureKind {
    Shortage::of(e).map_or(FailureKind::Connect, FailureKind::Local)
}

impl FailureKind {
    /// The outcome counted for an attempt that failed this way.
    pub fn outcome(self) -> AttemptOutcome {
        match self {
            // A local shortage is never charged as an attempt (the retry
            // loop returns first); were it ever, it reached no backend.
            FailureKind::Connect | FailureKind::Local(_) => AttemptOutcome::Connect,
            FailureKind::Reset | FailureKind::Refused => AttemptOutcome::Reset,
            FailureKind::Timeout => AttemptOutcome::Timeout,
            FailureKind::Protocol => AttemptOutcome::Protocol,
        }
    }

    /// The reason counted when an attempt that failed this way is retried.
    pub fn retry_reason(self) -> RetryReason {
        match self {
            FailureKind::Connect | FailureKind::Local(_) => RetryReason::ConnectFailure,
            FailureKind::Reset => RetryReason::Reset,
            FailureKind::Refused => RetryReason::Refused,
            // Protocol failures are never retried; counted as resets if one ever is.
            FailureKind::Timeout => RetryReason::Timeout,
            FailureKind::Protocol => RetryReason::Reset,
        }
    }
}
