//! Body types on both sides of the proxy.
//!
//! * [`RequestBody`]: what the client sent, either buffered (so a retry can
//!   replay the same bytes) or streaming (sent once, never buffered whole).
//! * [`UpstreamBody`]: the body of one attempt, handed to the HTTP client.
//!   A streaming body that the client drops without ever polling (the
//!   connect failed, so nothing was sent) is handed back for the next try.
//! * [`ResponseBody`]: what the client gets: the backend's body streamed
//!   through (holding the backend's in-flight slot until it ends), or a
//!   short text from lb itself.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use tokio::sync::oneshot;

use crate::state::InFlight;

/// The client's request body, prepared for one or more attempts.
#[derive(Debug)]
pub enum RequestBody {
    /// Held in memory; every attempt sends a copy (a cheap `Bytes` clone).
    Buffered(Bytes),
    /// Not yet read. `None` once an attempt has consumed it.
    Streaming {
        body: Option<Incoming>,
        /// Where an unpolled body comes back after a failed connect.
        returned: Option<oneshot::Receiver<Incoming>>,
    },
}

/// The client went away or sent a broken body while it was being buffered.
#[derive(Debug, thiserror::Error)]
#[error("reading the request body: {0}")]
pub struct BufferError(String);

impl RequestBody {
    /// Buffers `body` when it has a known length of at most `limit` bytes
    /// and `replay` is wanted; anything else streams.
    pub async fn prepare(body: Incoming, limit: u64, replay: bool) -> Result<Self, BufferError> {
        if body.is_end_stream() {
            return Ok(RequestBody::Buffered(Bytes::new()));
        }
        match body.size_hint().exact() {
            Some(len) if replay && len <= limit => {
                let collected = Limited::new(body, limit as usize)
                    .collect()
                    .await
                    .map_err(|e| BufferError(e.to_string()))?;
                Ok(RequestBody::Buffered(collected.to_bytes()))
            }
            _ => Ok(RequestBody::Streaming {
                body: Some(body),
                returned: None,
            }),
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
            RequestBody::Streaming { body, returned } => {
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
            RequestBody::Streaming { body, returned } => {
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
    inner: Option<Incoming>,
    /// Set by the first `poll_frame`: from then on bytes may have left.
    polled: bool,
    give_back: Option<oneshot::Sender<Incoming>>,
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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

/// What lb answers the client with.
#[derive(Debug)]
pub enum ResponseBody {
    /// A backend's body, streamed; the guard keeps the backend's in-flight
    /// count up until the last byte (least_connections counts streaming).
    Upstream {
        body: Incoming,
        _in_flight: InFlight,
    },
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Upstream { body, .. } => Pin::new(body).poll_frame(cx),
            ResponseBody::Text(t) => Poll::Ready(t.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
            ResponseBody::Text(t) => t.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { body, .. } => body.size_hint(),
            ResponseBody::Text(t) => SizeHint::with_exact(t.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
