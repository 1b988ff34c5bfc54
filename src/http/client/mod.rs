//! The clients lb talks to backends with (HTTP/1.1 pooled, HTTP/2
//! multiplexed, each plain or over TLS), and the classification of their
//! errors into what the retry policy reasons about.
//!
//! # Layout
//! * this module: a worker's clients ([`of_this_worker`]) and the
//!   classification of their errors;
//! * [`connect`]: backend connections (TCP, TLS), each [`Watched`];
//! * [`multiplexed`]: the HTTP/2 connections of `protocol: h2c` and `h2` pools,
//!   several per backend when one reaches the backend's stream limit.
//!
//! Each backend connection is watched ([`ConnUse`]) so that an error can
//! say whether the request met a stale pooled connection: one that had
//! answered before and failed before any byte of this answer, as when the
//! backend closed it on its keep-alive timeout just as lb reused it
//! ([`Stale`]). hyper's client retries only requests it never started to
//! write; [`crate::http::retry`] resends these once on a new connection.

mod connect;
pub mod multiplexed;

use std::error::Error as StdError;
use std::sync::{Arc, Weak};
use std::time::Duration;

use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use connect::{BackendConnector, BackendStream, ConnUse, Stale, Watched};

use crate::core::failure::FailureKind;
use crate::http::body::UpstreamBody;
use crate::obs::local::Shortage;
use crate::tls::client::ClientTls;

/// Idle keep-alive connections are closed after this long: below the few
/// seconds most backends keep an idle connection, so lb rarely reuses one
/// the backend is closing at that very moment.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on idle connections kept per backend.
const POOL_MAX_IDLE_PER_HOST: usize = 256;
/// How often a backend HTTP/2 connection is PINGed, busy or idle, and how
/// long an answer may take before the connection is closed as dead.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// One worker's backend client for one kind of backend connection (plain,
/// or one pool's TLS): its keep-alive pool, a client without one for the
/// resend after a stale pooled connection (which must go on a new
/// connection: the pool may hold more the backend has closed), and the
/// HTTP/2 connections of `protocol: h2c` and `h2` pools ([`multiplexed`]). With
/// TLS, the pooled client speaks what ALPN chose (`protocol: auto`):
/// HTTP/2 connections are shared by the requests, HTTP/1.1 ones pooled.
#[derive(Debug)]
pub struct UpstreamClient {
    pooled: Client<BackendConnector, UpstreamBody>,
    fresh: Client<BackendConnector, UpstreamBody>,
    multiplexed: multiplexed::Multiplexed,
}

impl UpstreamClient {
    /// Sends `req` on a pooled connection (or a new one).
    pub fn request(&self, req: hyper::Request<UpstreamBody>) -> ResponseFuture {
        self.pooled.request(req)
    }

    /// Sends `req` on a new connection, closed after this exchange.
    pub fn request_fresh(&self, req: hyper::Request<UpstreamBody>) -> ResponseFuture {
        self.fresh.request(req)
    }
}

/// A worker's clients: the plain one and one per pool TLS in use, built
/// with one connect timeout.
struct WorkerClients {
    connect_timeout: Duration,
    plain: UpstreamClient,
    /// By the pool's `ClientTls`; an entry whose `ClientTls` is gone (its
    /// pool's TLS settings changed or the pool went) is dropped with its
    /// connections at the next miss.
    tls: Vec<(Weak<ClientTls>, UpstreamClient)>,
}

thread_local! {
    /// This worker thread's backend clients (each worker is one thread, so
    /// its keep-alive pools are never shared: no lock, no cross-thread
    /// wake-up).
    static WORKER_CLIENTS: std::cell::RefCell<Option<WorkerClients>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this worker's client for the backends of a pool with
/// `tls` (or none). The clients are kept across reloads, so they keep the
/// warm connection pools, and rebuilt when `timeouts.connect` changes.
/// `f` must not call this again (the clients are borrowed meanwhile).
pub fn of_this_worker<R>(
    connect_timeout: Duration,
    tls: Option<&Arc<ClientTls>>,
    f: impl FnOnce(&UpstreamClient) -> R,
) -> R {
    WORKER_CLIENTS.with_borrow_mut(|slot| {
        let clients = match slot {
            Some(c) if c.connect_timeout == connect_timeout => c,
            _ => slot.insert(WorkerClients {
                connect_timeout,
                plain: client(connect_timeout, None),
                tls: Vec::new(),
            }),
        };
        let Some(tls) = tls else {
            return f(&clients.plain);
        };
        let wanted = Arc::as_ptr(tls);
        if let Some((_, client)) = clients.tls.iter().find(|(t, _)| t.as_ptr() == wanted) {
            return f(client);
        }
        clients.tls.retain(|(t, _)| t.strong_count() > 0);
        let built = client(connect_timeout, Some(Arc::clone(tls)));
        clients.tls.push((Arc::downgrade(tls), built));
        // Pushed on the line above: the vector is not empty.
        f(&clients.tls.last().expect("just pushed").1)
    })
}

/// Builds the clients for backend connections made by
/// [`BackendConnector`] with `tls`.
fn client(connect_timeout: Duration, tls: Option<Arc<ClientTls>>) -> UpstreamClient {
    let connector = BackendConnector::new(connect_timeout, tls);
    let build = |max_idle| {
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(max_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // For the HTTP/2 connections ALPN chooses (`protocol: auto`).
            .http2_keep_alive_interval(H2_PING_INTERVAL)
            .http2_keep_alive_timeout(H2_PING_TIMEOUT)
            .build(connector.clone())
    };
    UpstreamClient {
        pooled: build(POOL_MAX_IDLE_PER_HOST),
        fresh: build(0),
        multiplexed: multiplexed::Multiplexed::new(connector),
    }
}

/// Whether `err` is a request that met a stale pooled connection, and how
/// far it got (see [`Stale`]); `None` for any other failure.
pub fn stale(err: &hyper_util::client::legacy::Error) -> Option<Stale> {
    if err.is_connect() {
        return None;
    }
    usage(err)?.stale()
}

/// Classifies a client error, with its innermost message for logs and
/// bodies. On an HTTP/2 connection (ALPN chose it, `protocol: auto`) a
/// stream that failed before the backend sent a byte on the connection is
/// refused too ([`ConnUse::unheard_h2`]): an HTTP/2 server's first frame is
/// its SETTINGS (RFC 9113 §3.4), so one that said nothing never took the
/// connection, as when the kernel completed a connect to a listener nobody
/// accepts on any more and reset it when the listener closed.
pub fn classify(err: &hyper_util::client::legacy::Error) -> (FailureKind, String) {
    let kind = if err.is_connect() {
        Shortage::in_chain(err).map_or(FailureKind::Connect, FailureKind::Local)
    } else if refused_stream(err) || usage(err).is_some_and(|u| u.unheard_h2()) {
        FailureKind::Refused
    } else {
        FailureKind::Reset
    };
    (kind, root_cause(err))
}

/// The use of the connection `err` happened on, copied out of its extras
/// (only on this error path).
fn usage(err: &hyper_util::client::legacy::Error) -> Option<Arc<ConnUse>> {
    let mut extras = hyper::http::Extensions::new();
    err.connect_info()?.get_extras(&mut extras);
    extras.remove::<Arc<ConnUse>>()
}

/// Whether an HTTP/2 backend refused the stream before processing any of
/// it (RFC 9113 §8.7): reset with `REFUSED_STREAM`, or above the last
/// stream id of a graceful GOAWAY (`NO_ERROR`; h2 fails only those streams
/// with it, those at or below it run on, and an error GOAWAY fails every
/// stream with its own code).
pub(super) fn refused_stream(err: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<::h2::Error>() {
            return match h2.reason() {
                Some(::h2::Reason::REFUSED_STREAM) => true,
                Some(::h2::Reason::NO_ERROR) => h2.is_go_away() && h2.is_remote(),
                _ => false,
            };
        }
        cur = e.source();
    }
    false
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
