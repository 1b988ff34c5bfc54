//! gRPC and HTTP/2 to backends (issue 18, first slice): `protocol: h2c`
//! pools served by real tonic servers, called by real tonic clients (and by
//! HTTP/1.1 clients, translated), trailers and metadata relayed both ways,
//! lb's own answers in gRPC's terms, and a stream the backend refused
//! (`REFUSED_STREAM`) retried once elsewhere.
//!
//! No protoc: the one message type is a hand-written prost struct, and the
//! service is routed by hand over `tonic::server::Grpc`.

// tonic's API hands out `Result<_, Status>`, whose error is large.
#![allow(clippy::result_large_err)]

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use common::*;
use futures_util::{Stream, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use prost::Message as _;
use tonic::codec::ProstCodec;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The one message: some text and a number.
#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(uint32, tag = "2")]
    n: u32,
}

fn msg(text: &str, n: u32) -> Msg {
    Msg {
        text: text.to_owned(),
        n,
    }
}

type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

/// A closure as the tower service tonic's `Grpc` handlers take.
struct Svc<F>(F);

impl<F, Req, Fut, Resp> tower_service::Service<Req> for Svc<F>
where
    F: FnMut(Req) -> Fut,
    Fut: Future<Output = Result<Resp, Status>>,
{
    type Response = Resp;
    type Error = Status;
    type Future = Fut;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Fut {
        (self.0)(req)
    }
}

/// `test.Echo`: `Unary` (echo with the backend's name; `fail` answers
/// NOT_FOUND with metadata, `slow` never answers, `nap` answers after `n`
/// ms), `Count` (server streaming: `n` messages, then OK, or ABORTED when
/// the text is `then-fail`, or never an end when it is `forever`), `Chat`
/// (bidi: each message echoed as it comes).
#[derive(Clone)]
struct Echo {
    name: Arc<str>,
    hits: Arc<AtomicUsize>,
    /// `nap` calls running now, and the most that ever ran at once.
    napping: Arc<(AtomicUsize, AtomicUsize)>,
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

impl Echo {
    async fn unary(self, req: tonic::Request<Msg>) -> Result<tonic::Response<Msg>, Status> {
        let md = req.metadata().clone();
        let m = req.into_inner();
        match m.text.as_str() {
            "fail" => {
                let mut err_md = MetadataMap::new();
                err_md.insert_bin("x-err-bin", MetadataValue::from_bytes(&[0, 1, 2, 255]));
                return Err(Status::with_metadata(
                    Code::NotFound,
                    "no such thing: ü",
                    err_md,
                ));
            }
            "slow" => {
                tokio::time::sleep(Duration::from_secs(120)).await;
            }
            "nap" => {
                let (now, peak) = &*self.napping;
                peak.fetch_max(now.fetch_add(1, SeqCst) + 1, SeqCst);
                tokio::time::sleep(Duration::from_millis(m.n.into())).await;
                now.fetch_sub(1, SeqCst);
            }
            "busy-on-b1" if &*self.name == "b1" => {
                return Err(Status::unavailable("b1 is busy"));
            }
            _ => {}
        }
        let mut resp = tonic::Response::new(Msg {
            text: format!("{}: {}", self.name, m.text),
            n: m.n,
        });
        let out = resp.metadata_mut();
        out.insert("x-backend", self.name.parse().unwrap());
        if let Some(v) = md.get("x-req") {
            out.insert("x-echo", v.clone());
        }
        if let Some(v) = md.get_bin("x-req-bin") {
            out.insert_bin("x-echo-bin", v.clone());
        }
        if let Some(v) = md.get("te") {
            out.insert("x-saw-te", v.clone());
        }
        Ok(resp)
    }

    async fn count(self, req: tonic::Request<Msg>) -> Result<tonic::Response<MsgStream>, Status> {
        let m = req.into_inner();
        let items = futures_util::stream::iter((0..m.n).map(|i| Ok(msg("item", i))));
        let stream: MsgStream = match m.text.as_str() {
            "then-fail" => Box::pin(items.chain(futures_util::stream::once(async {
                Err(Status::aborted("stopped after the items"))
            }))),
            "forever" => Box::pin(items.chain(futures_util::stream::pending())),
            _ => Box::pin(items),
        };
        Ok(tonic::Response::new(stream))
    }

    async fn chat(
        self,
        req: tonic::Request<tonic::Streaming<Msg>>,
    ) -> Result<tonic::Response<MsgStream>, Status> {
        let stream = req
            .into_inner()
            .map(|m| m.map(|m| msg(&format!("echo {}", m.text), m.n)));
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            me.hits.fetch_add(1, SeqCst);
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<Msg, Msg>::default());
            let resp = match req.uri().path() {
                "/test.Echo/Unary" => grpc.unary(Svc(move |r| me.clone().unary(r)), req).await,
                "/test.Echo/Count" => {
                    grpc.server_streaming(Svc(move |r| me.clone().count(r)), req)
                        .await
                }
                "/test.Echo/Chat" => grpc.streaming(Svc(move |r| me.clone().chat(r)), req).await,
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(resp)
        })
    }
}

/// grpc.health.v1's messages, by hand.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

/// `grpc.health.v1.Health/Check`, answering what `status` holds; notes
/// the services it was asked about.
#[derive(Clone)]
struct Health {
    status: Arc<std::sync::atomic::AtomicI32>,
    asked: Arc<Mutex<Vec<String>>>,
}

impl tonic::server::NamedService for Health {
    const NAME: &'static str = "grpc.health.v1.Health";
}

impl tower_service::Service<http::Request<tonic::body::Body>> for Health {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let codec = ProstCodec::<HealthCheckResponse, HealthCheckRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            let check = move |r: tonic::Request<HealthCheckRequest>| {
                let me = me.clone();
                async move {
                    me.asked.lock().unwrap().push(r.into_inner().service);
                    let status = me.status.load(SeqCst);
                    Ok(tonic::Response::new(HealthCheckResponse { status }))
                }
            };
            Ok(grpc.unary(Svc(check), req).await)
        })
    }
}

/// A tonic server of [`Echo`] and [`Health`] on an ephemeral port (HTTP/2
/// only, as tonic serves by default).
struct GrpcBackend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    health: Health,
    /// TCP connections the server accepted.
    accepted: Arc<AtomicUsize>,
    /// `nap` calls running now, and the most that ever ran at once.
    napping: Arc<(AtomicUsize, AtomicUsize)>,
    /// Sent, tonic's graceful stop: GOAWAY on every connection, no more
    /// accepts, and the server returns once its connections have closed.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcBackend {
    async fn start(name: &str) -> GrpcBackend {
        Self::start_with(name, tonic::transport::Server::builder()).await
    }

    /// Started from `builder` (its HTTP/2 settings).
    async fn start_with(name: &str, mut builder: tonic::transport::Server) -> GrpcBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let napping = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let echo = Echo {
            name: Arc::from(name),
            hits: Arc::clone(&hits),
            napping: Arc::clone(&napping),
        };
        let health = Health {
            status: Arc::new(std::sync::atomic::AtomicI32::new(SERVING)),
            asked: Arc::default(),
        };
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&accepted);
        // The listener as tonic's `TcpIncoming` would serve it (no delay),
        // counting connections.
        let incoming = futures_util::stream::unfold(listener, move |l| {
            let counted = Arc::clone(&counted);
            async move {
                let accepted = l.accept().await.map(|(s, _)| {
                    counted.fetch_add(1, SeqCst);
                    let _ = s.set_nodelay(true);
                    s
                });
                Some((accepted, l))
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = health.clone();
        let task = tokio::spawn(async move {
            let _ = builder
                .add_service(echo)
                .add_service(served)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        GrpcBackend {
            addr,
            hits,
            health,
            accepted,
            napping,
            stop: Some(stop),
            task,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(SeqCst)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(SeqCst)
    }

    /// The most `nap` calls that ran at once.
    fn peak_naps(&self) -> usize {
        self.napping.1.load(SeqCst)
    }

    /// Tells the server to stop gracefully (tonic's `serve_with_shutdown`).
    fn begin_graceful_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A config whose one pool (protocol from the top-level default) is `addrs`.
fn h2c_yaml(addrs: &[SocketAddr], extra: &str) -> String {
    let mut s = String::from("protocol: h2c\nbackends:\n");
    for a in addrs {
        s.push_str(&format!("  - address: {a}\n"));
    }
    s.push_str(extra);
    s
}

/// Opens a bidi `Chat` call on `ch` with `first` already sent: the sender
/// for the rest of the request stream, and the answers.
async fn open_chat(
    ch: Channel,
    first: Msg,
) -> (tokio::sync::mpsc::Sender<Msg>, tonic::Streaming<Msg>) {
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    tx.send(first).await.unwrap();
    let codec = ProstCodec::<Msg, Msg>::default();
    let incoming = tokio::time::timeout(
        Duration::from_secs(WAIT),
        g.streaming(
            tonic::Request::new(outgoing),
            path("/test.Echo/Chat"),
            codec,
        ),
    )
    .await
    .expect("the stream starts in time")
    .expect("the stream starts")
    .into_inner();
    (tx, incoming)
}

async fn channel(t: &TestLb) -> Channel {
    Channel::from_shared(format!("http://{}", t.lb.local_addr()))
        .unwrap()
        .connect()
        .await
        .expect("connect to lb")
}

fn path(p: &'static str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::from_static(p)
}

async fn call_unary(
    ch: &Channel,
    req: tonic::Request<Msg>,
) -> Result<tonic::Response<Msg>, Status> {
    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    let codec = ProstCodec::<Msg, Msg>::default();
    let call = g.unary(req, path("/test.Echo/Unary"), codec);
    tokio::time::timeout(Duration::from_secs(WAIT), call)
        .await
        .expect("the call ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_call_with_metadata_both_ways() {
    let backend = GrpcBackend::start("b1").await;
    let t = TestLb::start(&h2c_yaml(&[backend.addr], "")).await;
    let ch = channel(&t).await;
    let mut req = tonic::Request::new(msg("hello", 7));
    req.metadata_mut().insert("x-req", "abc".parse().unwrap());
    req.metadata_mut()
        .insert_bin("x-req-bin", MetadataValue::from_bytes(&[0, 159, 146, 150]));
    let resp = call_unary(&ch, req).await.expect("the call succeeds");
    let md = resp.metadata().clone();
    assert_eq!(resp.into_inner(), msg("b1: hello", 7));
    assert_eq!(md.get("x-backend").unwrap(), "b1");
    assert_eq!(md.get("x-echo").unwrap(), "abc");
    assert_eq!(
        md.get_bin("x-echo-bin")
            .unwrap()
            .to_bytes()
            .unwrap()
            .as_ref(),
        &[0, 159, 146, 150]
    );
    // `TE: trailers` reached the backend.
    assert_eq!(md.get("x-saw-te").unwrap(), "trailers");
    assert_eq!(backend.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_status_message_and_metadata_are_relayed() {
    let backend = GrpcBackend::start("b1").await;
    let t = TestLb::start(&h2c_yaml(&[backend.addr], "")).await;
    let ch = channel(&t).await;
    // A trailers-only answer (the handler failed before any message).
    let status = call_unary(&ch, tonic::Request::new(msg("fail", 0)))
        .await
        .expect_err("the call fails");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "no such thing: ü");
    assert_eq!(
        status
            .metadata()
            .get_bin("x-err-bin")
            .unwrap()
            .to_bytes()
            .unwrap()
            .as_ref(),
        &[0, 1, 2, 255]
    );
    // Trailers after messages: the status arrives at the stream's end.
    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready().await.unwrap();
    let codec = ProstCodec::<Msg, Msg>::default();
    let resp = g
        .server_streaming(
            tonic::Request::new(msg("then-fail", 3)),
            path("/test.Echo/Count"),
            codec,
        )
        .await
        .expect("the stream starts");
    let mut stream = resp.into_inner();
    for i in 0..3 {
        assert_eq!(stream.message().await.unwrap(), Some(msg("item", i)));
    }
    let end = stream
        .message()
        .await
        .expect_err("the stream ends in an error");
    assert_eq!(end.code(), Code::Aborted);
    assert_eq!(end.message(), "stopped after the items");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streaming_relays_thousands_of_messages_in_order() {
    let backend = GrpcBackend::start("b1").await;
    let t = TestLb::start(&h2c_yaml(&[backend.addr], "")).await;
    let ch = channel(&t).await;
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.unwrap();
    const N: u32 = 2_000;
    let codec = ProstCodec::<Msg, Msg>::default();
    let resp = g
        .server_streaming(
            tonic::Request::new(msg("go", N)),
            path("/test.Echo/Count"),
            codec,
        )
        .await
        .expect("the stream starts");
    let mut stream = resp.into_inner();
    let mut next = 0;
    while let Some(m) = tokio::time::timeout(Duration::from_secs(WAIT), stream.message())
        .await
        .expect("a message or the end in time")
        .expect("no error")
    {
        assert_eq!(m, msg("item", next));
        next += 1;
    }
    assert_eq!(next, N);
    // The OK status came in the trailers.
    let trailers = stream.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_stream_answers_each_message_before_the_next_is_sent() {
    let backend = GrpcBackend::start("b1").await;
    let t = TestLb::start(&h2c_yaml(&[backend.addr], "")).await;
    let ch = channel(&t).await;
    let (tx, mut incoming) = open_chat(ch, msg("m", 0)).await;
    // Each answer comes while the request stream is still open: nothing
    // waits for the whole request body.
    for i in 0..20u32 {
        if i > 0 {
            tx.send(msg("m", i)).await.unwrap();
        }
        let got = tokio::time::timeout(Duration::from_secs(WAIT), incoming.message())
            .await
            .expect("the echo comes before the next message is sent")
            .unwrap();
        assert_eq!(got, Some(msg("echo m", i)));
    }
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(WAIT), incoming.message())
        .await
        .expect("the stream ends");
    assert_eq!(end.unwrap(), None);
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_answers_unavailable_when_no_backend_can_serve() {
    // Every backend down: connects refused.
    let (a, b) = (closed_port().await, closed_port().await);
    let t = TestLb::start(&h2c_yaml(&[a, b], "")).await;
    let ch = channel(&t).await;
    let status = call_unary(&ch, tonic::Request::new(msg("x", 1)))
        .await
        .expect_err("no backend answers");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().starts_with("lb: "), "{status:?}");

    // No healthy backend: the health check holds the only one down.
    let t = TestLb::start(&h2c_yaml(
        &[closed_port().await],
        "health_check:\n  interval: 100ms\n  timeout: 100ms\n  unhealthy_threshold: 1\n",
    ))
    .await;
    let ch = channel(&t).await;
    let mut last = None;
    eventually!(
        WAIT,
        {
            let status = call_unary(&ch, tonic::Request::new(msg("x", 1)))
                .await
                .expect_err("no backend answers");
            let held_down = status.code() == Code::Unavailable
                && status
                    .message()
                    .starts_with("lb: no healthy backend available");
            last.replace(status);
            held_down
        },
        "the health check holds the pool down: {last:?}"
    );

    let live = GrpcBackend::start("b1").await;

    // No route for the call.
    let t = TestLb::start(&format!(
        "pools:\n  grpc:\n    protocol: h2c\n    backends:\n      - address: {}\nroutes:\n  - path_prefix: /other.Service\n    pool: grpc\n",
        live.addr
    ))
    .await;
    let ch = channel(&t).await;
    let status = call_unary(&ch, tonic::Request::new(msg("x", 1)))
        .await
        .expect_err("no route");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "lb: 404 Not Found");
    assert_eq!(live.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_deadline_exceeded() {
    let backend = GrpcBackend::start("b1").await;
    let t = TestLb::start(&h2c_yaml(&[backend.addr], "timeouts:\n  request: 1s\n")).await;
    let ch = channel(&t).await;
    let status = call_unary(&ch, tonic::Request::new(msg("slow", 1)))
        .await
        .expect_err("lb gives up");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().starts_with("lb: 504"), "{status:?}");
}

/// A gRPC message framed for the wire: uncompressed, length-prefixed.
fn frame(m: &Msg) -> Bytes {
    let body = m.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Bytes::from(out)
}

fn unframe(bytes: &[u8]) -> Msg {
    assert!(bytes.len() >= 5, "a framed message: {bytes:?}");
    let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
    Msg::decode(&bytes[5..5 + len]).unwrap()
}

fn grpc_post(url: &str, m: &Msg) -> Request<Full<Bytes>> {
    let body = frame(m);
    Request::post(url)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("content-length", body.len())
        .body(Full::new(body))
        .unwrap()
}

/// A response with its body and trailers read whole.
async fn read_all(
    client: &TestClient,
    req: Request<Full<Bytes>>,
) -> (http::response::Parts, Bytes, Option<http::HeaderMap>) {
    let resp = tokio::time::timeout(Duration::from_secs(WAIT), client.request(req))
        .await
        .expect("answered in time")
        .expect("answered");
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("body read");
    let trailers = collected.trailers().cloned();
    (parts, collected.to_bytes(), trailers)
}

/// A unary call to `/test.Echo/Unary` through `t` by a plain HTTP client
/// (no gRPC library: what lb sends back is seen as it is), read whole.
async fn call_raw_unary(
    client: &TestClient,
    t: &TestLb,
    m: &Msg,
) -> (http::response::Parts, Bytes, Option<http::HeaderMap>) {
    read_all(client, grpc_post(&t.url("/test.Echo/Unary"), m)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_reaches_an_h2c_pool() {
    let backend = GrpcBackend::start("b1").await;
    let t = TestLb::start(&h2c_yaml(&[backend.addr], "")).await;
    let c = client();
    // A gRPC call over HTTP/1.1: the answer's status comes in chunked trailers.
    let (parts, body, trailers) = call_raw_unary(&c, &t, &msg("over h1", 3)).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["x-backend"], "b1");
    assert_eq!(unframe(&body), msg("b1: over h1", 3));
    let trailers = trailers.expect("trailers relayed to the HTTP/1.1 client");
    assert_eq!(trailers["grpc-status"], "0");
    // And again on the same connection, then a trailers-only error.
    let (parts, body, _) = call_raw_unary(&c, &t, &msg("fail", 0)).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["grpc-status"], "5");
    assert_eq!(parts.headers["grpc-message"], "no%20such%20thing:%20%C3%BC");
    assert!(body.is_empty());
    assert_eq!(backend.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_answers_to_http1_grpc_calls_are_grpc_answers_too() {
    let t = TestLb::start(&h2c_yaml(&[closed_port().await], "")).await;
    let (parts, body, _) = call_raw_unary(&client(), &t, &msg("x", 1)).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["content-type"], "application/grpc");
    assert_eq!(parts.headers["grpc-status"], "14");
    assert_eq!(parts.headers["grpc-message"], "lb: 502 Bad Gateway");
    assert!(body.is_empty());
    // The same on an HTTP/1.1 pool (the fast path hands gRPC calls over).
    let t = TestLb::start(&format!(
        "backends:\n  - address: {}\n",
        closed_port().await
    ))
    .await;
    let (parts, _, _) = call_raw_unary(&client(), &t, &msg("x", 1)).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["grpc-status"], "14");
}

/// What an `h2` backend saw of each request, and how it answers.
#[derive(Default)]
struct H2Seen {
    heads: Mutex<Vec<http::request::Parts>>,
    /// Each request's body and trailers, as they arrived.
    bodies: Mutex<Vec<(Vec<u8>, Option<http::HeaderMap>)>>,
    refused: AtomicUsize,
}

/// One stream of [`h2_backend`].
async fn h2_answer(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    refuse: bool,
    seen: Arc<H2Seen>,
) {
    if refuse {
        seen.refused.fetch_add(1, SeqCst);
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    }
    let (head, mut body) = req.into_parts();
    seen.heads.lock().unwrap().push(head);
    let mut bytes = Vec::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.ok().flatten();
    seen.bodies.lock().unwrap().push((bytes, trailers));
    let resp = http::Response::builder()
        .status(200)
        .header("x-from", "h2")
        .header("trailer", "x-trailer")
        .body(())
        .unwrap();
    let Ok(mut stream) = respond.send_response(resp, false) else {
        return;
    };
    let _ = stream.send_data(Bytes::from_static(b"ok"), false);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-trailer", "done".parse().unwrap());
    let _ = stream.send_trailers(trailers);
}

/// A raw HTTP/2 (h2 crate) backend: `refuse` resets every stream with
/// REFUSED_STREAM; otherwise it answers `ok` with a trailer.
async fn h2_backend(refuse: bool) -> (SocketAddr, Arc<H2Seen>) {
    h2_backend_refusing(move |_| refuse).await
}

/// [`h2_backend`], refusing the streams for whose number (from 0, over
/// all its connections) `refuse` says so.
async fn h2_backend_refusing(
    refuse: impl Fn(usize) -> bool + Clone + Send + Sync + 'static,
) -> (SocketAddr, Arc<H2Seen>) {
    let seen = Arc::new(H2Seen::default());
    let s = Arc::clone(&seen);
    let streams = Arc::new(AtomicUsize::new(0));
    let addr = raw_server(move |socket| {
        let seen = Arc::clone(&s);
        let (streams, refuse) = (Arc::clone(&streams), refuse.clone());
        async move {
            let Ok(mut conn) = h2::server::handshake(socket).await else {
                return;
            };
            // Each stream on a task of its own: the connection is driven
            // by `accept` alone.
            while let Some(Ok((req, respond))) = conn.accept().await {
                let refused = refuse(streams.fetch_add(1, SeqCst));
                tokio::spawn(h2_answer(req, respond, refused, Arc::clone(&seen)));
            }
        }
    })
    .await;
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_requests_are_translated_for_an_h2c_backend() {
    let (addr, seen) = h2_backend(false).await;
    let t = TestLb::start(&h2c_yaml(&[addr], "")).await;
    let req = Request::get(t.url("/plain?q=1"))
        .header("connection", "keep-alive, x-hop")
        .header("keep-alive", "timeout=5")
        .header("x-hop", "1")
        .header("te", "trailers")
        .header("x-kept", "yes")
        .body(Full::default())
        .unwrap();
    let (parts, body, trailers) = read_all(&client(), req).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["x-from"], "h2");
    assert_eq!(&body[..], b"ok");
    assert_eq!(trailers.expect("trailers")["x-trailer"], "done");
    let heads = seen.heads.lock().unwrap();
    let head = &heads[0];
    assert_eq!(head.version, http::Version::HTTP_2);
    assert_eq!(head.uri.path_and_query().unwrap(), "/plain?q=1");
    for gone in ["connection", "keep-alive", "x-hop"] {
        assert!(
            !head.headers.contains_key(gone),
            "{gone} forwarded: {:?}",
            head.headers
        );
    }
    assert_eq!(head.headers["te"], "trailers");
    assert_eq!(head.headers["x-kept"], "yes");
    assert!(head.headers.contains_key("x-forwarded-for"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_an_h2c_pool_is_refused() {
    let (addr, seen) = h2_backend(false).await;
    let t = TestLb::start(&h2c_yaml(&[addr], "")).await;
    let req = Request::get(t.url("/ws"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::default())
        .unwrap();
    let answer = send(&client(), req).await;
    assert_eq!(answer.status, 501);
    assert_eq!(
        answer.text(),
        "lb: protocol upgrades (WebSocket) are not supported to an h2c pool\n"
    );
    assert!(seen.heads.lock().unwrap().is_empty());
}

/// Retries for every refusal (no budget runs out), and a refusing backend
/// never ejected: it is charged for each refusal, and kept in so that it
/// is tried first.
const RETRY_EVERY_REFUSAL: &str = "retry:\n  attempts: 3\n  budget:\n    min_retries_per_second: 1000\noutlier_detection:\n  consecutive_failures: 0\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_retried_once_on_another_backend() {
    let (refuser, seen) = h2_backend(true).await;
    let good = GrpcBackend::start("good").await;
    let t = TestLb::start(&format!(
        "{}admin: 127.0.0.1:0\n{RETRY_EVERY_REFUSAL}",
        h2c_yaml(&[refuser, good.addr], "")
    ))
    .await;
    // POSTs (not idempotent): a refused stream was never processed.
    let c = h2c_client();
    const CALLS: usize = 6;
    for i in 0..CALLS {
        let (parts, body, trailers) = call_raw_unary(&c, &t, &msg("r", i as u32)).await;
        assert_eq!(parts.status, 200);
        assert_eq!(unframe(&body), msg("good: r", i as u32));
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    }
    assert_eq!(
        good.hits(),
        CALLS,
        "each call reached the good backend once"
    );
    let refused = seen.refused.load(SeqCst);
    assert!(
        refused >= 1,
        "round robin sent some calls to the refuser first"
    );
    assert!(refused <= CALLS, "no call was refused twice: {refused}");
    // A tonic client's calls, whose bodies stream (no length): what was
    // sent is kept, and sent again to the other backend.
    let refused_before = seen.refused.load(SeqCst);
    let ch = channel(&t).await;
    for i in 0..CALLS {
        let resp = call_unary(&ch, tonic::Request::new(msg("t", i as u32)))
            .await
            .expect("the call succeeds");
        assert_eq!(resp.into_inner(), msg("good: t", i as u32));
    }
    // And bidi streams, refused after their first message was sent.
    for _ in 0..2 {
        let (tx, mut incoming) = open_chat(ch.clone(), msg("first", 0)).await;
        assert_eq!(
            incoming.message().await.unwrap(),
            Some(msg("echo first", 0))
        );
        tx.send(msg("second", 1)).await.unwrap();
        assert_eq!(
            incoming.message().await.unwrap(),
            Some(msg("echo second", 1))
        );
        drop(tx);
        assert_eq!(incoming.message().await.unwrap(), None);
    }
    assert_eq!(good.hits(), 2 * CALLS + 2);
    let refused = seen.refused.load(SeqCst);
    assert!(
        refused > refused_before,
        "round robin sent some streamed calls to the refuser first"
    );
    assert!(
        refused <= 2 * CALLS + 2,
        "no call was refused twice: {refused}"
    );
    // Each refusal was retried exactly once, counted as such.
    let admin = t.lb.admin_addr().expect("admin bound");
    let text = get(&client(), &format!("http://{admin}/metrics"))
        .await
        .text();
    let line = format!("lb_retries_total{{reason=\"refused_stream\"}} {refused}");
    assert!(text.contains(&line), "{line} not in:\n{text}");
}

/// A pool of one backend: a stream it refused goes to it once more (on
/// whichever of its connections has room), as Envoy and Go's client do;
/// never a third time, whatever `retry.attempts` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_retried_once_on_the_only_backend() {
    // Refuses every other stream: each call's first try, with calls in turn.
    let (backend, seen) = h2_backend_refusing(|n| n % 2 == 0).await;
    let t = TestLb::start(&format!(
        "{}{RETRY_EVERY_REFUSAL}",
        h2c_yaml(&[backend], "")
    ))
    .await;
    let c = h2c_client();
    const CALLS: usize = 4;
    for i in 0..CALLS {
        let (parts, body, _) = call_raw_unary(&c, &t, &msg("r", i as u32)).await;
        assert_eq!(parts.status, 200);
        assert_eq!(body, Bytes::from_static(b"ok"), "call {i}");
    }
    assert_eq!(seen.refused.load(SeqCst), CALLS, "each call refused once");
    assert_eq!(seen.heads.lock().unwrap().len(), CALLS, "and answered once");

    // One that refuses everything: tried twice, then UNAVAILABLE.
    let (refuser, seen) = h2_backend(true).await;
    let t = TestLb::start(&format!(
        "{}{RETRY_EVERY_REFUSAL}",
        h2c_yaml(&[refuser], "")
    ))
    .await;
    let (parts, _, trailers) = call_raw_unary(&c, &t, &msg("x", 0)).await;
    assert_eq!(parts.status, 200);
    let status = parts
        .headers
        .get("grpc-status")
        .cloned()
        .or_else(|| trailers.and_then(|t| t.get("grpc-status").cloned()));
    assert_eq!(status.as_ref().map(|s| s.as_bytes()), Some(&b"14"[..]));
    assert_eq!(
        seen.refused.load(SeqCst),
        2,
        "refused, tried once more, no more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_pool_is_health_checked_over_http2() {
    let (addr, seen) = h2_backend(false).await;
    let t = TestLb::start(&h2c_yaml(
        &[addr],
        "health_check:\n  path: /health\n  interval: 100ms\n  timeout: 100ms\n  healthy_threshold: 1\n  unhealthy_threshold: 1\n",
    ))
    .await;
    let probed = || {
        seen.heads
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.uri.path() == "/health" && h.version == http::Version::HTTP_2)
            .count()
    };
    // An HTTP/1.1 probe would fail the HTTP/2-only backend's handshake.
    eventually!(WAIT, probed() >= 3);
    let answer = get(&client(), &t.url("/after-probes")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_reach_the_backend() {
    let (addr, seen) = h2_backend(false).await;
    let t = TestLb::start(&h2c_yaml(&[addr], "")).await;
    let tcp = tokio::net::TcpStream::connect(t.lb.local_addr())
        .await
        .unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    // Streamed (no length), then buffered for replay (a known length).
    for length in [None, Some(7)] {
        let mut req = http::Request::post(format!("http://{}/up", t.lb.local_addr()));
        if let Some(n) = length {
            req = req.header("content-length", n);
        }
        let mut client = client.clone().ready().await.unwrap();
        let (resp, mut stream) = client.send_request(req.body(()).unwrap(), false).unwrap();
        stream
            .send_data(Bytes::from_static(b"payload"), false)
            .unwrap();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-client-trailer", "sent".parse().unwrap());
        stream.send_trailers(trailers).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(WAIT), resp)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "answered in time (length {length:?}; the backend saw {} heads, {:?})",
                    seen.heads.lock().unwrap().len(),
                    seen.bodies.lock().unwrap()
                )
            })
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        while let Some(chunk) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.unwrap().len());
        }
        let (bytes, trailers) = seen.bodies.lock().unwrap().last().cloned().unwrap();
        assert_eq!(&bytes[..], b"payload", "length {length:?}");
        let trailers = trailers.unwrap_or_else(|| panic!("no trailers, length {length:?}"));
        assert_eq!(trailers["x-client-trailer"], "sent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_health_check_takes_a_not_serving_backend_out() {
    let (b1, b2) = (
        GrpcBackend::start("b1").await,
        GrpcBackend::start("b2").await,
    );
    b2.health.status.store(NOT_SERVING, SeqCst);
    let t = TestLb::start(&h2c_yaml(
        &[b1.addr, b2.addr],
        "health_check:\n  grpc: true\n  grpc_service: test.Echo\n  interval: 300ms\n  timeout: 300ms\n  healthy_threshold: 1\n  unhealthy_threshold: 1\n",
    ))
    .await;
    let ch = channel(&t).await;
    // Ten calls in a row all served by `only`.
    async fn all_served_by(ch: &Channel, only: &str) -> bool {
        for i in 0..10 {
            match call_unary(ch, tonic::Request::new(msg("hc", i))).await {
                Ok(r) if r.get_ref().text == format!("{only}: hc") => {}
                _ => return false,
            }
        }
        true
    }
    eventually!(WAIT, all_served_by(&ch, "b1").await);
    assert!(b2
        .health
        .asked
        .lock()
        .unwrap()
        .iter()
        .all(|s| s == "test.Echo"));
    assert!(!b2.health.asked.lock().unwrap().is_empty());
    // The other way round.
    b2.health.status.store(SERVING, SeqCst);
    b1.health.status.store(NOT_SERVING, SeqCst);
    eventually!(WAIT, all_served_by(&ch, "b2").await);
    // Both out: UNAVAILABLE, saying why.
    b2.health.status.store(NOT_SERVING, SeqCst);
    let mut last = None;
    eventually!(
        WAIT,
        {
            let status = call_unary(&ch, tonic::Request::new(msg("x", 0))).await;
            let down = matches!(&status, Err(s) if s.code() == Code::Unavailable
                && s.message().contains("the gRPC health check (gRPC health NOT_SERVING)"));
            last.replace(status);
            down
        },
        "{last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_grpc_calls_by_status() {
    let backend = GrpcBackend::start("b1").await;
    let dead = closed_port().await;
    let t = TestLb::start(&format!(
        "admin: 127.0.0.1:0\npools:\n  grpc:\n    protocol: h2c\n    backends: [{{address: {}}}]\n  dead:\n    protocol: h2c\n    backends: [{{address: {dead}}}]\nroutes:\n  - {{path_prefix: /test.Echo, pool: grpc}}\n  - {{path_prefix: /dead.Svc, pool: dead}}\n",
        backend.addr
    ))
    .await;
    let ch = channel(&t).await;
    call_unary(&ch, tonic::Request::new(msg("ok", 0)))
        .await
        .unwrap();
    call_unary(&ch, tonic::Request::new(msg("fail", 0)))
        .await
        .unwrap_err();
    for (text, want) in [("then-fail", Some(Code::Aborted)), ("fine", None)] {
        let mut g = tonic::client::Grpc::new(ch.clone());
        g.ready().await.unwrap();
        let codec = ProstCodec::<Msg, Msg>::default();
        let mut stream = g
            .server_streaming(
                tonic::Request::new(msg(text, 3)),
                path("/test.Echo/Count"),
                codec,
            )
            .await
            .unwrap()
            .into_inner();
        let end = loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => break None,
                Err(status) => break Some(status.code()),
            }
        };
        assert_eq!(end, want);
    }
    // lb's own answers: a dead pool's, and one before any pool (no route).
    for p in ["/dead.Svc/Call", "/nowhere.Svc/Call"] {
        let mut g = tonic::client::Grpc::new(ch.clone());
        g.ready().await.unwrap();
        let codec = ProstCodec::<Msg, Msg>::default();
        let path = http::uri::PathAndQuery::from_static(p);
        let status = g
            .unary(tonic::Request::new(msg("x", 0)), path, codec)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    let admin = t.lb.admin_addr().expect("admin bound");
    let text = get(&client(), &format!("http://{admin}/metrics"))
        .await
        .text();
    for line in [
        r#"lb_grpc_requests_total{pool="grpc",grpc_status="0"} 2"#,
        r#"lb_grpc_requests_total{pool="grpc",grpc_status="5"} 1"#,
        r#"lb_grpc_requests_total{pool="grpc",grpc_status="10"} 1"#,
        r#"lb_grpc_requests_total{pool="dead",grpc_status="14"} 1"#,
        r#"lb_grpc_requests_total{pool="none",grpc_status="14"} 1"#,
    ] {
        assert!(text.contains(line), "{line} not in:\n{text}");
    }
    assert_eq!(text.matches("lb_grpc_requests_total{").count(), 5, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_grpc_timeout_caps_lbs_own() {
    let backend = GrpcBackend::start("b1").await;
    // timeouts.request stays at its 30s default: the call's 300ms rules.
    let t = TestLb::start(&h2c_yaml(&[backend.addr], "")).await;
    let mut req = grpc_post(&t.url("/test.Echo/Unary"), &msg("slow", 1));
    req.headers_mut()
        .insert("grpc-timeout", "300m".parse().unwrap());
    let (parts, body, _) = read_all(&h2c_client(), req).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["grpc-status"], "4");
    assert_eq!(parts.headers["grpc-message"], "lb: 504 Gateway Timeout");
    assert!(body.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_unavailable_sends_a_call_answered_unavailable_elsewhere() {
    let (b1, b2) = (
        GrpcBackend::start("b1").await,
        GrpcBackend::start("b2").await,
    );
    let extra = "retry:\n  retry_on: [connect_failure, unavailable]\n  budget:\n    min_retries_per_second: 1000\n";
    let t = TestLb::start(&h2c_yaml(&[b1.addr, b2.addr], extra)).await;
    let ch = channel(&t).await;
    for i in 0..6 {
        let resp = call_unary(&ch, tonic::Request::new(msg("busy-on-b1", i)))
            .await
            .expect("b2 answers every call");
        assert_eq!(resp.into_inner(), msg("b2: busy-on-b1", i));
    }
    assert!(b1.hits() >= 1, "round robin tried b1 first for some");
    assert_eq!(b2.hits(), 6);
    // Without it, b1's UNAVAILABLE reaches the client.
    let t = TestLb::start(&h2c_yaml(&[b1.addr, b2.addr], "")).await;
    let ch = channel(&t).await;
    let mut answers = Vec::new();
    for i in 0..4 {
        answers.push(call_unary(&ch, tonic::Request::new(msg("busy-on-b1", i))).await);
    }
    assert!(
        answers.iter().any(
            |a| matches!(a, Err(s) if s.code() == Code::Unavailable && s.message() == "b1 is busy")
        ),
        "{answers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlives_a_reload_that_keeps_its_backend() {
    let (b1, b2) = (
        GrpcBackend::start("b1").await,
        GrpcBackend::start("b2").await,
    );
    let t = TestLb::start(&h2c_yaml(&[b1.addr], "")).await;
    let ch = channel(&t).await;
    let (tx, mut incoming) = open_chat(ch, msg("before", 0)).await;
    assert_eq!(
        incoming.message().await.unwrap(),
        Some(msg("echo before", 0))
    );
    // A reload that adds a backend and changes timeouts.connect (which
    // rebuilds each worker's backend clients).
    t.rewrite(&h2c_yaml(&[b1.addr, b2.addr], "timeouts:\n  connect: 2s\n"));
    eventually!(WAIT, t.applied() >= 2);
    for i in 1..4 {
        tx.send(msg("after", i)).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(WAIT), incoming.message())
            .await
            .expect("the stream goes on after the reload")
            .unwrap();
        assert_eq!(got, Some(msg("echo after", i)));
    }
    drop(tx);
    assert_eq!(incoming.message().await.unwrap(), None);
    assert_eq!(b1.hits(), 1, "the stream stayed on its backend");
}

/// A raw HTTP/2 backend, frame by frame: once two streams have opened it
/// sends a graceful GOAWAY whose last stream id is the first, answers that
/// one `200` and never the second.
async fn goaway_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answered = Arc::new(AtomicUsize::new(0));
    let a = Arc::clone(&answered);
    let addr = raw_server(move |mut s| {
        let answered = Arc::clone(&a);
        async move {
            let mut preface = [0u8; 24];
            if s.read_exact(&mut preface).await.is_err() {
                return;
            }
            let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
                let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
                f.extend_from_slice(&[kind, flags]);
                f.extend_from_slice(&stream.to_be_bytes());
                f.extend_from_slice(payload);
                f
            };
            let _ = s.write_all(&frame(4, 0, 0, &[])).await; // SETTINGS
            let mut streams = Vec::new();
            loop {
                let mut head = [0u8; 9];
                if s.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let (kind, flags) = (head[3], head[4]);
                let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
                let mut payload = vec![0u8; len];
                if s.read_exact(&mut payload).await.is_err() {
                    return;
                }
                if kind == 4 && flags & 1 == 0 {
                    let _ = s.write_all(&frame(4, 1, 0, &[])).await; // SETTINGS ACK
                }
                if kind == 1 && !streams.contains(&stream) {
                    streams.push(stream);
                    if streams.len() == 2 {
                        let mut goaway = streams[0].to_be_bytes().to_vec();
                        goaway.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
                        let _ = s.write_all(&frame(7, 0, 0, &goaway)).await;
                        // `:status: 200` (HPACK static index 8), END_HEADERS | END_STREAM.
                        let _ = s.write_all(&frame(1, 0x5, streams[0], &[0x88])).await;
                        answered.fetch_add(1, SeqCst);
                    }
                }
            }
        }
    })
    .await;
    (addr, answered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_above_a_goaways_last_stream_id_go_to_another_backend() {
    let (raw, answered) = goaway_backend().await;
    let (good, seen) = h2_backend(false).await;
    // Weights 256:1: both requests go to the raw backend first.
    let t = TestLb::start(&format!(
        "protocol: h2c\nbackends:\n  - address: {raw}\n    weight: 256\n  - address: {good}\n    weight: 1\n"
    ))
    .await;
    let c = h2c_client();
    let post = |n: u32| {
        Request::post(t.url(&format!("/call/{n}")))
            .header("content-length", "4")
            .body(Full::new(Bytes::from_static(b"body")))
            .unwrap()
    };
    // Two POSTs at once on one client connection: one lb worker, one
    // backend connection.
    let (a, b) = tokio::join!(send(&c, post(1)), send(&c, post(2)));
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(answered.load(SeqCst), 1, "the raw backend answered one");
    let heads = seen.heads.lock().unwrap();
    assert_eq!(heads.len(), 1, "the other went to the good backend, once");
}

/// tonic's graceful stop sends GOAWAY, stops accepting and keeps its
/// listener open until its connections have closed: lb's connects in that
/// window complete in the kernel's queue, lb sends streams on them, and the
/// listener's close resets them unread. Those streams, like the ones above
/// the GOAWAY's last stream id, go to the other backend: no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_going_away_mid_load_fails_no_call() {
    let (mut b1, b2) = (
        GrpcBackend::start("b1").await,
        GrpcBackend::start("b2").await,
    );
    let t = TestLb::start(&h2c_yaml(&[b1.addr, b2.addr], "")).await;
    // Two client connections, so both lb workers may carry the load.
    let channels = [channel(&t).await, channel(&t).await];
    const CALLERS: usize = 8;
    const CALLS: usize = 600;
    let ticket = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let b1_gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = tokio::task::JoinSet::new();
    for c in 0..CALLERS {
        let ch = channels[c % channels.len()].clone();
        let (ticket, done, b1_gone) = (ticket.clone(), done.clone(), b1_gone.clone());
        callers.spawn(async move {
            let mut failed = Vec::new();
            loop {
                // Calls go on until CALLS were made and b1's server has
                // returned: every caller makes one after that too.
                let gone = b1_gone.load(SeqCst);
                let i = ticket.fetch_add(1, SeqCst);
                if i >= CALLS && gone {
                    return failed;
                }
                match call_unary(&ch, tonic::Request::new(msg("load", i as u32))).await {
                    Ok(resp) => assert_eq!(resp.get_ref().n, i as u32),
                    Err(status) => failed.push((i, status)),
                }
                done.fetch_add(1, SeqCst);
            }
        });
    }
    eventually!(WAIT, done.load(SeqCst) >= CALLS / 3);
    let b1_before = b1.hits();
    b1.begin_graceful_stop();
    tokio::time::timeout(Duration::from_secs(WAIT), &mut b1.task)
        .await
        .expect("b1's server returns once its connections closed")
        .unwrap();
    b1_gone.store(true, SeqCst);
    let b2_at_stop = b2.hits();
    let mut failed = Vec::new();
    while let Some(f) = callers.join_next().await {
        failed.extend(f.unwrap());
    }
    let made = done.load(SeqCst);
    assert!(
        failed.is_empty(),
        "{} of {made} calls failed: {failed:?}",
        failed.len()
    );
    assert!(b1_before > 0, "b1 served calls before it went away");
    assert!(b2.hits() > b2_at_stop, "b2 served calls after b1 went away");
    assert!(made >= CALLS);
}

/// A backend that takes two streams at a time, and twenty slow calls at
/// once: lb's client opens one stream on a new connection until the
/// backend's SETTINGS say how many it takes, and once they have, opens
/// more connections to carry the calls over the limit (at most 8 per
/// backend and worker), queueing the rest; the backend refuses none (with
/// one backend, a refused call could go nowhere else).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_a_backends_max_concurrent_streams_open_more_connections() {
    const LIMIT: u32 = 2;
    let backend = GrpcBackend::start_with(
        "b1",
        tonic::transport::Server::builder().max_concurrent_streams(Some(LIMIT)),
    )
    .await;
    let t = TestLb::start(&h2c_yaml(&[backend.addr], "")).await;
    // One client connection: one lb worker, whose client has one backend.
    let ch = channel(&t).await;
    // The first call's connection learns the backend's limit.
    call_unary(&ch, tonic::Request::new(msg("hi", 1)))
        .await
        .expect("first call");
    const CALLS: u32 = 20;
    let calls = (0..CALLS).map(|_| call_unary(&ch, tonic::Request::new(msg("nap", 1000))));
    let answers = futures_util::future::join_all(calls).await;
    for a in &answers {
        let resp = a.as_ref().expect("every call succeeds");
        assert_eq!(resp.get_ref(), &msg("b1: nap", 1000));
    }
    let conns = backend.accepted();
    assert!(
        (2..=8).contains(&conns),
        "more connections than one, at most 8: {conns}"
    );
    let peak = backend.peak_naps();
    assert!(
        peak > LIMIT as usize && peak <= LIMIT as usize * conns,
        "calls ran on several connections, each within the limit: peak {peak} over {conns} connections"
    );
}

/// A server stream still open when shutdown's grace runs out (its backend
/// streams on, forever) ends with lb's UNAVAILABLE in trailers, not a cut
/// connection: the client reads a clean end it may retry elsewhere, not
/// a transport error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stream_is_ended_when_shutdowns_grace_runs_out() {
    let backend = GrpcBackend::start("b1").await;
    let t = TestLb::start(&h2c_yaml(&[backend.addr], "")).await;
    let mut g = tonic::client::Grpc::new(channel(&t).await);
    g.ready().await.unwrap();
    let codec = ProstCodec::<Msg, Msg>::default();
    let started = g.server_streaming(
        tonic::Request::new(msg("forever", 3)),
        path("/test.Echo/Count"),
        codec,
    );
    let mut stream = tokio::time::timeout(Duration::from_secs(WAIT), started)
        .await
        .expect("the stream starts in time")
        .expect("the stream starts")
        .into_inner();
    for i in 0..3 {
        let got = tokio::time::timeout(Duration::from_secs(WAIT), stream.message())
            .await
            .expect("a message in time");
        assert_eq!(got.unwrap(), Some(msg("item", i)));
    }
    // The stream is open and its backend silent: only the grace's end can
    // end it.
    let TestLb { lb, dir: _dir, .. } = t;
    let shutdown = tokio::spawn(lb.shutdown(Duration::from_secs(1)));
    let end = tokio::time::timeout(Duration::from_secs(WAIT), stream.message())
        .await
        .expect("the stream ends once the grace ran out")
        .expect_err("the stream ends with a status, not as if complete");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert_eq!(end.message(), "lb: shutting down", "{end:?}");
    tokio::time::timeout(Duration::from_secs(WAIT), shutdown)
        .await
        .expect("shutdown returns")
        .expect("shutdown did not panic");
}

/// An h2c backend that accepts connections and closes each without a byte
/// back once lb's preface arrived on it (as a connection the kernel
/// completed to a listener nobody accepts on any more is reset); counts
/// those connections.
async fn silent_closing_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let closed = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&closed);
    let addr = raw_server(move |mut s| {
        let closed = Arc::clone(&counted);
        async move {
            let mut preface = [0u8; 24];
            if s.read_exact(&mut preface).await.is_ok() {
                // The socket closes as it drops.
                closed.fetch_add(1, SeqCst);
            }
        }
    })
    .await;
    (addr, closed)
}

/// A connection the backend closed without sending a byte (not even its
/// SETTINGS) was never taken: lb sends no request on it, and the unary
/// call (a POST) goes to the other backend instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_closes_a_connection_before_a_byte_back_is_retried_elsewhere() {
    let (silent, closed) = silent_closing_backend().await;
    let good = GrpcBackend::start("good").await;
    let t = TestLb::start(&h2c_yaml(&[silent, good.addr], "")).await;
    let ch = channel(&t).await;
    const CALLS: usize = 6;
    for i in 0..CALLS as u32 {
        let resp = call_unary(&ch, tonic::Request::new(msg("hi", i)))
            .await
            .expect("every call succeeds");
        assert_eq!(resp.into_inner(), msg("good: hi", i));
    }
    assert_eq!(good.hits(), CALLS, "the good backend answered every call");
    // Round robin sent some calls to the silent backend first.
    let closed = closed.load(SeqCst);
    assert!(
        closed >= 1,
        "connections the silent backend closed: {closed}"
    );
}

/// An h2c backend whose SETTINGS allow no stream at all
/// (`SETTINGS_MAX_CONCURRENT_STREAMS` 0: h2 refuses each one); counts its
/// connections.
async fn backend_taking_no_streams() -> (SocketAddr, Arc<AtomicUsize>) {
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&conns);
    let addr = raw_server(move |socket| {
        counted.fetch_add(1, SeqCst);
        async move {
            let Ok(mut conn) = h2::server::Builder::new()
                .max_concurrent_streams(0)
                .handshake::<_, Bytes>(socket)
                .await
            else {
                return;
            };
            while let Some(Ok(_)) = conn.accept().await {}
        }
    })
    .await;
    (addr, conns)
}

/// A backend that takes no streams is not waited on: a call there is
/// refused at once (UNAVAILABLE on its own; served by another backend when
/// there is one), not queued until `timeouts.request`, and lb opens a
/// bounded number of connections to it, not one per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_whose_settings_allow_no_stream_is_not_waited_on() {
    let (zero, conns) = backend_taking_no_streams().await;
    let long = "timeouts:\n  request: 120s\n";
    let t = TestLb::start(&h2c_yaml(&[zero], long)).await;
    let c = h2c_client();
    for i in 0..5 {
        let (parts, _, _) = call_raw_unary(&c, &t, &msg("z", i)).await;
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers["grpc-status"], "14", "{parts:?}");
    }
    let opened = conns.load(SeqCst);
    assert!(opened <= 2 * 8, "connections per worker bounded: {opened}");

    let good = GrpcBackend::start("good").await;
    let t = TestLb::start(&format!(
        "{}{RETRY_EVERY_REFUSAL}",
        h2c_yaml(&[zero, good.addr], long)
    ))
    .await;
    for i in 0..6 {
        let (parts, body, trailers) = call_raw_unary(&c, &t, &msg("y", i)).await;
        assert_eq!(parts.status, 200);
        assert_eq!(unframe(&body), msg("good: y", i));
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    }
}

/// A client that cancels its server stream (RST_STREAM from tonic as the
/// call drops) mid-way: lb resets the backend's stream, frees its place on
/// the backend connection and its in-flight count, and blames nobody.
/// With the backend allowing 2 streams per connection, a leak of either
/// would stall the calls after the 16th (8 connections of 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cancelling_its_stream_frees_the_backends_stream_and_blames_nobody() {
    let backend = GrpcBackend::start_with(
        "b1",
        tonic::transport::Server::builder().max_concurrent_streams(Some(2)),
    )
    .await;
    let t = TestLb::start(&h2c_yaml(&[backend.addr], "")).await;
    let ch = channel(&t).await;
    for round in 0..24 {
        let mut g = tonic::client::Grpc::new(ch.clone());
        g.ready().await.unwrap();
        let started = g.server_streaming(
            tonic::Request::new(msg("forever", 1)),
            path("/test.Echo/Count"),
            ProstCodec::<Msg, Msg>::default(),
        );
        let mut stream = tokio::time::timeout(Duration::from_secs(WAIT), started)
            .await
            .unwrap_or_else(|_| panic!("stream {round} starts in time"))
            .expect("the stream starts")
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(WAIT), stream.message())
            .await
            .unwrap_or_else(|_| panic!("stream {round}'s first message in time"));
        assert_eq!(first.unwrap(), Some(msg("item", 0)));
        drop(stream); // the client goes away mid-stream
    }
    let resp = call_unary(&ch, tonic::Request::new(msg("after", 0)))
        .await
        .expect("a call after the cancelled ones succeeds");
    assert_eq!(resp.into_inner(), msg("b1: after", 0));
    settled_and_nobody_blamed(&t).await;
    // Each stream's place was given back: one connection per worker at
    // most carried them all, none opened for places still counted taken.
    let accepted = backend.accepted.load(SeqCst);
    assert!(
        accepted <= 2,
        "connections opened to the backend: {accepted}"
    );
}

/// A client that vanishes mid-request-body (an HTTP/1.1 client closing its
/// socket, an HTTP/2 client resetting its stream) on an h2c pool: lb
/// cancels the backend's stream, and the backend is not blamed for the
/// client's going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_vanishing_mid_body_is_not_blamed_on_an_h2c_backend() {
    use tokio::io::AsyncWriteExt;
    let (addr, seen) = h2_backend(false).await;
    let t = TestLb::start(&h2c_yaml(&[addr], "admin: 127.0.0.1:0\n")).await;

    let mut s = tokio::net::TcpStream::connect(t.lb.local_addr())
        .await
        .unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789")
        .await
        .unwrap();
    eventually!(WAIT, seen.heads.lock().unwrap().len() == 1);
    drop(s);
    // The request ends (counted once answered, after any blame) as the
    // client's fault: a 400 that no client is left to read.
    let admin = t.lb.admin_addr().expect("admin bound");
    client_faults_reach(admin, 1).await;

    let tcp = tokio::net::TcpStream::connect(t.lb.local_addr())
        .await
        .unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(t.url("/up")).body(()).unwrap();
    let (_resp, mut body) = h2.send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(b"0123456789"), false)
        .unwrap();
    eventually!(WAIT, seen.heads.lock().unwrap().len() == 2);
    body.send_reset(h2::Reason::CANCEL);
    // hyper drops the stream's request future: nothing of it runs on to
    // blame anyone once its in-flight count is given back.
    settled_and_nobody_blamed(&t).await;
    // And it serves on.
    let (parts, body, _) = read_all(
        &h2c_client(),
        Request::get(t.url("/after")).body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"ok");
}

/// Waits until `n` requests were answered 400 (a client's fault), by lb's
/// metrics at `admin`.
async fn client_faults_reach(admin: SocketAddr, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(WAIT);
    loop {
        let text = get(&client(), &format!("http://{admin}/metrics"))
            .await
            .text();
        let ended: f64 = text
            .lines()
            .filter(|l| l.starts_with("lb_requests_total{") && l.contains("code=\"400\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if ended >= n as f64 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not {n} requests answered 400:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A backend that takes the connection and never says a word (no
/// SETTINGS) is a connect failure once `timeouts.connect` ran out, charged
/// to it: the call goes to the other backend instead of waiting on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_sends_its_settings_is_a_connect_failure() {
    use tokio::io::AsyncReadExt;
    let mute = raw_server(|mut s| async move {
        let mut buf = [0u8; 1024];
        // Reads what lb sends, answers nothing, until lb closes.
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    let good = GrpcBackend::start("good").await;
    let t = TestLb::start(&h2c_yaml(
        &[mute, good.addr],
        "timeouts:\n  connect: 300ms\n  request: 120s\n",
    ))
    .await;
    let ch = channel(&t).await;
    for i in 0..4 {
        let resp = call_unary(&ch, tonic::Request::new(msg("hi", i)))
            .await
            .expect("every call succeeds");
        assert_eq!(resp.into_inner(), msg("good: hi", i));
    }
    assert_eq!(good.hits(), 4);
    let snap = t.lb.runtime().snapshot();
    let mute_state = &snap.first_pool().backends[0].state;
    assert!(mute_state.failures() >= 1, "the mute backend was charged");
}

/// Waits until no request is in flight on any backend of `t`'s first pool
/// (every one has given its place back), then checks that nothing was
/// blamed on them.
async fn settled_and_nobody_blamed(t: &TestLb) {
    let snap = t.lb.runtime().snapshot();
    let in_flight = || -> u32 {
        snap.first_pool()
            .backends
            .iter()
            .map(|b| b.state.in_flight())
            .sum()
    };
    eventually!(WAIT, in_flight() == 0, "in flight: {}", in_flight());
    nobody_blamed(t);
}
