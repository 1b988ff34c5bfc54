//! The pooled HTTP/1.1 client lb uses to talk to backends, and the
//! classification of its errors into what the retry policy reasons about.

use std::error::Error as StdError;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::UpstreamBody;
use crate::local::Shortage;

/// Idle keep-alive connections are closed after this long: below the few
/// seconds most backends keep an idle connection, so lb rarely reuses one
/// the backend is closing at that very moment.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on idle connections kept per backend.
const POOL_MAX_IDLE_PER_HOST: usize = 256;

pub type UpstreamClient = Client<HttpConnector, UpstreamBody>;

/// Builds the backend client. It lives in the config snapshot and is reused
/// by the next snapshot unless `connect_timeout` changes, so a reload keeps
/// the warm connection pool.
pub fn client(connect_timeout: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// How one attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No connection: nothing was sent, always safe to retry.
    Connect,
    /// The connection broke after (part of) the request was sent.
    Reset,
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

/// Classifies a client error, with its innermost message for logs and bodies.
pub fn classify(err: &hyper_util::client::legacy::Error) -> (FailureKind, String) {
    let kind = if err.is_connect() {
        Shortage::in_chain(err).map_or(FailureKind::Connect, FailureKind::Local)
    } else {
        FailureKind::Reset
    };
    (kind, root_cause(err))
}

/// The innermost message of an error chain: "Connection refused (os error 111)"
/// says more than "client error (Connect)".
pub fn root_cause(err: &(dyn StdError + 'static)) -> String {
    let mut cur: &(dyn StdError + 'static) = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
