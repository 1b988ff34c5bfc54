//! `timeouts.client_send` for each HTTP/2 stream of a client connection.
//!
//! HTTP/2 flow control lets a client hold a stream without holding its
//! socket: with its window left at 0 (`SETTINGS_INITIAL_WINDOW_SIZE=0` and
//! no `WINDOW_UPDATE`) hyper waits for window above the socket, the
//! connection keeps answering the client's PINGs, and hyper never polls the
//! response body again. Neither the socket bound (`server::Watched`) nor a
//! timer inside the body can see that wait, and the backend request behind
//! the stream would be held for ever.
//!
//! So hyper runs every stream through [`StreamExecutor`], which wraps it in
//! a watchdog sharing a [`Progress`] with the stream's response body (handed
//! over as a task-local, since the body is created inside the stream's
//! task). The body ([`Pacer`]) notes when it has handed hyper a piece and
//! hyper has not come back for the next one: hyper is waiting for the
//! client's window. When one such wait lasts `timeouts.client_send`, the
//! watchdog drops the stream: hyper's h2 resets it (`RST_STREAM` `CANCEL`),
//! and the response body goes with it, which closes the backend connection
//! mid-body and frees its in-flight slot. The client's doing: nothing is
//! charged to the backend; it is counted in `lb_client_send_timeouts_total`.
//! The connection and its other streams go on.
//!
//! Pieces are at most [`PIECE`] bytes, so a client that keeps opening its
//! window, however slowly, makes progress at least once per piece; the
//! bound is on each wait, as on HTTP/1 (nginx's `send_timeout`, Envoy's
//! `stream_idle_timeout`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame};

use crate::core::runtime::Runtime;
use crate::io::stall::Stall;

/// The most a response body hands hyper at once on an HTTP/2 stream: one
/// frame at h2's default `SETTINGS_MAX_FRAME_SIZE`.
pub const PIECE: usize = 16 * 1024;

/// Response bytes one HTTP/2 stream may have queued in lb beyond what the
/// client's window let out (hyper's `max_send_buf_size`; its default is
/// 400 KiB). With `limits.h2_max_concurrent_streams` this bounds what one
/// connection holds in memory.
pub const MAX_SEND_BUF: usize = 64 * 1024;

tokio::task_local! {
    /// The [`Progress`] of the stream whose task is running.
    static STREAM: Arc<Progress>;
}

/// What a stream's response body tells its watchdog (both run in the
/// stream's task, one after the other).
#[derive(Debug, Default)]
pub struct Progress {
    /// hyper came back for more since the watchdog last looked: the client's
    /// window let the last piece out.
    moved: AtomicBool,
    /// The last piece handed to hyper waits for the client's window.
    waiting: AtomicBool,
    /// Set by lb's response body: whose `client_send` applies and who is
    /// counted. Unset (the watchdog does nothing) for anything else hyper
    /// spawns.
    bound: OnceLock<Bound>,
}

#[derive(Debug)]
struct Bound {
    runtime: Arc<Runtime>,
    /// For the log line.
    peer: SocketAddr,
}

/// The executor of lb's hyper server: every HTTP/2 stream runs in its own
/// task under the `client_send` watchdog (see the module doc).
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, stream: F) {
        tokio::spawn(watch(stream));
    }
}

/// Runs `stream` until it ends or keeps waiting for the client's window
/// for `timeouts.client_send`; then drops it, which resets it.
async fn watch<F: Future>(stream: F) {
    let progress = Arc::new(Progress::default());
    let mut stream = pin!(STREAM.scope(Arc::clone(&progress), stream));
    let mut stall = Stall::default();
    let cut = std::future::poll_fn(|cx| {
        if stream.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        let Some(bound) = progress.bound.get() else {
            return Poll::Pending;
        };
        let waiting = progress.waiting.load(Relaxed);
        if progress.moved.swap(false, Relaxed) || !waiting {
            // A new wait starts now, or none is going on (hyper is waiting
            // for the backend, whose bounds apply).
            stall.progressed();
        }
        if !waiting {
            return Poll::Pending;
        }
        let limit = || bound.runtime.worker_snapshot().config.timeouts.client_send;
        if stall.expired(cx, limit) {
            Poll::Ready(Some(bound))
        } else {
            Poll::Pending
        }
    })
    .await;
    if let Some(bound) = cut {
        let limit = bound.runtime.worker_snapshot().config.timeouts.client_send;
        tracing::debug!(peer = %bound.peer, "resetting an HTTP/2 stream whose client took no response bytes for {limit:?} (timeouts.client_send)");
        bound.runtime.metrics.client_send_timeout();
    }
}

/// The HTTP/2 side of a response body: cuts data into [`PIECE`]s and tells
/// the stream's watchdog when hyper waits for the client's window.
#[derive(Debug)]
pub struct Pacer {
    progress: Arc<Progress>,
    /// What is left of a data frame bigger than a piece.
    rest: Bytes,
}

impl Pacer {
    /// The pacer of the HTTP/2 stream whose task is running, bound to
    /// `runtime`'s `client_send`; `None` outside one (HTTP/1).
    pub fn for_current_stream(runtime: &Arc<Runtime>, peer: SocketAddr) -> Option<Pacer> {
        let progress = STREAM.try_with(Arc::clone).ok()?;
        let _ = progress.bound.set(Bound {
            runtime: Arc::clone(runtime),
            peer,
        });
        Some(Pacer {
            progress,
            rest: Bytes::new(),
        })
    }

    /// Bytes taken from the body and not yet handed to hyper.
    pub fn held(&self) -> usize {
        self.rest.len()
    }

    /// `body`'s next frame, at most a piece of data.
    pub fn poll_frame<B: Body<Data = Bytes>>(
        &mut self,
        body: Pin<&mut B>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        // hyper asks for more only once the last piece found window.
        self.progress.moved.store(true, Relaxed);
        let polled = if self.rest.is_empty() {
            body.poll_frame(cx).map(|frame| {
                frame.map(|frame| {
                    frame.map(|frame| match frame.into_data() {
                        Ok(data) => Frame::data(self.piece_of(data)),
                        Err(other) => other,
                    })
                })
            })
        } else {
            let rest = std::mem::take(&mut self.rest);
            Poll::Ready(Some(Ok(Frame::data(self.piece_of(rest)))))
        };
        let handed_data = matches!(&polled, Poll::Ready(Some(Ok(frame))) if frame.is_data());
        self.progress.waiting.store(handed_data, Relaxed);
        polled
    }

    /// The first piece of `data`, keeping the rest for the next polls.
    fn piece_of(&mut self, mut data: Bytes) -> Bytes {
        if data.len() > PIECE {
            self.rest = data.split_off(PIECE);
        }
        data
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use http_body_util::Full;

    use super::*;
    use crate::config::{Config, ContentHash};

    const PEER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        1,
    ));

    fn runtime() -> Arc<Runtime> {
        let yaml = b"timeouts:\n  client_send: 1s\nbackends:\n  - address: 127.0.0.1:9\n";
        let config = Config::parse(yaml, Path::new("test.yaml")).unwrap();
        Runtime::new(config, ContentHash::of(yaml))
    }

    fn cut_streams(rt: &Arc<Runtime>) -> bool {
        let text = crate::admin::exposition::render(rt);
        !text.contains("lb_client_send_timeouts_total 0")
    }

    /// A stream as hyper drives it: a piece, then hyper comes back for
    /// the next only after `window_opens_every` (the client's window).
    async fn stream(rt: Arc<Runtime>, len: usize, window_opens_every: Option<Duration>) -> usize {
        let mut pacer = Pacer::for_current_stream(&rt, PEER).expect("in a stream's task");
        let mut body = Full::new(Bytes::from(vec![b'x'; len]));
        let mut sent = 0;
        while let Some(frame) =
            std::future::poll_fn(|cx| pacer.poll_frame(Pin::new(&mut body), cx)).await
        {
            let data = frame.unwrap().into_data().unwrap();
            assert!(data.len() <= PIECE);
            sent += data.len();
            match window_opens_every {
                Some(every) => tokio::time::sleep(every).await,
                None => std::future::pending().await,
            }
        }
        sent
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_waiting_for_window_for_client_send_is_dropped() {
        let rt = runtime();
        let started = tokio::time::Instant::now();
        let never_opens = stream(Arc::clone(&rt), 40_000, None);
        tokio::time::timeout(Duration::from_secs(60), watch(never_opens))
            .await
            .expect("stream never cut");
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert!(cut_streams(&rt));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_whose_window_opens_in_time_runs_to_its_end() {
        let rt = runtime();
        let (done, sent) = tokio::sync::oneshot::channel();
        let len = 10 * PIECE + 1;
        // 11 pieces, 900 ms apart: 10 s in all, each wait under client_send.
        let stream = stream(Arc::clone(&rt), len, Some(Duration::from_millis(900)));
        watch(async move {
            let _ = done.send(stream.await);
        })
        .await;
        assert_eq!(sent.await.expect("stream dropped"), len);
        assert!(!cut_streams(&rt));
    }

    #[tokio::test(start_paused = true)]
    async fn a_future_without_a_pacer_is_never_cut() {
        let rt = runtime();
        let (done, finished) = tokio::sync::oneshot::channel();
        watch(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let _ = done.send(());
        })
        .await;
        assert!(finished.await.is_ok());
        assert!(!cut_streams(&rt));
    }
}
