//! Bounds on how long one party may keep lb waiting mid-exchange: the
//! client's request body (`timeouts.client_body`), the backend's response
//! body (`timeouts.backend_body`) and the client taking response bytes
//! (`timeouts.client_send`).
//!
//! A [`Stall`] counts one wait at a time: it is armed when a poll of the
//! watched I/O returns `Pending` and disarmed by the next progress, so the
//! limit is the longest pause between two steps, not a bound on the whole
//! transfer (nginx's `proxy_read_timeout` and `send_timeout` work the same
//! way). I/O that completes at once costs no clock reading and no timer.
//!
//! A write to a client is judged by whether the client took bytes, not by
//! the socket's writability: the kernel signals a full send buffer writable
//! only once a good part of it is free again (a third), so a client reading
//! slowly but steadily can leave a write pending far longer than it pauses.
//! When such a wait runs out, [`Stall::send_now`] tries the write once more
//! directly: any room the client made counts as progress.
//!
//! An HTTP/2 stream held by flow control waits above the socket: its
//! watchdog in [`crate::http::h2_stream`] counts that wait with a `Stall` too.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpStream;

/// A client stream lb can write to past tokio's readiness tracking, for
/// the last try of [`Stall::send_now`].
pub trait SendNow {
    /// Writes what fits of `bufs` now; `None` when nothing fits.
    fn send_now(&mut self, bufs: &[IoSlice<'_>]) -> Option<io::Result<usize>>;
}

impl SendNow for TcpStream {
    fn send_now(&mut self, bufs: &[IoSlice<'_>]) -> Option<io::Result<usize>> {
        match socket2::SockRef::from(&*self).send_vectored(bufs) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            sent => Some(sent),
        }
    }
}
use tokio::time::{Instant, Sleep};

impl SendNow for tokio_rustls::server::TlsStream<TcpStream> {
    /// What is already encrypted goes to the socket first, directly; then
    /// what fits of `bufs` is taken into the TLS session's buffer. `None`
    /// when the socket took nothing and the session's buffer is full.
    fn send_now(&mut self, bufs: &[IoSlice<'_>]) -> Option<io::Result<usize>> {
        use std::io::Write;
        let (tcp, session) = self.get_mut();
        while session.wants_write() {
            match session.write_tls(&mut Direct(tcp)) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Some(Err(e)),
            }
        }
        // The session takes plaintext while its encrypted backlog is under
        // its limit: room the client made above shows here.
        match session.writer().write_vectored(bufs) {
            Ok(0) => None,
            Ok(n) => Some(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// A socket written past tokio's readiness tracking.
struct Direct<'a>(&'a TcpStream);

impl std::io::Write for Direct<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        socket2::SockRef::from(self.0).send(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One bounded wait at a time (see the module doc).
#[derive(Debug, Default)]
pub struct Stall {
    /// Allocated on the first wait only: most exchanges never wait.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` counts the current wait (it is re-armed per wait).
    armed: bool,
}

impl Stall {
    /// The watched I/O made progress: the next wait starts a new count.
    pub(crate) fn progressed(&mut self) {
        self.armed = false;
    }

    /// The watched I/O is pending: true once this wait has lasted `limit`
    /// (read only when a new wait begins). Otherwise the timer wakes `cx`
    /// when it would.
    pub(crate) fn expired(
        &mut self,
        cx: &mut Context<'_>,
        limit: impl FnOnce() -> Duration,
    ) -> bool {
        if !self.armed {
            let deadline = Instant::now() + limit();
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
        }
        self.timer
            .as_mut()
            .is_some_and(|timer| timer.as_mut().poll(cx).is_ready())
    }

    /// One poll of the watched I/O, judged: its result when ready (progress),
    /// `Ready(None)` once the wait it is in has lasted `limit`.
    pub fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<T>,
        limit: impl FnOnce() -> Duration,
    ) -> Poll<Option<T>> {
        match polled {
            Poll::Ready(out) => {
                self.progressed();
                Poll::Ready(Some(out))
            }
            Poll::Pending if self.expired(cx, limit) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    /// After a wait for a client to take bytes ran out: writes what fits of
    /// `bufs` to `stream` now, past tokio's readiness tracking (see the
    /// module doc). `None` when the client made no room at all: a stall.
    pub fn send_now<S: SendNow + ?Sized>(
        &mut self,
        stream: &mut S,
        bufs: &[IoSlice<'_>],
    ) -> Option<io::Result<usize>> {
        let sent = stream.send_now(bufs)?;
        self.progressed();
        Some(sent)
    }

    /// `io`, unless it keeps lb waiting for `limit` (then `None`).
    pub async fn bound<F: Future>(&mut self, limit: Duration, io: F) -> Option<F::Output> {
        let mut io = pin!(io);
        std::future::poll_fn(|cx| {
            let polled = io.as_mut().poll(cx);
            self.poll(cx, polled, || limit)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bounds_each_wait_not_the_whole_transfer() {
        let mut stall = Stall::default();
        let limit = Duration::from_millis(100);
        // Ready at once: no timer at all.
        assert_eq!(stall.bound(limit, async { 1 }).await, Some(1));
        assert!(stall.timer.is_none());
        // Three waits of 80 ms each: 240 ms in all, none over the limit.
        for _ in 0..3 {
            let step = tokio::time::sleep(Duration::from_millis(80));
            assert_eq!(stall.bound(limit, step).await, Some(()));
        }
        // One wait past the limit.
        let long = tokio::time::sleep(Duration::from_millis(150));
        assert_eq!(stall.bound(limit, long).await, None);
    }
}
