//! Body types on both sides of the proxy.
//!
//! * [`ClientBody`]: the client's body as it arrives, with a stall timer
//!   (`timeouts.client_body`) and a record of how it failed, so the retry
//!   loop can tell a client's fault from a backend's.
//! * [`RequestBody`]: what the client sent, either buffered (so a retry can
//!   replay the same bytes) or streaming (sent once, never buffered whole).
//! * [`UpstreamBody`]: the body of one attempt, handed to the HTTP client.
//!   A streaming body that the client drops without ever polling (the
//!   connect failed, so nothing was sent) is handed back for the next try;
//!   for an HTTP/2 pool, so is one already partly sent while what it sent
//!   fits `retry.buffer_body_limit` (kept as it went), so that a stream the
//!   backend refused unprocessed can go to another backend whole.
//! * [`ResponseBody`]: what the client gets: the backend's body streamed
//!   through ([`RelayedBody`]: holding the backend's in-flight slot until it
//!   ends, each wait for it bounded by `timeouts.backend_body`, and ended
//!   by lb when shutdown's grace period runs out while it waits), or a
//!   short text from lb itself.

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::HeaderValue;
use hyper::{HeaderMap, Method};
use tokio::sync::oneshot;

use crate::core::conns::GraceWaiter;
use crate::core::runtime::{PoolShared, Runtime};
use crate::core::state::InFlight;
use crate::http::client::multiplexed::StreamSlot;
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
    /// Held in memory, with the client's trailers if it sent any; every
    /// attempt sends a copy (a cheap `Bytes` clone).
    Buffered(Bytes, Option<HeaderMap>),
    /// Not yet read. `None` once an attempt has consumed it.
    Streaming {
        body: Option<Resumable>,
        /// Where an unpolled body comes back after a failed connect (and a
        /// partly sent one after a refused stream, see `keep`).
        returned: Option<oneshot::Receiver<Resumable>>,
        /// Outlives the body inside hyper's client: how it ended.
        watch: Arc<BodyWatch>,
        /// Up to how many bytes an attempt keeps what it sent, to give the
        /// body back after it was polled; 0: never (HTTP/1.1 pools).
        keep: u64,
    },
}

/// A streaming body between attempts: the client's body, and the frames
/// earlier attempts took from it, sent again first.
#[derive(Debug)]
pub struct Resumable {
    body: ClientBody,
    sent: VecDeque<Frame<Bytes>>,
}

/// A copy of a data or trailers frame.
fn copy_frame(frame: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    if let Some(data) = frame.data_ref() {
        return Some(Frame::data(data.clone()));
    }
    frame.trailers_ref().map(|t| Frame::trailers(t.clone()))
}

fn data_len(frames: &VecDeque<Frame<Bytes>>) -> u64 {
    frames
        .iter()
        .filter_map(Frame::data_ref)
        .map(|d| d.len() as u64)
        .sum()
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
            return Ok(RequestBody::Buffered(Bytes::new(), None));
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
                let trailers = collected.trailers().cloned();
                Ok(RequestBody::Buffered(collected.to_bytes(), trailers))
            }
            _ => Ok(RequestBody::Streaming {
                body: Some(Resumable {
                    body,
                    sent: VecDeque::new(),
                }),
                returned: None,
                watch,
                keep: 0,
            }),
        }
    }

    /// A streaming body's attempts keep up to `limit` bytes of what they
    /// send, so a stream refused unprocessed (HTTP/2 `REFUSED_STREAM`) can
    /// be sent again after it was polled.
    pub fn keep_for_refusals(&mut self, limit: u64) {
        if let RequestBody::Streaming { keep, .. } = self {
            *keep = limit;
        }
    }

    /// Waits (up to `within`) for the last attempt's streaming body to come
    /// back; true when it did (or the body is buffered).
    pub async fn reclaim(&mut self, within: Duration) -> bool {
        match self {
            RequestBody::Buffered(..) => true,
            RequestBody::Streaming { body, returned, .. } => {
                if body.is_none() {
                    if let Some(rx) = returned.take() {
                        *body = tokio::time::timeout(within, rx)
                            .await
                            .ok()
                            .and_then(Result::ok);
                    }
                }
                body.is_some()
            }
        }
    }

    /// How the client's side of the body failed, if it did.
    pub fn client_fault(&self) -> Option<ClientFault> {
        match self {
            RequestBody::Buffered(..) => None,
            RequestBody::Streaming { watch, .. } => watch.fault(),
        }
    }

    /// True while an attempt's body waits for the client's next bytes.
    pub fn waiting_on_client(&self) -> bool {
        match self {
            RequestBody::Buffered(..) => false,
            RequestBody::Streaming { watch, .. } => watch.waiting_on_client(),
        }
    }

    /// True when every attempt can send the whole body again.
    pub fn is_replayable(&self) -> bool {
        matches!(self, RequestBody::Buffered(..))
    }

    /// The body for the next attempt, or `None` when a streaming body has
    /// already been sent.
    pub fn next_attempt(&mut self) -> Option<UpstreamBody> {
        match self {
            RequestBody::Buffered(bytes, trailers) => {
                Some(UpstreamBody::Full(Some(bytes.clone()), trailers.clone()))
            }
            RequestBody::Streaming {
                body,
                returned,
                keep,
                ..
            } => {
                let Resumable { body: inner, sent } =
                    body.take().or_else(|| returned.take()?.try_recv().ok())?;
                let (tx, rx) = oneshot::channel();
                *returned = Some(rx);
                Some(UpstreamBody::Streaming(Reclaimable {
                    inner: Some(inner),
                    replay: sent,
                    polled: false,
                    kept: (*keep > 0).then(|| (VecDeque::new(), 0)),
                    keep: *keep,
                    give_back: Some(tx),
                }))
            }
        }
    }

    /// True when the last attempt's body came back unsent (or never left).
    pub fn can_resend(&mut self) -> bool {
        match self {
            RequestBody::Buffered(..) => true,
            RequestBody::Streaming { body, returned, .. } => {
                if body.is_none() {
                    *body = returned.take().and_then(|mut rx| rx.try_recv().ok());
                }
                body.is_some()
            }
        }
    }
}

/// A streaming body that returns itself if dropped before its first poll,
/// or, while what it sent is kept (see `keep`), after it.
#[derive(Debug)]
pub struct Reclaimable {
    inner: Option<ClientBody>,
    /// Frames an earlier attempt took from `inner`: sent first.
    replay: VecDeque<Frame<Bytes>>,
    /// Set by the first `poll_frame`: from then on bytes may have left.
    polled: bool,
    /// Copies of the frames this attempt sent and their data bytes, while
    /// those are at most `keep`; `None` past that (or when `keep` is 0).
    kept: Option<(VecDeque<Frame<Bytes>>, u64)>,
    keep: u64,
    give_back: Option<oneshot::Sender<Resumable>>,
}

impl Reclaimable {
    /// Notes `frame` as sent.
    fn sent(&mut self, frame: &Frame<Bytes>) {
        let Some((kept, bytes)) = &mut self.kept else {
            return;
        };
        let len = frame.data_ref().map_or(0, |d| d.len() as u64);
        match copy_frame(frame) {
            Some(copy) if *bytes + len <= self.keep => {
                *bytes += len;
                kept.push_back(copy);
            }
            _ => self.kept = None,
        }
    }
}

impl Drop for Reclaimable {
    fn drop(&mut self) {
        let sent = if self.polled {
            // What was sent, then what was still to be replayed.
            self.kept.take().map(|(mut kept, _)| {
                kept.extend(self.replay.drain(..));
                kept
            })
        } else {
            Some(std::mem::take(&mut self.replay))
        };
        if let (Some(sent), Some(body), Some(tx)) = (sent, self.inner.take(), self.give_back.take())
        {
            let _ = tx.send(Resumable { body, sent });
        }
    }
}

/// The body of one upstream attempt.
#[derive(Debug)]
pub enum UpstreamBody {
    /// A buffered body and the client's trailers.
    Full(Option<Bytes>, Option<HeaderMap>),
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
            UpstreamBody::Full(bytes, trailers) => {
                let frame = match bytes.take().filter(|b| !b.is_empty()) {
                    Some(b) => Some(Frame::data(b)),
                    None => trailers.take().map(Frame::trailers),
                };
                Poll::Ready(frame.map(Ok))
            }
            UpstreamBody::Streaming(r) => {
                r.polled = true;
                let frame = match r.replay.pop_front() {
                    Some(frame) => frame,
                    None => match r.inner.as_mut() {
                        Some(inner) => match Pin::new(inner).poll_frame(cx) {
                            Poll::Ready(Some(Ok(frame))) => frame,
                            other => return other,
                        },
                        None => return Poll::Ready(None),
                    },
                };
                r.sent(&frame);
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Full(b, trailers) => {
                b.as_ref().is_none_or(|b| b.is_empty()) && trailers.is_none()
            }
            UpstreamBody::Streaming(r) => {
                r.replay.is_empty() && r.inner.as_ref().is_none_or(|b| b.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Full(b, _) => {
                SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            UpstreamBody::Streaming(r) => {
                let inner = r
                    .inner
                    .as_ref()
                    .map_or(SizeHint::with_exact(0), |b| b.size_hint());
                if r.replay.is_empty() {
                    return inner;
                }
                let replay = data_len(&r.replay);
                let mut hint = SizeHint::new();
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + replay);
                }
                hint.set_lower(inner.lower() + replay);
                hint
            }
        }
    }
}

/// A backend's response body on its way to the client, each wait for its
/// next bytes bounded by `timeouts.backend_body`.
///
/// When shutdown's grace period runs out while it waits for the backend,
/// it ends at once: a gRPC call with trailers `grpc-status: 14`
/// (UNAVAILABLE) and `grpc-message: lb: shutting down`, which the client
/// reads as a clean end it may retry; any other body with an error, so
/// hyper resets the HTTP/2 stream or closes the HTTP/1 connection and the
/// client sees the body is incomplete.
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
    /// A gRPC call's pool, until its `grpc-status` is counted there (from
    /// the trailers; at the drop as `none` if none came).
    grpc: Option<Arc<PoolShared>>,
    /// Whether trailers lb adds reach the client (an HTTP/1.1 client gets
    /// only those its response declared): a gRPC call lb ends itself ends
    /// with its own status only then, else it is cut like any body.
    grpc_trailers_reach_client: bool,
    /// Woken when shutdown's grace runs out; made the first time the
    /// backend keeps this body waiting, so a body that never waits costs
    /// no allocation and no registration.
    grace_over: Option<GraceWaiter>,
    /// Set once lb ended the body itself (the grace ran out): nothing more
    /// is read from the backend.
    ended_by_lb: bool,
    /// The stream this body comes on, counted on its backend HTTP/2
    /// connection until the body is done.
    _stream: Option<StreamSlot>,
}

/// The error a non-gRPC response body still waiting on its backend ends
/// with when shutdown's grace runs out: hyper resets its HTTP/2 stream or
/// closes its HTTP/1 connection, so the client sees it incomplete.
#[derive(Debug, thiserror::Error)]
#[error("lb is shutting down: its grace period ran out")]
pub struct GraceRanOut;

/// The trailers a gRPC response body still waiting on its backend ends with
/// when shutdown's grace runs out: UNAVAILABLE, which clients may retry on
/// another lb.
fn shutting_down_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert(
        "grpc-status",
        HeaderValue::from(crate::http::grpc::UNAVAILABLE),
    );
    trailers.insert(
        "grpc-message",
        HeaderValue::from_static("lb: shutting down"),
    );
    trailers
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
            grpc: None,
            grpc_trailers_reach_client: false,
            grace_over: None,
            ended_by_lb: false,
            _stream: None,
        }
    }

    /// Keeps `stream` counted on its connection while this body lives.
    pub fn holding(mut self, stream: Option<StreamSlot>) -> Self {
        self._stream = stream;
        self
    }

    /// Counts the call's `grpc-status` in `pool` when its trailers pass;
    /// `trailers_reach_client`: whether trailers lb adds reach the client.
    pub fn counting_grpc(mut self, pool: Arc<PoolShared>, trailers_reach_client: bool) -> Self {
        self.grpc = Some(pool);
        self.grpc_trailers_reach_client = trailers_reach_client;
        self
    }

    /// True once shutdown's grace has run out; while it has not, makes sure
    /// `cx` is woken when it does. Called only while the backend keeps the
    /// body waiting.
    fn grace_ran_out(&mut self, cx: &mut Context<'_>) -> bool {
        let rt = &self.rt;
        let waiter = self.grace_over.get_or_insert_with(|| rt.grace.waiter());
        Pin::new(waiter).poll(cx).is_ready()
    }

    /// Ends the body for the end of shutdown's grace: a gRPC call still
    /// waiting for its status gets lb's when the client can read it
    /// (counted as the status its client got), anything else an error.
    fn end_for_shutdown(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.ended_by_lb = true;
        if self.grpc_trailers_reach_client {
            if let Some(pool) = self.grpc.take() {
                let trailers = shutting_down_trailers();
                pool.grpc
                    .count(trailers.get("grpc-status").map(HeaderValue::as_bytes));
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
        }
        Poll::Ready(Some(Err(Box::new(GraceRanOut))))
    }
}

impl Drop for RelayedBody {
    fn drop(&mut self) {
        if let Some(pool) = self.grpc.take() {
            pool.grpc.count(None);
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
        if this.ended_by_lb {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        let limit = this.limit;
        match this.stall.poll(cx, polled, || limit) {
            Poll::Pending if this.grace_ran_out(cx) => this.end_for_shutdown(),
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
            Poll::Ready(Some(frame)) => {
                if let (Some(Ok(f)), Some(_)) = (&frame, &this.grpc) {
                    if let Some(status) = f.trailers_ref().and_then(|t| t.get("grpc-status")) {
                        if let Some(pool) = this.grpc.take() {
                            pool.grpc.count(Some(status.as_bytes()));
                        }
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended_by_lb || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.ended_by_lb {
            return SizeHint::with_exact(0);
        }
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
