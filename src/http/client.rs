//! The clients lb talks to backends with (HTTP/1.1 pooled, HTTP/2
//! multiplexed, each plain or over TLS), and the classification of their
//! errors into what the retry policy reasons about.
//!
//! Each backend connection is watched ([`ConnUse`]) so that an error can
//! say whether the request met a stale pooled connection: one that had
//! answered before and failed before any byte of this answer, as when the
//! backend closed it on its keep-alive timeout just as lb reused it
//! ([`Stale`]). hyper's client retries only requests it never started to
//! write; [`crate::http::retry`] resends these once on a new connection.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

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
/// An h2c backend connection without streams is closed after this long;
/// it multiplexes, so one per backend and worker is kept warm.
const H2_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often an h2c backend connection is PINGed, busy or idle, and how
/// long an answer may take before the connection is closed as dead.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams an h2c backend connection opens before the backend's SETTINGS
/// say how many it takes: one, so a burst on a new connection waits for
/// them (h2 then queues what is over the limit) instead of going over a
/// low `SETTINGS_MAX_CONCURRENT_STREAMS` and being refused, which a pool
/// of one backend could not retry anywhere. hyper's default is 100.
const H2_INITIAL_MAX_SEND_STREAMS: usize = 1;

/// One worker's backend client for one kind of backend connection (plain,
/// or one pool's TLS): its keep-alive pool, a client without one for the
/// resend after a stale pooled connection (which must go on a new
/// connection: the pool may hold more the backend has closed), and the
/// HTTP/2 client of `protocol: h2c` and `h2` pools, which multiplexes every
/// request to one backend on one connection. With TLS, the pooled client
/// speaks what ALPN chose (`protocol: auto`): HTTP/2 connections are shared
/// by the requests, HTTP/1.1 ones pooled.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    pooled: Client<BackendConnector, UpstreamBody>,
    fresh: Client<BackendConnector, UpstreamBody>,
    multiplexed: Client<BackendConnector, UpstreamBody>,
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

    /// Sends `req` as one more stream on the backend's HTTP/2 connection
    /// (opened if there is none: with prior knowledge, or over TLS with
    /// ALPN `h2`).
    pub fn request_http2(&self, req: hyper::Request<UpstreamBody>) -> ResponseFuture {
        self.multiplexed.request(req)
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
    let multiplexed = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .pool_idle_timeout(H2_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_keep_alive_interval(H2_PING_INTERVAL)
        .http2_keep_alive_timeout(H2_PING_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .http2_initial_max_send_streams(H2_INITIAL_MAX_SEND_STREAMS)
        .build(connector.clone());
    UpstreamClient {
        pooled: build(POOL_MAX_IDLE_PER_HOST),
        fresh: build(0),
        multiplexed,
    }
}

/// Connects to backends: TCP (`HttpConnector`), then TLS with the pool's
/// settings when it has some, both within the connect timeout; each
/// connection is [`Watched`].
#[derive(Debug, Clone)]
pub struct BackendConnector {
    tcp: HttpConnector,
    tls: Option<Arc<ClientTls>>,
    /// Bounds the TLS handshake as `tcp`'s own bounds the TCP connect.
    handshake_timeout: Duration,
}

impl BackendConnector {
    pub fn new(connect_timeout: Duration, tls: Option<Arc<ClientTls>>) -> BackendConnector {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        // The URI's scheme says https for TLS pools (HTTP/2's `:scheme`);
        // TLS is this connector's to do, by the pool's settings.
        tcp.enforce_http(false);
        BackendConnector {
            tcp,
            tls,
            handshake_timeout: connect_timeout,
        }
    }
}

impl tower_service::Service<Uri> for BackendConnector {
    type Response = TokioIo<Watched>;
    type Error = Box<dyn StdError + Send + Sync>;
    type Future =
        Pin<Box<dyn Future<Output = Result<TokioIo<Watched>, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.tcp.call(uri.clone());
        let tls = self.tls.clone();
        let handshake_timeout = self.handshake_timeout;
        // Boxed once per new connection, not per request.
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            let stream = match tls {
                None => BackendStream::Plain(tcp),
                Some(tls) => {
                    let stream = handshake(&tls, &uri, tcp, handshake_timeout).await?;
                    BackendStream::Tls(Box::new(stream))
                }
            };
            Ok(TokioIo::new(Watched {
                stream,
                usage: Arc::default(),
            }))
        })
    }
}

/// The TLS handshake with the backend at `uri`, by `tls`'s current
/// settings. Every failure is one line naming the backend and why (the
/// retry loop logs it and a 502's body carries it), with no source: the
/// classification takes the innermost message.
async fn handshake(
    tls: &ClientTls,
    uri: &Uri,
    tcp: TcpStream,
    limit: Duration,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let authority = uri.authority().map_or("", |a| a.as_str());
    let (config, name) = tls
        .for_host(uri.host().unwrap_or_default())
        .map_err(|why| io::Error::other(format!("TLS to {authority}: {why}")))?;
    let only_h2 = config.alpn_protocols.iter().all(|p| p == b"h2");
    let connecting = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    let stream = match tokio::time::timeout(limit, connecting).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            // A server with no protocol in common says so with an alert.
            let hint = if only_h2 && e.to_string().contains("NoApplicationProtocol") {
                format!(": {authority} does not speak HTTP/2 over TLS (ALPN h2), which protocol: h2 needs; protocol: auto lets it choose HTTP/1.1")
            } else {
                String::new()
            };
            return Err(io::Error::new(
                e.kind(),
                format!("TLS handshake with {authority} failed: {e}{hint}"),
            ));
        }
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("TLS handshake with {authority} timed out after {limit:?}"),
            ))
        }
    };
    if only_h2 && stream.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err(io::Error::other(format!(
            "{authority} did not agree to HTTP/2 in the TLS handshake (ALPN h2), which protocol: h2 needs; protocol: auto lets it choose HTTP/1.1"
        )));
    }
    Ok(stream)
}

/// A backend connection's bytes: plain TCP or TLS over it.
#[derive(Debug)]
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl BackendStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            BackendStream::Plain(s) => s,
            BackendStream::Tls(s) => s.get_ref().0,
        }
    }

    /// ALPN chose HTTP/2.
    fn negotiated_h2(&self) -> bool {
        match self {
            BackendStream::Plain(_) => false,
            BackendStream::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            BackendStream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            BackendStream::Plain(s) => s.is_write_vectored(),
            BackendStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A backend connection that notes its use in a [`ConnUse`], which hyper's
/// client attaches to its errors (`Error::connect_info`).
#[derive(Debug)]
pub struct Watched {
    stream: BackendStream,
    usage: Arc<ConnUse>,
}

/// How far the latest request on one connection got: written by the
/// connection's task only, read after hyper reported its error (which
/// orders the two), so relaxed loads and stores suffice.
#[derive(Debug, Default)]
pub struct ConnUse(AtomicU8);

/// [`ConnUse`] bits.
const ANSWERED_BEFORE: u8 = 1;
const WROTE: u8 = 2;
const READ: u8 = 4;

/// How a request that met a stale pooled connection failed: on a
/// connection that had answered an earlier request, before any byte of an
/// answer to this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// Not a byte of it was written: the backend never saw it.
    Unsent,
    /// Written, then the connection closed or reset: most likely closed
    /// while idle, but the backend may have seen the request.
    Unanswered,
}

impl ConnUse {
    fn on_write_start(&self) {
        let bits = self.0.load(Relaxed);
        // The first write after reading begins the next request (lb's
        // client does not pipeline). A backend that sends part of a head
        // while the body is still going out and then closes would look the
        // same: then an idempotent request is sent once more.
        if bits & READ != 0 {
            self.0.store(ANSWERED_BEFORE, Relaxed);
        }
    }

    fn note(&self, bit: u8) {
        let bits = self.0.load(Relaxed);
        if bits & bit == 0 {
            self.0.store(bits | bit, Relaxed);
        }
    }

    /// True once the backend sent a byte on this connection.
    fn heard_from(&self) -> bool {
        self.0.load(Relaxed) & (ANSWERED_BEFORE | READ) != 0
    }

    fn stale(&self) -> Option<Stale> {
        let bits = self.0.load(Relaxed);
        if bits & ANSWERED_BEFORE == 0 || bits & READ != 0 {
            return None;
        }
        Some(if bits & WROTE == 0 {
            Stale::Unsent
        } else {
            Stale::Unanswered
        })
    }
}

impl Connection for Watched {
    fn connected(&self) -> Connected {
        let connected = self.stream.tcp().connected().extra(Arc::clone(&self.usage));
        if self.stream.negotiated_h2() {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.usage.note(READ);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.usage.on_write_start();
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.usage.note(WROTE);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.usage.on_write_start();
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.usage.note(WROTE);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Whether `err` is a request that met a stale pooled connection, and how
/// far it got (see [`Stale`]); `None` for any other failure.
pub fn stale(err: &hyper_util::client::legacy::Error) -> Option<Stale> {
    if err.is_connect() {
        return None;
    }
    // Only on this error path: the connection's extras copied out.
    let mut extras = hyper::http::Extensions::new();
    err.connect_info()?.get_extras(&mut extras);
    extras.get::<Arc<ConnUse>>()?.stale()
}

/// Classifies an HTTP/2 (`protocol: h2c`) client error as [`classify`]
/// does, and a stream that failed on a connection the backend never sent
/// a byte on as refused too: an HTTP/2 server's first frame is its SETTINGS
/// (RFC 9113 §3.4), sent as it takes the connection, so one that said
/// nothing never took it and processed none of its streams. The kernel
/// completes a connect to a listener nobody accepts on any more (a server
/// draining after its graceful GOAWAY) and resets it when the listener
/// closes: every stream lb queued on it fails "connection reset", unseen.
pub fn classify_h2(err: &hyper_util::client::legacy::Error) -> (FailureKind, String) {
    match classify(err) {
        (FailureKind::Reset, detail) if unheard(err) => (FailureKind::Refused, detail),
        classified => classified,
    }
}

/// Whether `err` came from a connection the backend never sent a byte on.
fn unheard(err: &hyper_util::client::legacy::Error) -> bool {
    let Some(info) = err.connect_info() else {
        return false;
    };
    let mut extras = hyper::http::Extensions::new();
    info.get_extras(&mut extras);
    extras
        .get::<Arc<ConnUse>>()
        .is_some_and(|usage| !usage.heard_from())
}

/// Classifies a client error, with its innermost message for logs and bodies.
pub fn classify(err: &hyper_util::client::legacy::Error) -> (FailureKind, String) {
    let kind = if err.is_connect() {
        Shortage::in_chain(err).map_or(FailureKind::Connect, FailureKind::Local)
    } else if refused_stream(err) {
        FailureKind::Refused
    } else {
        FailureKind::Reset
    };
    (kind, root_cause(err))
}

/// Whether an HTTP/2 backend refused the stream before processing any of
/// it (RFC 9113 §8.7): reset with `REFUSED_STREAM`, or above the last
/// stream id of a graceful GOAWAY (`NO_ERROR`; h2 fails only those streams
/// with it, those at or below it run on, and an error GOAWAY fails every
/// stream with its own code).
fn refused_stream(err: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return match h2.reason() {
                Some(h2::Reason::REFUSED_STREAM) => true,
                Some(h2::Reason::NO_ERROR) => h2.is_go_away() && h2.is_remote(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What a connection's use says after each step of its life.
    #[test]
    fn only_a_reused_connection_without_an_answer_is_stale() {
        let usage = ConnUse::default();
        let write = |n: usize| {
            usage.on_write_start();
            if n > 0 {
                usage.note(WROTE);
            }
        };
        // A new connection that fails is not stale, written or not.
        assert_eq!(usage.stale(), None);
        write(10);
        assert_eq!(usage.stale(), None);
        // Answered: the next request starts with its first write.
        usage.note(READ);
        assert_eq!(usage.stale(), None);
        write(0);
        assert_eq!(usage.stale(), Some(Stale::Unsent));
        write(10);
        write(10);
        assert_eq!(usage.stale(), Some(Stale::Unanswered));
        // A byte of the answer: whatever happens next, the backend answered.
        usage.note(READ);
        assert_eq!(usage.stale(), None);
    }

    /// A connection is heard from with the backend's first byte, for good.
    #[test]
    fn a_connection_is_heard_from_once_the_backend_sent_a_byte() {
        let usage = ConnUse::default();
        assert!(!usage.heard_from());
        usage.on_write_start();
        usage.note(WROTE);
        assert!(!usage.heard_from(), "lb's own bytes say nothing");
        usage.note(READ);
        assert!(usage.heard_from());
        // The next request's first write clears READ, not what it meant.
        usage.on_write_start();
        usage.note(WROTE);
        assert!(usage.heard_from());
    }
}
