//! Body types on both sides of the proxy.
//!
//! * [`ClientBody`]: the client's body as it arrives, with a stall timer
//!   (`timeouts.client_body`) and a record of how it failed, so the retry
//!   loop can tell a client's fault from a backend's.
//! * [`RequestBody`]: what the client sent, either buffered (so a retry can
//!   replay the same bytes) or streaming (sent once, never buffered whole).
//! * [`UpstreamBody`]: the body of one attempt, handed to the HTTP client.
//!   A streaming body that the client drops without ever polling (the
//!   connect failed, so nothing was sent) is handed back for the next try.
//! * [`ResponseBody`]: what the client gets: the backend's body streamed
//!   through ([`RelayedBody`]: holding the backend's in-flight slot until it
//!   ends, each wait for it bounded by `timeouts.backend_body`), or a short
//!   text from lb itself.

use std::error::Error as StdError;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::Method;
use tokio::sync::oneshot;

use crate::core::runtime::Runtime;
use crate::core::state::InFlight;
use crate::io::stall::Stall;

/// Errors of bodies lb hands to hyper's client.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// How a request body failed on the client's side. None of these is the
/// backend's fault: no failure is counted against it and nothing is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFault {
    /// Invalid framing (a bad chunk size, a body longer than declared…): 400.
    Malformed,
    /// No bytes from the client for `timeouts.client_body`: 408.
    Stalled,
    /// The client closed or reset its connection mid-body: nobody to answer.
    Aborted,
}

impl ClientFault {
    fn code(self) -> u8 {
        match self {
            ClientFault::Malformed => 1,
            ClientFault::Stalled => 2,
            ClientFault::Aborted => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(ClientFault::Malformed),
            2 => Some(ClientFault::Stalled),
            3 => Some(ClientFault::Aborted),
            _ => None,
        }
    }

    /// Reads hyper's error for a body it was receiving from the client.
    fn of(err: &hyper::Error) -> Self {
        let mut source: Option<&(dyn StdError + 'static)> = err.source();
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                return match io.kind() {
                    io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => {
                        ClientFault::Malformed
                    }
                    _ => ClientFault::Aborted,
                };
            }
            source = e.source();
        }
        if err.is_parse() || err.is_parse_too_large() {
            ClientFault::Malformed
        } else {
            ClientFault::Aborted
        }
    }
}

/// What the retry loop can learn about a body that hyper's client is
/// sending: shared between the body (owned by the client) and the loop.
#[derive(Debug, Default)]
pub struct BodyWatch {
    /// A [`ClientFault`] code, 0 while none happened.
    fault: AtomicU8,
    /// True while the body waits for bytes from the client: a timeout then
    /// is the client's doing, not the backend's.
    waiting_on_client: AtomicBool,
}

impl BodyWatch {
    pub fn fault(&self) -> Option<ClientFault> {
        ClientFault::from_code(self.fault.load(Relaxed))
    }

    fn set_fault(&self, fault: ClientFault) {
        self.fault.store(fault.code(), Relaxed);
    }

    pub fn waiting_on_client(&self) -> bool {
        self.waiting_on_client.load(Relaxed)
    }
}

/// The client's request body, watched for stalls and failures.
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    /// `timeouts.client_body`: the longest wait for the client's next bytes.
    limit: Duration,
    /// Counts the current wait for the client.
    stall: Stall,
    watch: Arc<BodyWatch>,
}

/// The error a stalled body ends with.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no body bytes for {0:?}")]
pub struct Stalled(Duration);

impl ClientBody {
    pub fn new(inner: Incoming, limit: Duration) -> Self {
        ClientBody {
            inner,
            limit,
            stall: Stall::default(),
            watch: Arc::default(),
        }
    }

    pub fn watch(&self) -> &Arc<BodyWatch> {
        &self.watch
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        this.watch
            .waiting_on_client
            .store(polled.is_pending(), Relaxed);
        let limit = this.limit;
        match this.stall.poll(cx, polled, || limit) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.watch.set_fault(ClientFault::Stalled);
                Poll::Ready(Some(Err(Box::new(Stalled(limit)))))
            }
            Poll::Ready(Some(frame)) => Poll::Ready(frame.map(|f| {
                f.map_err(|e| {
                    this.watch.set_fault(ClientFault::of(&e));
                    BoxError::from(e)
                })
            })),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's request body, prepared for one or more attempts.
#[derive(Debug)]
pub enum RequestBody {
    /// Held in memory; every attempt sends a copy (a cheap `Bytes` clone).
    Buffered(Bytes),
    /// Not yet read. `None` once an attempt has consumed it.
    Streaming {
        body: Option<ClientBody>,
        /// Where an unpolled body comes back after a failed connect.
        returned: Option<oneshot::Receiver<ClientBody>>,
        /// Outlives the body inside hyper's client: how it ended.
        watch: Arc<BodyWatch>,
    },
}

/// The client went away, stalled or sent a broken body while it was being
/// buffered.
#[derive(Debug, thiserror::Error)]
#[error("reading the request body: {message}")]
pub struct BufferError {
    pub fault: ClientFault,
    message: String,
}

impl RequestBody {
    /// Buffers `body` when it has a known length of at most `limit` bytes
    /// and `replay` is wanted; anything else streams. `stall` bounds each
    /// wait for the client's bytes.
    pub async fn prepare(
        body: Incoming,
        limit: u64,
        replay: bool,
        stall: Duration,
    ) -> Result<Self, BufferError> {
        if body.is_end_stream() {
            return Ok(RequestBody::Buffered(Bytes::new()));
        }
        let body = ClientBody::new(body, stall);
        let watch = Arc::clone(body.watch());
        match body.size_hint().exact() {
            Some(len) if replay && len <= limit => {
                let collected =
                    Limited::new(body, limit as usize)
                        .collect()
                        .await
                        .map_err(|e| BufferError {
                            // The length was checked: only the client's side can fail here.
                            fault: watch.fault().unwrap_or(ClientFault::Malformed),
                            message: e.to_string(),
                        })?;
                Ok(RequestBody::Buffered(collected.to_bytes()))
            }
            _ => Ok(RequestBody::Streaming {
                body: Some(body),
                returned: None,
                watch,
            }),
        }
    }

    /// How the client's side of the body failed, if it did.
    pub fn client_fault(&self) -> Option<ClientFault> {
        match self {
            RequestBody::Buffered(_) => None,
            RequestBody::Streaming { watch, .. } => watch.fault(),
        }
    }

    /// True while an attempt's body waits for the client's next bytes.
    pub fn waiting_on_client(&self) -> bool {
        match self {
            RequestBody::Buffered(_) => false,
            RequestBody::Streaming { watch, .. } => watch.waiting_on_client(),
        }
    }

    /// True when every attempt can send the whole body again.
    pub fn is_replayable(&self) -> bool {
        matches!(self, RequestBody::Buffered(_))
    }

    /// The body for the next attempt, or `None` when a streaming body has
    /// already been sent.
    pub fn next_attempt(&mut self) -> Option<UpstreamBody> {
        match self {
            RequestBody::Buffered(bytes) => Some(UpstreamBody::Full(Some(bytes.clone()))),
            RequestBody::Streaming { body, returned, .. } => {
                let inner = body.take().or_else(|| returned.take()?.try_recv().ok())?;
                let (tx, rx) = oneshot::channel();
                *returned = Some(rx);
                Some(UpstreamBody::Streaming(Reclaimable {
                    inner: Some(inner),
                    polled: false,
                    give_back: Some(tx),
                }))
            }
        }
    }

    /// True when the last attempt's body came back unsent (or never left).
    pub fn can_resend(&mut self) -> bool {
        match self {
            RequestBody::Buffered(_) => true,
            RequestBody::Streaming { body, returned, .. } => {
                if body.is_none() {
                    *body = returned.take().and_then(|mut rx| rx.try_recv().ok());
                }
                body.is_some()
            }
        }
    }
}

/// A streaming body that returns itself if dropped before its first poll.
#[derive(Debug)]
pub struct Reclaimable {
    inner: Option<ClientBody>,
    /// Set by the first `poll_frame`: from then on bytes may have left.
    polled: bool,
    give_back: Option<oneshot::Sender<ClientBody>>,
}

impl Drop for Reclaimable {
    fn drop(&mut self) {
        if !self.polled {
            if let (Some(body), Some(tx)) = (self.inner.take(), self.give_back.take()) {
                let _ = tx.send(body);
            }
        }
    }
}

/// The body of one upstream attempt.
#[derive(Debug)]
pub enum UpstreamBody {
    Full(Option<Bytes>),
    Streaming(Reclaimable),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Full(bytes) => Poll::Ready(
                bytes
                    .take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            UpstreamBody::Streaming(r) => {
                r.polled = true;
                match r.inner.as_mut() {
                    Some(inner) => Pin::new(inner).poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            UpstreamBody::Streaming(r) => r.inner.as_ref().is_none_or(|b| b.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            UpstreamBody::Streaming(r) => r
                .inner
                .as_ref()
                .map_or(SizeHint::with_exact(0), |b| b.size_hint()),
        }
    }
}

/// A backend's response body on its way to the client, each wait for its
/// next bytes bounded by `timeouts.backend_body`.
#[derive(Debug)]
pub struct RelayedBody {
    body: Incoming,
    /// Keeps the backend's in-flight count up until the last byte
    /// (least_connections counts streaming), and names the backend a stall
    /// is charged to.
    in_flight: InFlight,
    /// `timeouts.backend_body` of the request's snapshot.
    limit: Duration,
    /// Counts the current wait for the backend.
    stall: Stall,
    /// The request's method and path, for the log line of a stall or a break.
    method: Method,
    path: String,
    /// Whose current snapshot judges the passive-health failure of a stall or a break.
    rt: Arc<Runtime>,
}

/// The error a response body cut for a stalled backend ends with: hyper's
/// server then closes an HTTP/1 connection (the message stays visibly
/// incomplete) or resets an HTTP/2 stream.
#[derive(Debug, thiserror::Error)]
#[error("the backend sent no response body bytes for {0:?}")]
pub struct BackendStalled(Duration);

impl RelayedBody {
    pub fn new(
        body: Incoming,
        in_flight: InFlight,
        limit: Duration,
        method: Method,
        path: String,
        rt: Arc<Runtime>,
    ) -> Self {
        RelayedBody {
            body,
            in_flight,
            limit,
            stall: Stall::default(),
            method,
            path,
            rt,
        }
    }
}

impl Body for RelayedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        let limit = this.limit;
        match this.stall.poll(cx, polled, || limit) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                let state = this.in_flight.state();
                crate::core::passive::backend_stalled(
                    &this.rt,
                    state,
                    &this.method,
                    &this.path,
                    limit,
                );
                Poll::Ready(Some(Err(Box::new(BackendStalled(limit)))))
            }
            Poll::Ready(Some(Some(Err(e)))) => {
                // Not the backend's doing: lb gave up on the request body
                // (the client's upload failed) or dropped the exchange.
                if !(e.is_user() || e.is_body_write_aborted() || e.is_canceled()) {
                    let state = this.in_flight.state();
                    crate::core::passive::backend_broke(
                        &this.rt,
                        state,
                        &this.method,
                        &this.path,
                        &e,
                    );
                }
                Poll::Ready(Some(Err(BoxError::from(e))))
            }
            Poll::Ready(Some(frame)) => Poll::Ready(frame.map(|f| f.map_err(BoxError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What lb answers the client with.
#[derive(Debug)]
pub enum ResponseBody {
    /// A backend's body, streamed.
    Upstream(RelayedBody),
    /// lb's own short answer (errors).
    Text(Option<Bytes>),
}

impl ResponseBody {
    pub fn text(s: impl Into<Bytes>) -> Self {
        ResponseBody::Text(Some(s.into()))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Upstream(body) => Pin::new(body).poll_frame(cx),
            ResponseBody::Text(t) => Poll::Ready(t.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(body) => body.is_end_stream(),
            ResponseBody::Text(t) => t.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(body) => body.size_hint(),
            ResponseBody::Text(t) => SizeHint::with_exact(t.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
