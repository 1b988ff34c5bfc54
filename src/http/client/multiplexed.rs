//! The HTTP/2 connections of one worker to the backends of `protocol: h2c`
//! and `h2` pools (one [`Multiplexed`] per kind of connection: plain, or
//! one pool's TLS).
//!
//! A request goes as one more stream on the backend's connection carrying
//! the fewest, among those under the backend's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`. When each is at that limit, or none
//! is open, one more connection is opened (one at a time per backend; the
//! requests that come meanwhile wait for it instead of opening their own),
//! up to [`MAX_CONNECTIONS`]: beyond that, streams queue on the least
//! loaded connection and h2 sends them as others end. A new connection
//! takes streams once the backend's SETTINGS are in (its limit known; a
//! backend that never sends them is a connect failure), and a backend
//! allowing none on any connection is refused at once. A connection the
//! backend sent GOAWAY on takes no new stream (hyper closes its sender) and
//! ends when its streams have, while new ones go on a new connection.
//! hyper-util's pool, used before, kept one connection per backend and
//! queued every stream over the backend's limit behind it.
//!
//! The connections are the worker's own (its thread's [`Multiplexed`]):
//! no lock, no cross-thread wake-up; a stream is counted on its connection
//! from the pick to the end of its response body ([`StreamSlot`]).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http2::{self, Connection, SendRequest};
use hyper::{Request, Response, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{oneshot, watch};
use tower_service::Service as _;

use super::{refused_stream, root_cause, BackendConnector, ConnUse, Watched};
use super::{H2_PING_INTERVAL, H2_PING_TIMEOUT};
use crate::core::failure::FailureKind;
use crate::http::body::UpstreamBody;
use crate::obs::local::Shortage;
use crate::tls::client::ClientTls;

/// Connections per backend and worker at most. A backend with a low
/// stream limit gets this many times it; more would only move the queue
/// from lb to the backend's accept loop.
pub const MAX_CONNECTIONS: usize = 8;
/// A connection without streams is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How many picks go by between sweeps of backends with no connection
/// left (a pool's removed backends, discovered ones gone).
const SWEEP_EVERY: u32 = 4096;

/// A worker's HTTP/2 connections by backend authority, and how to open more.
pub struct Multiplexed {
    connector: BackendConnector,
    builder: http2::Builder<TokioExecutor>,
    backends: RefCell<HashMap<Box<str>, Backend>>,
    picks: Cell<u32>,
}

impl fmt::Debug for Multiplexed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Multiplexed")
            .field("backends", &self.backends.borrow().len())
            .finish()
    }
}

/// One backend's connections, and the one being opened.
#[derive(Default)]
struct Backend {
    conns: Vec<Conn>,
    opening: Option<watch::Receiver<Opening>>,
}

/// A connection as the pool sees it: its sender, and what it shares with
/// its driver task and its streams.
struct Conn {
    send: SendRequest<UpstreamBody>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Streams counted on this connection ([`StreamSlot`]s alive).
    streams: AtomicUsize,
    /// The backend's `SETTINGS_MAX_CONCURRENT_STREAMS`, as the driver last
    /// read it (set before the connection is used: [`open`] waits for it).
    max_streams: AtomicUsize,
    /// Streams started since the driver last looked, for the idle close.
    started: AtomicUsize,
    usage: Arc<ConnUse>,
}

impl Conn {
    fn has_room(&self) -> bool {
        self.shared.streams.load(Relaxed) < self.shared.max_streams.load(Relaxed)
    }

    /// False once the backend said this connection takes no stream.
    fn takes_streams(&self) -> bool {
        self.shared.max_streams.load(Relaxed) > 0
    }
}

/// How the opening of a connection went, for the requests waiting on it.
#[derive(Debug, Clone)]
enum Opening {
    Pending,
    Opened,
    Failed(FailureKind, Arc<str>),
}

/// What a request does next.
enum Pick {
    /// Send on this connection; the slot counts the stream there.
    Send(SendRequest<UpstreamBody>, StreamSlot),
    /// Wait for the connection being opened, then pick again.
    Wait(watch::Receiver<Opening>),
    /// Open a connection, tell the waiters how it went, pick again.
    Open(watch::Sender<Opening>),
    /// The backend allows no stream on any of its connections.
    Refused,
}

/// One stream counted on its connection until dropped: held by the
/// response body relayed to the client, so a stream counts until its
/// last byte.
#[derive(Debug)]
pub struct StreamSlot(Arc<Shared>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Relaxed);
    }
}

impl StreamSlot {
    fn take(shared: &Arc<Shared>) -> StreamSlot {
        shared.streams.fetch_add(1, Relaxed);
        shared.started.fetch_add(1, Relaxed);
        StreamSlot(Arc::clone(shared))
    }
}

impl Multiplexed {
    pub fn new(connector: BackendConnector) -> Multiplexed {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_PING_INTERVAL)
            .keep_alive_timeout(H2_PING_TIMEOUT)
            .keep_alive_while_idle(true);
        Multiplexed {
            connector,
            builder,
            backends: RefCell::default(),
            picks: Cell::new(0),
        }
    }

    /// Where a request to `authority` goes; `may_open` false takes any open
    /// connection, at its limit or not (the last round of [`send`]).
    fn pick(&self, authority: &str, may_open: bool) -> Pick {
        let mut backends = self.backends.borrow_mut();
        self.sweep(&mut backends);
        let backend = match backends.get_mut(authority) {
            Some(b) => b,
            None => backends.entry(authority.into()).or_default(),
        };
        backend.conns.retain(|c| !c.send.is_closed());
        let ready = || backend.conns.iter().filter(|c| c.send.is_ready());
        let least = |of: &mut dyn Iterator<Item = &Conn>| {
            of.min_by_key(|c| c.shared.streams.load(Relaxed))
                .map(|c| Pick::Send(c.send.clone(), StreamSlot::take(&c.shared)))
        };
        if let Some(send) = least(&mut ready().filter(|c| c.has_room())) {
            return send;
        }
        // A backend allowing no stream on any connection
        // (SETTINGS_MAX_CONCURRENT_STREAMS 0) would hold a queued stream
        // for as long as it pleases, and a new connection would say the same.
        if ready().next().is_some() && ready().all(|c| !c.takes_streams()) {
            return Pick::Refused;
        }
        if !may_open || backend.conns.len() >= MAX_CONNECTIONS {
            // Every connection is at its limit: the stream queues in h2.
            if let Some(send) = least(&mut ready().filter(|c| c.takes_streams())) {
                return send;
            }
        }
        if let Some(opening) = &backend.opening {
            // One that failed or whose opener went away is not waited on.
            if matches!(*opening.borrow(), Opening::Pending) && opening.has_changed().is_ok() {
                return Pick::Wait(opening.clone());
            }
        }
        let (tell, opening) = watch::channel(Opening::Pending);
        backend.opening = Some(opening);
        Pick::Open(tell)
    }

    /// Now and then, forgets backends with no connection left.
    fn sweep(&self, backends: &mut HashMap<Box<str>, Backend>) {
        let picks = self.picks.get().wrapping_add(1);
        self.picks.set(picks);
        if picks % SWEEP_EVERY == 0 {
            backends.retain(|_, b| {
                b.conns.retain(|c| !c.send.is_closed());
                !b.conns.is_empty() || b.opening.is_some()
            });
        }
    }

    /// A connection just opened to `authority`, its backend's SETTINGS in.
    fn add(&self, authority: &str, conn: Conn) {
        let mut backends = self.backends.borrow_mut();
        let backend = backends.entry(authority.into()).or_default();
        backend.conns.push(conn);
        backend.opening = None;
    }
}

/// Sends `req` (its URI absolute: the backend's authority) as a stream on
/// one of this worker's HTTP/2 connections to that backend (see the module
/// doc), over a pool's `tls` or plain. The slot counts the stream on its
/// connection until dropped with the response body.
pub async fn send(
    connect_timeout: Duration,
    tls: Option<&Arc<ClientTls>>,
    req: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, StreamSlot), (FailureKind, String)> {
    // Each round either sends, or waits for / opens a connection; the last
    // takes any open connection, so a burst bigger than the connections
    // can hold queues instead of going round again.
    for round in 0..3 {
        let authority = req.uri().authority().map_or("", |a| a.as_str());
        let pick = super::of_this_worker(connect_timeout, tls, |c| {
            c.multiplexed.pick(authority, round < 2)
        });
        match pick {
            Pick::Send(mut send, slot) => {
                let sent = send.send_request(req).await;
                return match sent {
                    Ok(resp) => Ok((resp, slot)),
                    Err(e) => Err(classify(&e)),
                };
            }
            Pick::Wait(opening) => wait(opening).await?,
            Pick::Refused => {
                return Err((
                    FailureKind::Refused,
                    "the backend allows no stream (SETTINGS_MAX_CONCURRENT_STREAMS 0)".to_owned(),
                ))
            }
            // Once per connection: boxed, so that every request's future
            // (and each one holding it) is not the size of a connect.
            Pick::Open(tell) => {
                Box::pin(open_for(connect_timeout, tls, req.uri().clone(), tell)).await?;
            }
        }
    }
    // The last round always sends, waits or opens; it sent unless no
    // connection was open: opened one just now, which others filled.
    Err((
        FailureKind::Refused,
        "no HTTP/2 connection to the backend took the stream".to_owned(),
    ))
}

/// Waits for the connection being opened; its failure is the waiter's.
async fn wait(mut opening: watch::Receiver<Opening>) -> Result<(), (FailureKind, String)> {
    let outcome = opening
        .wait_for(|o| !matches!(o, Opening::Pending))
        .await
        .map(|o| o.clone());
    match outcome {
        Ok(Opening::Failed(kind, detail)) => Err((kind, detail.to_string())),
        // Opened, or its opener went away: pick again.
        _ => Ok(()),
    }
}

/// Opens a connection to `uri`'s backend for this worker's connections
/// over `tls` (or plain), and tells the requests waiting how it went.
async fn open_for(
    connect_timeout: Duration,
    tls: Option<&Arc<ClientTls>>,
    uri: Uri,
    tell: watch::Sender<Opening>,
) -> Result<(), (FailureKind, String)> {
    let (connector, builder) = super::of_this_worker(connect_timeout, tls, |c| {
        (
            c.multiplexed.connector.clone(),
            c.multiplexed.builder.clone(),
        )
    });
    match open(connector, builder, connect_timeout, uri.clone()).await {
        Ok(conn) => {
            let authority = uri.authority().map_or("", |a| a.as_str());
            super::of_this_worker(connect_timeout, tls, |c| c.multiplexed.add(authority, conn));
            tell.send_replace(Opening::Opened);
            Ok(())
        }
        Err((kind, detail)) => {
            tell.send_replace(Opening::Failed(kind, detail.as_str().into()));
            Err((kind, detail))
        }
    }
}

/// Opens an HTTP/2 connection to `uri`'s backend, starts its driver, and
/// waits (up to `settings_timeout`) for the backend's SETTINGS, the first
/// frame an HTTP/2 server sends (RFC 9113 §3.4): until then neither its
/// stream limit is known (a stream sent over it, or one sent when it is 0,
/// waits in h2 for as long as the backend pleases) nor whether anything
/// took the connection (the kernel completes a connect to a listener that
/// nobody accepts on any more, and resets it later).
async fn open(
    mut connector: BackendConnector,
    builder: http2::Builder<TokioExecutor>,
    settings_timeout: Duration,
    uri: Uri,
) -> Result<Conn, (FailureKind, String)> {
    let io = connector.call(uri).await.map_err(|e| {
        let kind = Shortage::in_chain(&*e).map_or(FailureKind::Connect, FailureKind::Local);
        (kind, root_cause(&*e))
    })?;
    let usage = Arc::clone(io.inner().usage());
    let (send, conn) = builder
        .handshake::<_, UpstreamBody>(io)
        .await
        .map_err(|e| (FailureKind::Connect, root_cause(&e)))?;
    let shared = Arc::new(Shared {
        streams: AtomicUsize::new(0),
        max_streams: AtomicUsize::new(0),
        started: AtomicUsize::new(0),
        usage,
    });
    let (settings_in, settings) = oneshot::channel();
    tokio::spawn(drive(conn, Arc::clone(&shared), settings_in));
    match tokio::time::timeout(settings_timeout, settings).await {
        Ok(Ok(())) => Ok(Conn { send, shared }),
        Ok(Err(_)) => Err((
            FailureKind::Connect,
            "the backend closed the connection before its HTTP/2 SETTINGS".to_owned(),
        )),
        Err(_) => Err((
            FailureKind::Connect,
            format!("no HTTP/2 SETTINGS from the backend within {settings_timeout:?}"),
        )),
    }
}

type H2Connection = Connection<TokioIo<Watched>, UpstreamBody, TokioExecutor>;

/// Runs a connection (hyper's dispatch of new streams; the h2 connection
/// itself runs in a task hyper spawned) until it closes, or until it has
/// carried no stream for [`IDLE_TIMEOUT`]. It notes the backend's stream
/// limit for [`Multiplexed::pick`] when the backend's first bytes (its
/// SETTINGS) are in, then tells `settings_in`, and after each of its own
/// turns (a new stream) for a limit the backend changed later.
async fn drive(conn: H2Connection, shared: Arc<Shared>, settings_in: oneshot::Sender<()>) {
    let mut driven = Driven {
        conn: Box::pin(conn),
        shared: Arc::clone(&shared),
    };
    let mut settings_in = Some(settings_in);
    loop {
        tokio::select! {
            ended = &mut driven => {
                if let Err(e) = ended {
                    tracing::debug!(error = %root_cause(&e), "backend HTTP/2 connection ended");
                }
                return;
            }
            // h2 applies the SETTINGS in the turn that read them: done by
            // the time this task runs.
            () = shared.usage.first_bytes.notified(), if settings_in.is_some() => {
                driven.note_limit();
                if let Some(tell) = settings_in.take() {
                    let _ = tell.send(()); // gone: open gave up waiting
                }
            }
            () = tokio::time::sleep(IDLE_TIMEOUT) => {
                let idle = shared.started.swap(0, Relaxed) == 0 && shared.streams.load(Relaxed) == 0;
                if idle {
                    return;
                }
            }
        }
    }
}

/// A connection polled, its stream limit noted after each poll.
struct Driven {
    conn: Pin<Box<H2Connection>>,
    shared: Arc<Shared>,
}

impl Driven {
    /// Until the backend sent a byte (its SETTINGS come first), h2's
    /// figure is lb's own initial one, not the backend's.
    fn note_limit(&self) {
        if self.shared.usage.heard_from() {
            let max = self.conn.current_max_send_streams();
            self.shared.max_streams.store(max, Relaxed);
        }
    }
}

impl Future for Driven {
    type Output = hyper::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<hyper::Result<()>> {
        let polled = self.conn.as_mut().poll(cx);
        self.note_limit();
        polled
    }
}

/// Classifies the error of a stream: refused when the backend refused it
/// (`REFUSED_STREAM`, above a GOAWAY's last stream id) or when it never
/// reached the connection (closed meanwhile). Anything else is a reset: the
/// backend may have processed the request. (A connection the backend
/// closed before a byte back never carries a stream: [`open`] waits for
/// its SETTINGS.)
fn classify(err: &hyper::Error) -> (FailureKind, String) {
    let kind = if refused_stream(err) || err.is_canceled() {
        FailureKind::Refused
    } else {
        FailureKind::Reset
    };
    (kind, root_cause(err))
}
