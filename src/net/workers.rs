//! Thread-per-core serving: `--workers N` OS threads, each running its own
//! `current_thread` tokio runtime.
//!
//! A worker owns everything a client connection touches on the hot path:
//! its own `SO_REUSEPORT` listening socket (the kernel spreads new
//! connections over the workers), the connection tasks, and its own upstream
//! connection pools (see [`crate::core::runtime::Snapshot::clients`] and
//! [`crate::http::fast`]'s pool), so a request never waits on a lock or wakes
//! another thread. What the workers share is lock-free: the config snapshot
//! (`ArcSwap`), backend state, selectors and the retry budget, all in
//! [`crate::core::runtime::Runtime`]. Health checks and the reloader run once, on
//! the runtime that called [`crate::Lb::start`].

use std::io;
use std::num::NonZeroUsize;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The running worker threads. Dropping this stops them: each runtime is
/// dropped with every task still on it.
#[derive(Debug)]
pub struct Workers {
    /// Where work is spawned onto each worker, by worker index.
    handles: Vec<Handle>,
    /// Held only to be dropped: a worker's thread ends when its sender goes.
    _stop: Vec<oneshot::Sender<()>>,
}

/// The default worker count: one per core lb may run on.
pub fn default_count() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

impl Workers {
    /// Starts `n` worker threads and waits until each runtime is up.
    pub fn start(n: NonZeroUsize) -> io::Result<Workers> {
        let mut handles = Vec::with_capacity(n.get());
        let mut stops = Vec::with_capacity(n.get());
        for i in 0..n.get() {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("lb-worker-{i}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(runtime.handle().clone()));
                    runtime.spawn(tick());
                    runtime.block_on(async {
                        let _ = stop_rx.await;
                    });
                })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| io::Error::other("worker thread died while starting"))??;
            handles.push(handle);
            stops.push(stop_tx);
        }
        Ok(Workers {
            handles,
            _stop: stops,
        })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The runtime of each worker, by index.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

/// How often a worker's clock tick fires; request timeouts shorter than this
/// may still wake the driver early (harmless, only slower).
const TICK: Duration = Duration::from_secs(1);

/// Keeps a timer at most [`TICK`] away on the worker's runtime, and does the
/// worker's housekeeping: drops its cached snapshot handle and closes its
/// pooled upstream connections that idled out.
///
/// tokio's timer wakes its driver (an eventfd write, then a spurious
/// `epoll_wait` return) whenever a timer is set to fire before the one the
/// driver last went to sleep towards. A keep-alive connection sets its idle
/// timer and each request its timeout, so without a nearer timer a worker
/// that sleeps with no request in flight pays that wake-up on the next
/// request: about one request in six at 64 connections. With this tick the
/// driver always sleeps towards a deadline nearer than any request timeout.
async fn tick() {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        crate::core::runtime::forget_worker_snapshot();
        crate::http::fast::sweep_pool();
    }
}
