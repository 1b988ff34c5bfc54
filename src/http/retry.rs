//! The one place a request is sent upstream: pick a backend, send, judge the
//! outcome, and maybe try the next backend.
//!
//! Rules (see `RetryPolicy` for the knobs):
//! * a connect failure is retried whatever the method: nothing was sent;
//! * after the request was sent (reset, timeout, retryable status) only
//!   idempotent methods whose body can be replayed are retried, so a POST
//!   that reached a backend never reaches a second one;
//! * a retry goes to an available backend this request has not tried, chosen
//!   by the configured strategy;
//! * every retry spends a token from the [`RetryBudget`], so a sick pool is
//!   not hit by a retry storm;
//! * when every attempt fails the client gets the last backend's own
//!   retryable response, or 504 after a timeout, or 502;
//! * a connect that fails on lb's own shortage ([`crate::obs::local`]: its fd
//!   limit…) ends the loop at once with 503, charging no backend.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::http::uri::{Scheme, Uri};
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Version};
use tokio::time::{timeout_at, Instant};

use crate::config::{BackendAddr, RetryPolicy, Strategy};
use crate::core::failure::FailureKind;
use crate::core::passive::note_failure;
use crate::core::runtime::{Pool, Runtime, Snapshot};
use crate::core::selection::Steer;
use crate::core::state::InFlight;
use crate::http::body::{ClientFault, RelayedBody, RequestBody, ResponseBody, UpstreamBody};
use crate::http::client::multiplexed::{self, StreamSlot};
use crate::http::client::{self, Stale};
use crate::http::upgrade::Hold;
use crate::obs::local::Op;
use crate::obs::metrics::{AttemptOutcome, RetryReason};

/// How long a refused HTTP/2 stream's body may take to come back from the
/// task that was sending it (it ends on the reset: microseconds at rest).
const RECLAIM_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Methods that may be sent twice (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// One protocol's way of carrying attempts to backends: the hyper path
/// ([`HyperAttempts`]) and the HTTP/1 fast path implement it, and [`run`]
/// makes every decision for both (selection, budget, timeouts, passive
/// health, metrics, what is retried, what the client is told).
pub(crate) trait Attempts {
    /// A backend's response head (and whatever carries its body).
    type Response;

    /// Readies the request body for one more attempt; false when a
    /// streaming body has already been sent and cannot go again.
    fn next_attempt(&mut self) -> bool;

    /// Sends the attempt readied by `next_attempt` to backend `index` of
    /// `snap` and waits for its response head.
    fn send(
        &mut self,
        snap: &Snapshot,
        pool: &Pool,
        index: usize,
    ) -> impl std::future::Future<Output = Result<Self::Response, (FailureKind, String)>> + Send;

    fn status(response: &Self::Response) -> StatusCode;

    /// True when every attempt can send the whole body again.
    fn is_replayable(&self) -> bool;

    /// True when the last attempt's body came back unsent (or never left).
    fn can_resend(&mut self) -> bool;

    /// How the client's side of the body failed, if it did; `timed_out`
    /// says the attempt ran out of time (a stall on the client's side then
    /// is the client's fault).
    fn client_fault(&self, timed_out: bool) -> Option<ClientFault>;

    /// True when the client asked for a protocol switch (`Upgrade`), so a
    /// 101 is the answer, not a broken backend.
    fn wants_upgrade(&self) -> bool;

    /// True for a trailers-only gRPC answer with `grpc-status: 14`
    /// (UNAVAILABLE), which `retry_on: unavailable` retries.
    fn grpc_unavailable(_response: &Self::Response) -> bool {
        false
    }
}

/// What [`run`] concluded: the client gets one of these.
/// Where a request goes: the snapshot it loaded, the pool its route chose
/// in that snapshot, and what steers it to a backend of that pool.
#[derive(Clone, Copy)]
pub struct Call<'a> {
    pub snap: &'a Snapshot,
    pub pool: &'a Pool,
    pub steer: &'a Steer,
    /// The client's own deadline for the call (gRPC's `grpc-timeout`),
    /// which caps `timeouts.request` for it.
    pub deadline: Option<std::time::Duration>,
}

pub(crate) enum Outcome<R> {
    /// A backend's response, relayed; the guard keeps the backend counted
    /// in flight until the body is done; the index says which backend.
    Relay(R, InFlight, usize),
    /// A 101 to a request that asked for the switch: the connection is
    /// handed over to the upgraded protocol.
    Switched(R, InFlight, usize),
    /// lb's own short answer (no backend, 502, 504).
    Own(StatusCode, String),
    /// The client's body failed: answered without blaming a backend.
    ClientFault(ClientFault),
}

/// Why the previous attempt did not produce the answer.
enum Failed<R> {
    /// A transport failure on `backend`.
    Transport {
        kind: FailureKind,
        backend: usize,
        detail: String,
    },
    /// A retryable status from backend `.2`; kept to pass through if no
    /// retry succeeds.
    Response(R, InFlight, usize),
}

/// What the retry loop did with one request, for metrics and the access log.
#[derive(Debug, Default)]
pub struct Trace {
    /// The request's pool (index in the snapshot), once routed.
    pub pool: Option<usize>,
    /// The backend (index in the pool) whose response the client gets;
    /// `None` when lb answers itself.
    pub relayed: Option<usize>,
    /// Attempts sent upstream.
    pub attempts: u32,
    /// From the first attempt to the final response head.
    pub upstream: Option<std::time::Duration>,
    /// When the final response head was in (or the loop gave up), for the
    /// caller's own timing: one clock reading serves both.
    pub ended: Option<Instant>,
}

/// The backends one request has tried, by index: the first inline, since
/// most requests never retry (no allocation for them).
#[derive(Default)]
struct Tried {
    first: Option<usize>,
    more: Vec<usize>,
}

impl Tried {
    fn push(&mut self, index: usize) {
        if self.first.is_none() {
            self.first = Some(index);
        } else {
            self.more.push(index);
        }
    }

    fn contains(&self, index: &usize) -> bool {
        self.first == Some(*index) || self.more.contains(index)
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }
}

/// Whether a failed attempt may be tried again (the policy, nothing else).
fn may_retry(
    kind: FailureKind,
    retry_on: &crate::config::RetryOn,
    idempotent: bool,
    replayable: bool,
    can_resend: impl FnOnce() -> bool,
) -> bool {
    match kind {
        FailureKind::Connect => retry_on.connect_failure && can_resend(),
        FailureKind::Reset => retry_on.reset && idempotent && replayable,
        // Never processed (RFC 9113 §8.7): any method, if the body can go again.
        FailureKind::Refused => replayable || can_resend(),
        FailureKind::Timeout => retry_on.timeout && idempotent && replayable,
        FailureKind::Protocol | FailureKind::Local(_) => false,
    }
}

/// What the client is told when the last attempt failed in transit.
fn final_status(kind: FailureKind) -> (StatusCode, &'static str) {
    match kind {
        FailureKind::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timed out"),
        FailureKind::Connect => (StatusCode::BAD_GATEWAY, "unreachable"),
        FailureKind::Reset => (StatusCode::BAD_GATEWAY, "failed"),
        FailureKind::Refused => (StatusCode::BAD_GATEWAY, "refused the stream"),
        FailureKind::Protocol => (StatusCode::BAD_GATEWAY, "broke the protocol"),
        FailureKind::Local(_) => (StatusCode::SERVICE_UNAVAILABLE, "hit a local shortage"),
    }
}

const NO_BACKEND: &str = "lb: no healthy backend available\n";

/// The 503 when no backend may be tried, with the health checker's
/// reason when it holds the whole pool down: a newcomer's wrong
/// `health_check.path` explains itself to the first `curl`.
fn no_backend(pool: &Pool) -> String {
    match pool.shared.down.load().as_deref() {
        Some(why) => format!("lb: no healthy backend available: {why}\n"),
        None => NO_BACKEND.to_owned(),
    }
}

/// Sends the request (head already rewritten by the proxy) to the pool,
/// retrying per the snapshot's policy (`steer` carries its hash key and
/// affinity cookie), and notes in `trace` what it did.
pub async fn forward(
    rt: &Arc<Runtime>,
    call: Call<'_>,
    mut parts: Parts,
    body: RequestBody,
    trace: &mut Trace,
) -> Response<ResponseBody> {
    let method = parts.method.clone();
    let path = parts.uri.path().to_owned();
    // The proxy kept `Upgrade` only on requests that asked for one.
    let upgrade = parts
        .headers
        .contains_key(hyper::header::UPGRADE)
        .then(|| parts.extensions.remove::<OnUpgrade>())
        .flatten();
    let hold = parts.extensions.remove::<Hold>();
    let Call { snap, .. } = call;
    let backend_body = snap.config.timeouts.backend_body;
    // hyper's HTTP/1 server sends only the trailers a `Trailer` header
    // declares; an HTTP/2 backend declares none (gRPC's come unannounced).
    let declare_trailers = call.pool.config.protocol.may_be_http2()
        && parts.version <= Version::HTTP_11
        && parts.headers.contains_key(hyper::header::TE);
    // An HTTP/2 client gets every trailer; an HTTP/1.1 one only those the
    // `Trailer` header declared.
    let client_speaks_h2 = parts.version >= Version::HTTP_2;
    let grpc = crate::http::grpc::is_grpc(&parts.headers).then(|| Arc::clone(&call.pool.shared));
    let mut attempts = HyperAttempts {
        upgrade: upgrade.is_some(),
        http2: call.pool.config.protocol.is_http2(),
        parts,
        body,
        pending: None,
    };
    match run(rt, call, &method, &path, &mut attempts, trace).await {
        Outcome::Relay((resp, stream), in_flight, index) => {
            // A gRPC call's status: in the head of a trailers-only answer,
            // else in the trailers at the body's end.
            let grpc = grpc.and_then(|pool| match resp.headers().get("grpc-status") {
                Some(status) => {
                    pool.grpc.count(Some(status.as_bytes()));
                    None
                }
                None => Some(pool),
            });
            let relayed = |body, grpc_trailers_declared: bool| {
                let body =
                    RelayedBody::new(body, in_flight, backend_body, method, path, Arc::clone(rt))
                        .holding(stream);
                match grpc {
                    Some(pool) => {
                        body.counting_grpc(pool, client_speaks_h2 || grpc_trailers_declared)
                    }
                    None => body,
                }
            };
            pass_through(resp, relayed, index, declare_trailers)
        }
        Outcome::Switched((resp, _), in_flight, index) => {
            let Some(client) = upgrade else {
                // wants_upgrade() said so: not reached.
                return text(StatusCode::BAD_GATEWAY, "lb: 502 Bad Gateway\n".to_owned());
            };
            let idle = snap.config.timeouts.tcp_idle;
            let mut resp = crate::http::upgrade::relay(rt, idle, resp, client, hold, in_flight);
            // A handshake sets the affinity cookie like any response.
            resp.extensions_mut()
                .insert(crate::http::affinity::ServedBy(index));
            resp
        }
        Outcome::Own(status, body) => text(status, body),
        Outcome::ClientFault(fault) => client_fault(fault),
    }
}

/// The decisions of the retry loop, over either protocol's [`Attempts`];
/// `trace` notes what it did.
pub(crate) async fn run<A: Attempts>(
    rt: &Runtime,
    call: Call<'_>,
    method: &Method,
    path: &str,
    attempts: &mut A,
    trace: &mut Trace,
) -> Outcome<A::Response> {
    let Call {
        snap,
        pool,
        steer,
        deadline: client_deadline,
    } = call;
    let started = Instant::now();
    // `return` in the block ends the decisions; the trace is finished below.
    let outcome = async {
        let policy: &RetryPolicy = &pool.config.retry;
        let request_timeout = match client_deadline {
            Some(d) => snap.config.timeouts.request.min(d),
            None => snap.config.timeouts.request,
        };
        let deadline = started + request_timeout;
        let idempotent = is_idempotent(method);
        pool.shared.budget.deposit(&policy.budget);

        let mut tried = Tried::default();
        // Set by the first refused stream of this request (never again).
        let mut refused_on: Option<usize> = None;
        let mut refused_before = false;
        let mut last: Option<Failed<A::Response>> = None;
        // Only peak_ewma reads the latency estimate: the others skip the
        // clock readings and the shared writes of recording it.
        let record_latency = pool.config.strategy == Strategy::PeakEwma;
        for attempt in 0..policy.attempts.get() {
            if attempt > 0 && !pool.shared.budget.try_withdraw(&policy.budget) {
                tracing::debug!("retry budget exhausted");
                rt.metrics.budget_exhausted();
                break;
            }
            let now_ms = if attempt == 0 {
                rt.clock.ms_at(started)
            } else {
                rt.clock.now_ms()
            };
            let eligible =
                |i: usize| !tried.contains(&i) && pool.backends[i].state.is_available(now_ms);
            // A backend that refused a stream unprocessed may take it once
            // more when no other backend may (a pool of one), as Envoy and
            // Go's client do: the retry goes on another of its connections
            // or a new one.
            let refused_again = || {
                let again = refused_on.take()?;
                pool.backends[again].state.is_available(now_ms).then_some(again)
            };
            let Some(index) = pool.select_for(steer, &eligible).or_else(refused_again) else {
                if attempt == 0 {
                    return Outcome::Own(StatusCode::SERVICE_UNAVAILABLE, no_backend(pool));
                }
                break;
            };
            if !attempts.next_attempt() {
                break;
            }
            if let Some(previous) = &last {
                rt.metrics.retry(match previous {
                    Failed::Response(..) => RetryReason::Status,
                    Failed::Transport { kind, .. } => kind.retry_reason(),
                });
            }
            tried.push(index);
            trace.attempts += 1;
            let backend = &pool.backends[index];
            let in_flight = backend.state.start();
            let try_deadline = policy
                .per_try_timeout
                .map_or(deadline, |t| deadline.min(Instant::now() + t));
            let sent = if record_latency {
                Instant::now()
            } else {
                started
            };
            let outcome = timeout_at(try_deadline, attempts.send(snap, pool, index)).await;
            // peak_ewma's sample: time to the response head (a refused connect says nothing).
            if record_latency
                && !matches!(
                    &outcome,
                    Ok(Err((FailureKind::Connect | FailureKind::Local(_), _)))
                )
            {
                let decay = pool.config.steering.peak_ewma_decay;
                backend.state.record_latency(sent.elapsed(), decay);
            }
            // The client's side failed (bad framing, stall, gone): not the backend's doing.
            if let Some(fault) = attempts.client_fault(outcome.is_err()) {
                tracing::debug!(backend = %backend.addr, ?fault, "request body failed on the client's side");
                return Outcome::ClientFault(fault);
            }
            let metrics = &backend.state.metrics;
            let (kind, detail) = match outcome {
                Ok(Ok(resp)) if A::status(&resp) == StatusCode::SWITCHING_PROTOCOLS => {
                    if attempts.wants_upgrade() {
                        metrics.attempt(AttemptOutcome::Success);
                        backend.state.record_success();
                        trace.relayed = Some(index);
                        return Outcome::Switched(resp, in_flight, index);
                    }
                    // lb forwards `Upgrade` only when asked, so this switch was not.
                    (
                        FailureKind::Protocol,
                        "answered 101 to a request without Upgrade".to_owned(),
                    )
                }
                Ok(Ok(resp)) => {
                    let status = A::status(&resp);
                    if status.is_server_error() {
                        metrics.attempt(AttemptOutcome::ServerError);
                        note_failure(rt, pool, &backend.state, &format!("answered {status}"));
                    } else {
                        metrics.attempt(AttemptOutcome::Success);
                        backend.state.record_success();
                    }
                    trace.relayed = Some(index);
                    if policy.retry_on.status(status.as_u16()) && idempotent && attempts.is_replayable()
                    {
                        tracing::debug!(backend = %backend.addr, %status, attempt, "retryable status");
                        last = Some(Failed::Response(resp, in_flight, index));
                        continue;
                    }
                    // gRPC's UNAVAILABLE says the call may be tried again,
                    // whatever it is, if its body can be sent again whole.
                    if policy.retry_on.unavailable
                        && A::grpc_unavailable(&resp)
                        && (attempts.is_replayable() || attempts.can_resend())
                    {
                        tracing::debug!(backend = %backend.addr, attempt, "grpc-status 14 (UNAVAILABLE)");
                        last = Some(Failed::Response(resp, in_flight, index));
                        continue;
                    }
                    return Outcome::Relay(resp, in_flight, index);
                }
                Ok(Err(failure)) => failure,
                Err(_) => (
                    FailureKind::Timeout,
                    format!("no response within {:?}", Instant::now() - started),
                ),
            };
            drop(in_flight);
            if let FailureKind::Local(shortage) = kind {
                // lb's own shortage: the backend was never reached and is
                // not charged; another backend would fail the same way.
                trace.attempts -= 1;
                let what = format_args!("{method} {path}: connecting to {}: {detail}", backend.addr);
                rt.local_errors
                    .record(Op::Connect, shortage, rt.clock.now_ms(), what);
                return match last {
                    Some(Failed::Response(resp, in_flight, index)) => {
                        Outcome::Relay(resp, in_flight, index)
                    }
                    _ => {
                        trace.relayed = None;
                        Outcome::Own(
                            StatusCode::SERVICE_UNAVAILABLE,
                            crate::obs::local::EXHAUSTED_BODY.to_owned(),
                        )
                    }
                };
            }
            if kind == FailureKind::Refused && !refused_before {
                refused_before = true;
                refused_on = Some(index);
            }
            metrics.attempt(kind.outcome());
            trace.relayed = None;
            note_failure(rt, pool, &backend.state, &detail);
            tracing::debug!(backend = %backend.addr, ?kind, %detail, attempt, "attempt failed");
            let retry_allowed = may_retry(
                kind,
                &policy.retry_on,
                idempotent,
                attempts.is_replayable(),
                || attempts.can_resend(),
            );
            last = Some(Failed::Transport {
                kind,
                backend: index,
                detail,
            });
            if !retry_allowed || Instant::now() >= deadline {
                break;
            }
        }
        match last {
            Some(Failed::Response(resp, in_flight, index)) => Outcome::Relay(resp, in_flight, index),
            Some(Failed::Transport {
                kind,
                backend,
                detail,
            }) => {
                let addr = &pool.backends[backend].addr;
                let tries = tried.len();
                let (status, what) = final_status(kind);
                tracing::warn!(backend = %addr, %detail, tries, "{method} {path} {what}: {status}");
                // The client learns the status; addresses and errors stay in the log.
                let reason = status.canonical_reason().unwrap_or("");
                Outcome::Own(status, format!("lb: {} {reason}\n", status.as_u16()))
            }
            None => Outcome::Own(StatusCode::SERVICE_UNAVAILABLE, no_backend(pool)),
        }
    }
    .await;
    if trace.attempts > 0 {
        let ended = Instant::now();
        trace.upstream = Some(ended - started);
        trace.ended = Some(ended);
    }
    outcome
}

/// The hyper path's attempts: hyper's pooled client of this worker.
struct HyperAttempts {
    /// The client asked for a protocol switch.
    upgrade: bool,
    /// The pool speaks HTTP/2 only (`protocol: h2c` or `h2`).
    http2: bool,
    /// The rewritten request head, cloned into each request.
    parts: Parts,
    body: RequestBody,
    /// The body readied by `next_attempt`.
    pending: Option<UpstreamBody>,
}

impl HyperAttempts {
    /// The rewritten request for backend `index` of `pool`, with `body`.
    fn request(&self, pool: &Pool, index: usize, body: UpstreamBody) -> Request<UpstreamBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.parts.method.clone();
        *req.uri_mut() = upstream_uri(
            &self.parts.uri,
            &pool.backends[index].addr,
            pool.tls.is_some(),
        );
        *req.version_mut() = if self.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *req.headers_mut() = self.parts.headers.clone();
        req
    }
}

impl HyperAttempts {
    /// A stream the backend refused unprocessed: its body task gives the
    /// body back as it ends, which it does on the reset; wait for that, so
    /// the retry loop can send it again.
    async fn refused_back(&mut self, failure: (FailureKind, String)) -> (FailureKind, String) {
        if failure.0 == FailureKind::Refused {
            self.body.reclaim(RECLAIM_WITHIN).await;
        }
        failure
    }
}

impl HyperAttempts {
    /// [`Attempts::send`], unboxed.
    async fn attempt(
        &mut self,
        snap: &Snapshot,
        pool: &Pool,
        index: usize,
    ) -> Result<Answer, (FailureKind, String)> {
        let Some(body) = self.pending.take() else {
            return Err((FailureKind::Connect, "no body to send".to_owned()));
        };
        let connect_timeout = snap.config.timeouts.connect;
        let req = self.request(pool, index, body);
        let tls = pool.tls.as_ref();
        if self.http2 {
            let failure = match multiplexed::send(connect_timeout, tls, req).await {
                Ok((resp, slot)) => return Ok((resp, Some(slot))),
                Err(failure) => failure,
            };
            return Err(self.refused_back(failure).await);
        }
        let err = match client::of_this_worker(connect_timeout, tls, |c| c.request(req)).await {
            Ok(resp) => return Ok((resp, None)),
            Err(err) => err,
        };
        if client::classify(&err).0 == FailureKind::Refused {
            // `protocol: auto` and ALPN chose HTTP/2: a refused stream.
            return Err(self.refused_back(client::classify(&err)).await);
        }
        // A pooled connection the backend had closed (or was closing as it
        // was reused) failed before any byte of an answer: the request goes
        // once more, on a new connection, as the fast path does — whatever
        // the method if none of it was written, else only an idempotent one
        // (the backend may have seen it). Not an attempt of the retry loop:
        // the backend did nothing wrong.
        let resend = match client::stale(&err) {
            Some(Stale::Unsent) => true,
            Some(Stale::Unanswered) => is_idempotent(&self.parts.method),
            None => false,
        };
        let body = resend && self.body.client_fault().is_none();
        let Some(body) = body.then(|| self.body.next_attempt()).flatten() else {
            return Err(client::classify(&err));
        };
        tracing::debug!(backend = %pool.backends[index].addr, error = %client::root_cause(&err), "stale pooled connection: sent again on a new one");
        let req = self.request(pool, index, body);
        client::of_this_worker(connect_timeout, tls, |c| c.request_fresh(req))
            .await
            .map(|resp| (resp, None))
            .map_err(|e| client::classify(&e))
    }
}

/// A backend's response on the hyper path, and the stream it counts on
/// its HTTP/2 connection until its body ends.
type Answer = (Response<Incoming>, Option<StreamSlot>);

impl Attempts for HyperAttempts {
    type Response = Answer;

    fn next_attempt(&mut self) -> bool {
        self.pending = self.body.next_attempt();
        self.pending.is_some()
    }

    async fn send(
        &mut self,
        snap: &Snapshot,
        pool: &Pool,
        index: usize,
    ) -> Result<Answer, (FailureKind, String)> {
        // Boxed: an attempt's future is large (hyper's clients, the resend
        // after a stale connection), and each future holding it, up to the
        // request's, would be that much larger, moved whole at every level.
        Box::pin(self.attempt(snap, pool, index)).await
    }

    fn status((response, _): &Answer) -> StatusCode {
        response.status()
    }

    fn is_replayable(&self) -> bool {
        self.body.is_replayable()
    }

    fn can_resend(&mut self) -> bool {
        self.body.can_resend()
    }

    fn client_fault(&self, timed_out: bool) -> Option<ClientFault> {
        self.body.client_fault().or_else(|| {
            (timed_out && self.body.waiting_on_client()).then_some(ClientFault::Stalled)
        })
    }

    fn wants_upgrade(&self) -> bool {
        self.upgrade
    }

    fn grpc_unavailable((response, _): &Answer) -> bool {
        use hyper::body::Body as _;
        response.body().is_end_stream()
            && response
                .headers()
                .get("grpc-status")
                .is_some_and(|s| s.as_bytes() == b"14")
    }
}

/// The backend's URI for `original`'s target: `https` when the pool's
/// connections are TLS (what HTTP/2's `:scheme` tells the backend).
fn upstream_uri(original: &Uri, addr: &BackendAddr, tls: bool) -> Uri {
    let mut parts = hyper::http::uri::Parts::default();
    parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    // validate() parsed every address as an authority.
    parts.authority = addr.as_str().parse().ok();
    parts.path_and_query = Some(
        original
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
    );
    // Scheme, authority and path are all present and valid: this cannot fail.
    Uri::from_parts(parts).unwrap_or_default()
}

/// The trailers gRPC sends; declared to an HTTP/1.1 client of a gRPC call.
const GRPC_TRAILERS: &str = "grpc-status, grpc-message, grpc-status-details-bin";

/// `declare_trailers`: the client speaks HTTP/1.1, accepts trailers and
/// gets an HTTP/2 backend's answer: its `Trailer` header names what the
/// backend declared, and gRPC's own trailers for a gRPC answer.
fn pass_through(
    resp: Response<Incoming>,
    relayed: impl FnOnce(Incoming, bool) -> RelayedBody,
    index: usize,
    declare_trailers: bool,
) -> Response<ResponseBody> {
    use hyper::header::{HeaderValue, CONTENT_TYPE, TRAILER};
    let (mut parts, body) = resp.into_parts();
    // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length. hyper
    // decoded the chunked body; a kept Content-Length would cut it short.
    if parts.headers.contains_key(hyper::header::TRANSFER_ENCODING) {
        parts.headers.remove(hyper::header::CONTENT_LENGTH);
    }
    // Whether gRPC's trailers are among those declared.
    let mut grpc_declared = false;
    let declared = if declare_trailers && !hyper::body::Body::is_end_stream(&body) {
        let mut names: Vec<String> = parts
            .headers
            .get_all(TRAILER)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        let grpc = parts
            .headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| crate::http::grpc::is_grpc_content_type(v.as_bytes()));
        if grpc {
            names.push(GRPC_TRAILERS.to_owned());
            grpc_declared = true;
        }
        HeaderValue::from_str(&names.join(", "))
            .ok()
            .filter(|_| !names.is_empty())
    } else {
        None
    };
    crate::http::proxy::strip_hop_by_hop(&mut parts.headers);
    if let Some(names) = declared {
        parts.headers.insert(TRAILER, names);
    }
    parts
        .extensions
        .insert(crate::http::affinity::ServedBy(index));
    Response::from_parts(parts, ResponseBody::Upstream(relayed(body, grpc_declared)))
}

/// The answer to a request whose body failed on the client's side.
pub fn client_fault(fault: ClientFault) -> Response<ResponseBody> {
    let (status, message) = match fault {
        ClientFault::Malformed => (StatusCode::BAD_REQUEST, "lb: malformed request body\n"),
        ClientFault::Stalled => (StatusCode::REQUEST_TIMEOUT, "lb: request body timed out\n"),
        // Nobody is left to read this; it only ends the exchange.
        ClientFault::Aborted => (StatusCode::BAD_REQUEST, "lb: request body incomplete\n"),
    };
    let mut resp = text(status, message.to_owned());
    resp.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    resp
}

/// lb's own short answer.
pub fn text(status: StatusCode, body: String) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::text(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
