//! Backend connections: TCP, then TLS by the pool's settings, each
//! [`Watched`] so that an error can say how far its connection got.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::client::ClientTls;

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
            let usage = ConnUse::default();
            usage.http2.store(stream.negotiated_h2(), Relaxed);
            Ok(TokioIo::new(Watched {
                stream,
                usage: Arc::new(usage),
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

impl Watched {
    /// How far this connection's latest request got.
    pub fn usage(&self) -> &Arc<ConnUse> {
        &self.usage
    }

    /// A write's outcome, noted in the connection's use when it took bytes.
    fn noted_write(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.usage.note(WROTE);
        }
        polled
    }
}

/// How far the latest request on one connection got: written by the
/// connection's task only, read after hyper reported its error (which
/// orders the two), so relaxed loads and stores suffice. And whether ALPN
/// chose HTTP/2 for it.
#[derive(Debug, Default)]
pub struct ConnUse {
    progress: AtomicU8,
    http2: AtomicBool,
    /// Notified when the backend's first bytes are read (an HTTP/2
    /// server's SETTINGS, which [`super::multiplexed`] waits for).
    pub(super) first_bytes: tokio::sync::Notify,
}

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
        let bits = self.progress.load(Relaxed);
        // The first write after reading begins the next request (lb's
        // client does not pipeline). A backend that sends part of a head
        // while the body is still going out and then closes would look the
        // same: then an idempotent request is sent once more.
        if bits & READ != 0 {
            self.progress.store(ANSWERED_BEFORE, Relaxed);
        }
    }

    fn note(&self, bit: u8) {
        let bits = self.progress.load(Relaxed);
        if bits & bit == 0 {
            self.progress.store(bits | bit, Relaxed);
        }
    }

    /// True on an HTTP/2 connection (by ALPN) the backend never sent a
    /// byte on: it never took it (see [`super::multiplexed`]'s `classify`).
    pub(super) fn unheard_h2(&self) -> bool {
        self.http2.load(Relaxed) && !self.heard_from()
    }

    /// True once the backend sent a byte on this connection.
    pub(super) fn heard_from(&self) -> bool {
        self.progress.load(Relaxed) & (ANSWERED_BEFORE | READ) != 0
    }

    pub(super) fn stale(&self) -> Option<Stale> {
        let bits = self.progress.load(Relaxed);
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
            if !self.usage.heard_from() {
                self.usage.first_bytes.notify_one();
            }
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
        self.noted_write(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.usage.on_write_start();
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.noted_write(polled)
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
