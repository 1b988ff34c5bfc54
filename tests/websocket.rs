//! WebSocket (`Upgrade`) pass-through with a real client library: echo
//! through lb, sockets that outlive a reload removing their backend, the
//! backend's in-flight count and the connection cap while a socket is open,
//! and shutdown closing sockets at the end of the grace period.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket echo server answering `name:text` to every text message.
struct EchoBackend {
    addr: SocketAddr,
    _tasks: JoinSet<()>,
}

impl EchoBackend {
    async fn start(name: &str) -> EchoBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut tasks = JoinSet::new();
        let name = name.to_owned();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                conns.spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        match msg {
                            Message::Text(t) => {
                                let reply = format!("{name}:{}", t.as_str());
                                if ws.send(Message::text(reply)).await.is_err() {
                                    return;
                                }
                            }
                            Message::Close(_) => return,
                            _ => {}
                        }
                    }
                });
            }
        });
        EchoBackend {
            addr,
            _tasks: tasks,
        }
    }

    fn yaml_entry(&self) -> String {
        format!("  - address: {}\n", self.addr)
    }
}

fn config(backends: &[&EchoBackend]) -> String {
    let mut s = String::from("backends:\n");
    for b in backends {
        s.push_str(&b.yaml_entry());
    }
    s
}

async fn connect(t: &TestLb) -> Socket {
    let url = format!("ws://{}/chat", t.lb.local_addr());
    let (ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake failed");
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends `text` and returns the echo.
async fn echo(ws: &mut Socket, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("no echo in time")
        .expect("socket closed")
        .expect("socket error");
    reply.into_text().unwrap().as_str().to_owned()
}

#[tokio::test]
async fn websocket_echo_through_lb_counts_in_flight_and_connection() {
    let a = EchoBackend::start("a").await;
    let t = TestLb::start(&config(&[&a])).await;
    let mut ws = connect(&t).await;
    assert_eq!(echo(&mut ws, "hello").await, "a:hello");
    assert_eq!(echo(&mut ws, "again").await, "a:again");
    let rt = t.lb.runtime();
    let state = || rt.snapshot().first_pool().backends[0].state.in_flight();
    // An open socket is in flight on its backend and holds a connection slot.
    assert_eq!(state(), 1);
    assert_eq!(rt.connections.open(), 1);
    assert_eq!(rt.upgrades.open(), 1);
    ws.close(None).await.unwrap();
    drop(ws);
    eventually!(
        10,
        state() == 0 && rt.connections.open() == 0 && rt.upgrades.open() == 0
    );
}

/// `timeouts.tcp_idle` bounds an upgraded connection as it bounds a tcp
/// one: a socket nobody writes to is closed and its backend released; one
/// in use for longer than the bound is not.
#[tokio::test]
async fn an_idle_websocket_is_closed_after_tcp_idle() {
    let a = EchoBackend::start("a").await;
    let t = TestLb::start(&format!("timeouts:\n  tcp_idle: 1s\n{}", config(&[&a]))).await;
    let rt = t.lb.runtime();
    let in_flight = || rt.snapshot().first_pool().backends[0].state.in_flight();
    // Busy for twice the bound, in short gaps: kept.
    let mut busy = connect(&t).await;
    for i in 0..8 {
        assert_eq!(echo(&mut busy, &format!("m{i}")).await, format!("a:m{i}"));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(busy);
    eventually!(10, rt.upgrades.open() == 0);
    // Silent: closed by lb, the backend's in-flight count released.
    let mut idle = connect(&t).await;
    assert_eq!(echo(&mut idle, "once").await, "a:once");
    let ended = tokio::time::timeout(Duration::from_secs(20), idle.next())
        .await
        .expect("lb kept an idle upgraded connection open");
    assert!(!matches!(ended, Some(Ok(Message::Text(_)))), "{ended:?}");
    eventually!(10, in_flight() == 0 && rt.upgrades.open() == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_sockets_survive_a_reload_that_removes_their_backends() {
    let (a, b, c) = (
        EchoBackend::start("a").await,
        EchoBackend::start("b").await,
        EchoBackend::start("c").await,
    );
    let t = TestLb::start(&config(&[&a, &b])).await;
    let mut sockets = Vec::new();
    let mut owners = Vec::new();
    for i in 0..6 {
        let mut ws = connect(&t).await;
        let reply = echo(&mut ws, &format!("m{i}")).await;
        owners.push(reply.split(':').next().unwrap().to_owned());
        sockets.push(ws);
    }
    assert_eq!(owners.iter().filter(|o| *o == "a").count(), 3, "{owners:?}");
    let rt = t.lb.runtime();
    assert_eq!(rt.connections.open(), 6);

    // The pool becomes {c} only: a and b are removed.
    let applied = t.applied();
    t.rewrite(&config(&[&c]));
    eventually!(10, t.applied() > applied);
    assert_eq!(rt.snapshot().first_pool().backends.len(), 1);

    for round in 0..3 {
        for (i, ws) in sockets.iter_mut().enumerate() {
            let reply = echo(ws, &format!("r{round}s{i}")).await;
            assert_eq!(reply, format!("{}:r{round}s{i}", owners[i]));
        }
    }
    // A new socket goes to the new pool.
    let mut fresh = connect(&t).await;
    assert_eq!(echo(&mut fresh, "new").await, "c:new");
    assert_eq!(rt.connections.open(), 7);
    assert_eq!(rt.snapshot().first_pool().backends[0].state.in_flight(), 1);
    for mut ws in sockets {
        ws.close(None).await.unwrap();
    }
    fresh.close(None).await.unwrap();
    drop(fresh);
    eventually!(10, rt.connections.open() == 0);
}

#[tokio::test]
async fn max_connections_counts_open_sockets() {
    let a = EchoBackend::start("a").await;
    let t = TestLb::start(&format!("limits:\n  max_connections: 1\n{}", config(&[&a]))).await;
    let mut ws = connect(&t).await;
    assert_eq!(echo(&mut ws, "x").await, "a:x");
    // The only slot is the socket's: a second client is not served.
    let url = format!("ws://{}/chat", t.lb.local_addr());
    let second = tokio::time::timeout(
        Duration::from_millis(500),
        tokio_tungstenite::connect_async(url),
    )
    .await;
    assert!(second.is_err(), "a second connection was served at the cap");
    ws.close(None).await.unwrap();
    drop(ws);
    let mut ws = connect(&t).await;
    assert_eq!(echo(&mut ws, "y").await, "a:y");
}

#[tokio::test]
async fn shutdown_closes_sockets_after_the_grace_period() {
    let a = EchoBackend::start("a").await;
    let t = TestLb::start(&config(&[&a])).await;
    let mut ws = connect(&t).await;
    assert_eq!(echo(&mut ws, "x").await, "a:x");
    let runtime = std::sync::Arc::clone(t.lb.runtime());
    let TestLb { lb, dir: _dir, .. } = t;
    lb.shutdown(Duration::from_millis(200)).await;
    // The relay is gone: the client sees its socket end.
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("socket still open after shutdown");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    eventually!(
        10,
        runtime.upgrades.open() == 0 && runtime.connections.open() == 0
    );
}
