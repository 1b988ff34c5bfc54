//! `Upgrade` pass-through (WebSocket and the like) on HTTP/1.1.
//!
//! A request that asks for an upgrade (`Connection: upgrade` + `Upgrade`)
//! keeps both headers on its way to the backend (every other request loses
//! them, see `proxy`). When the backend answers 101, the retry loop hands
//! the response to [`relay`]: the client gets the 101 with the backend's
//! `Upgrade`/`Connection`, and once hyper has switched both connections a
//! task copies bytes both ways ([`crate::io::tunnel`], as `mode: tcp` does)
//! until both sides close, one fails, or no byte moved for
//! `timeouts.tcp_idle` (nginx's `proxy_read_timeout`, HAProxy's `timeout
//! tunnel`): a peer that vanished without a FIN releases the other.
//!
//! The relay task holds what the connection held: the client connection's
//! [`Hold`] (its `max_connections` slot and its shutdown drain receiver) and
//! the backend's `InFlight` (least_connections sees it). It holds no
//! snapshot, so reloads, even ones removing the backend, leave it alone.
//! Shutdown waits for relays like for any connection and, at the end of the
//! grace period, [`crate::core::conns::Grace::run_out`] ends them.

use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::upgrade::OnUpgrade;
use hyper::{Response, Version};
use hyper_util::rt::TokioIo;

use crate::core::runtime::Runtime;
use crate::core::state::InFlight;
use crate::http::body::ResponseBody;
use crate::io::tunnel::{copy_both_ways, Ended};

/// Keeps a client connection's resources (its `ConnectionCount` slot, its
/// drain receiver) alive while any of its clones exists. The server puts one
/// in the extensions of each upgrade request.
#[derive(Clone)]
pub struct Hold(pub Arc<dyn Any + Send + Sync>);

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hold")
    }
}

/// Whether the client asked to switch protocols: HTTP/1.1 with
/// `Connection: upgrade` and an `Upgrade` header.
pub fn requested(parts: &Parts) -> bool {
    parts.version == Version::HTTP_11
        && parts.headers.contains_key(header::UPGRADE)
        && parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Puts back the `Upgrade` header (taken from `original`) and
/// `Connection: upgrade` after hop-by-hop stripping.
pub fn restore_headers(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(header::UPGRADE, upgrade);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// One open upgraded connection in [`Upgrades::open`], for as long as this
/// lives.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Relaxed);
        Counted(Arc::clone(open))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Answers the client with the backend's 101 and bridges both connections
/// in a task of their own. `client` is the client request's pending
/// upgrade, `hold` its connection's resources.
pub fn relay(
    rt: &Runtime,
    idle: Duration,
    mut resp: Response<Incoming>,
    client: OnUpgrade,
    hold: Option<Hold>,
    in_flight: InFlight,
) -> Response<ResponseBody> {
    let upstream = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    let upgrade = parts.headers.get(header::UPGRADE).cloned();
    crate::http::proxy::strip_hop_by_hop(&mut parts.headers);
    if let Some(upgrade) = upgrade {
        restore_headers(&mut parts.headers, upgrade);
    }
    let open = Counted::new(&rt.upgrades.open);
    let grace_over = rt.grace.waiter();
    let clock = rt.clock;
    tokio::spawn(async move {
        // Dropped with the task, however it ends: the runtime dropping it at
        // shutdown included.
        let _guards = (hold, in_flight, open);
        let bridge = async {
            let (client, upstream) = match tokio::try_join!(client, upstream) {
                Ok(both) => both,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade did not complete");
                    return;
                }
            };
            let (client, upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            match copy_both_ways(client, upstream, None, clock, idle).await {
                Ended::Done { up, down } => {
                    tracing::debug!(up, down, "upgraded connection closed")
                }
                Ended::Idle => {
                    tracing::debug!(
                        "upgraded connection idle for {idle:?} (timeouts.tcp_idle): closed"
                    )
                }
                Ended::Error(e) => tracing::debug!(error = %e, "upgraded connection ended"),
                Ended::Shutdown => {}
            }
        };
        tokio::select! {
            () = bridge => {}
            () = grace_over => {
                tracing::debug!("closing an upgraded connection: shutdown grace period over");
            }
        }
    });
    Response::from_parts(parts, ResponseBody::Text(None))
}
