//! Thread-per-core serving: `--workers N` OS threads, each running its own
//! `current_thread` tokio runtime.
//!
//! A worker owns everything a client connection touches on the hot path:
//! its own `SO_REUSEPORT` listening socket (the kernel spreads new
//! connections over the workers), the connection tasks, and its own upstream
//! connection pools (see [`crate::runtime::Snapshot::clients`] and
//! [`crate::fast`]'s pool), so a request never waits on a lock or wakes
//! another thread. What the workers share is lock-free: the config snapshot
//! (`ArcSwap`), backend state, selectors and the retry budget, all in
//! [`crate::runtime::Runtime`]. Health checks and the reloader run once, on
//! the runtime that called [`crate::Lb::start`].

use std::io;
use std::num::NonZeroUsize;

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
