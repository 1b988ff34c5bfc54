//! Answers to the client: a backend's head rewritten the way hyper's server
//! writes it, its body streamed (re-chunked where it must be), or one of
//! lb's own answers.
//!
//! Streaming is bounded both ways: each wait for the backend's next body
//! bytes by `timeouts.backend_body`, each wait for the client to take more
//! by `timeouts.client_send` (see [`Waits`]). A body that came whole with
//! its head is one write that, when the client takes it at once, reads no
//! clock and sets no timer.

use std::io::{IoSlice, Write as _};
use std::time::Duration;

use super::FastStream;
use hyper::body::Bytes;
use hyper::Method;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::request::Head;
use super::upstream::{pool_put, Framing, UpstreamResponse};
use super::{date, dropped_hop, lower, spare, Buf, READ_CHUNK};
use crate::config::{BackendAddr, Timeouts};
use crate::http::body::ResponseBody;
use crate::http::proxy;
use crate::io::stall::Stall;

/// The response head lb writes to the client, the way hyper's server
/// writes a relayed response (lower-case names, framing, `date`).
pub(super) fn encode_relayed(
    out: &mut Vec<u8>,
    resp: &UpstreamResponse,
    method_head: bool,
    answer: &Answer<'_>,
) {
    let head = &resp.head;
    let b = &resp.buf[..];
    let reason = &b[head.reason.clone()];
    out.extend_from_slice(if head.http11 {
        b"HTTP/1.1 "
    } else {
        b"HTTP/1.0 "
    });
    out.extend_from_slice(head.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
    let named = proxy::connection_named(
        head.headers
            .iter()
            .filter(|(n, _)| b[n.clone()].eq_ignore_ascii_case(b"connection"))
            .map(|(_, v)| &b[v.clone()]),
    );
    let no_body_status = matches!(head.status.as_u16(), 204 | 304);
    let mut wrote_len = false;
    let mut wrote_date = false;
    let (mut scratch, mut long) = ([0u8; 64], Vec::new());
    for (n, v) in &head.headers {
        let name = lower(&b[n.clone()], &mut scratch, &mut long);
        let name_str = std::str::from_utf8(name).unwrap_or("");
        if dropped_hop(name_str, &named) {
            continue;
        }
        if name_str == "content-length" {
            // A chunked or close-delimited body has none; 204/304 never; a
            // repeated value once; an empty body gets hyper's implicit one.
            let relayed = match head.framing {
                Framing::Length(n) => n > 0 && !no_body_status,
                // hyper's server relays a HEAD's length whatever the status.
                Framing::Empty => method_head,
                _ => false,
            };
            if !relayed || wrote_len {
                continue;
            }
            wrote_len = true;
        }
        if name_str == "date" {
            wrote_date = true;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(&b[v.clone()]);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(cookie) = answer.set_cookie {
        out.extend_from_slice(b"set-cookie: ");
        out.extend_from_slice(cookie);
        out.extend_from_slice(b"\r\n");
    }
    if !answer.keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !wrote_len {
        match head.framing {
            Framing::Chunked | Framing::Close if head.http11 => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n")
            }
            Framing::Length(0) | Framing::Empty if !method_head && !no_body_status => {
                out.extend_from_slice(b"content-length: 0\r\n")
            }
            _ => {}
        }
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        date::extend(out, answer.now);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Why a relay ended before the response was complete: the client
/// connection is closed (the client sees the message end early) and the
/// backend connection dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cut {
    /// The client closed or reset its connection.
    ClientGone,
    /// The client took no bytes for `timeouts.client_send`.
    ClientStalled,
    /// The backend closed, reset or broke the body's framing (which).
    BackendBroke(&'static str),
    /// The backend sent no body byte for `timeouts.backend_body`.
    BackendStalled,
}

/// The two waits a relay can be kept in, each bounded (see [`Stall`]).
pub(super) struct Waits {
    /// `timeouts.backend_body` of the request's snapshot.
    backend_body: Duration,
    /// Counts the current wait for the backend's bytes.
    backend: Stall,
    /// `timeouts.client_send` of the request's snapshot.
    client_send: Duration,
    /// Counts the current wait for the client to take bytes.
    client: Stall,
}

impl Waits {
    pub(super) fn new(timeouts: &Timeouts) -> Self {
        Waits {
            backend_body: timeouts.backend_body,
            backend: Stall::default(),
            client_send: timeouts.client_send,
            client: Stall::default(),
        }
    }

    /// Writes all of `buf` to the client; each wait for it to take more is
    /// bounded (a write that completes at once reads no clock).
    async fn send<S: FastStream>(&mut self, client: &mut S, mut buf: &[u8]) -> Result<(), Cut> {
        while !buf.is_empty() {
            let sent = match self.client.bound(self.client_send, client.write(buf)).await {
                Some(sent) => sent,
                None => self
                    .client
                    .send_now(client, &[IoSlice::new(buf)])
                    .ok_or(Cut::ClientStalled)?,
            };
            match sent {
                Ok(0) | Err(_) => return Err(Cut::ClientGone),
                Ok(n) => buf = &buf[n..],
            }
        }
        Ok(())
    }

    /// One read of the backend's body into `buf`; 0 at EOF.
    async fn read<R, B>(&mut self, conn: &mut R, buf: &mut B) -> Result<usize, Cut>
    where
        R: AsyncRead + Unpin,
        B: bytes::BufMut,
    {
        match self
            .backend
            .bound(self.backend_body, conn.read_buf(buf))
            .await
        {
            None => Err(Cut::BackendStalled),
            Some(Ok(n)) => Ok(n),
            Some(Err(_)) => Err(Cut::BackendBroke("read error")),
        }
    }

    /// Sends `out` (emptied), then reads more of the backend's body into
    /// `resp.buf`; EOF is a broken body.
    async fn fill_after<S: FastStream>(
        &mut self,
        client: &mut S,
        resp: &mut UpstreamResponse,
        out: &mut Vec<u8>,
    ) -> Result<(), Cut> {
        if !out.is_empty() {
            self.send(client, out).await?;
            out.clear();
        }
        if resp.buf.capacity() - resp.buf.len() < 1024 {
            resp.buf.reserve(READ_CHUNK * 8);
        }
        match self.read(&mut resp.conn, &mut resp.buf).await? {
            0 => Err(Cut::BackendBroke("closed before the end")),
            _ => Ok(()),
        }
    }
}

/// What lb adds to a backend's response head for this client.
pub(super) struct Answer<'a> {
    /// The client connection stays open after this response.
    pub(super) keep_alive: bool,
    /// A clock reading already taken: the `date` header, and when the
    /// upstream connection went idle if it goes back to the pool.
    pub(super) now: Instant,
    /// The affinity cookie to (re-)issue, if any.
    pub(super) set_cookie: Option<&'a bytes::Bytes>,
}

/// Writes the response to the client and streams its body; `Ok(true)`
/// when the client connection can serve another request.
pub(super) async fn relay<S: FastStream>(
    client: &mut S,
    mut resp: UpstreamResponse,
    head: &Head,
    backend: &BackendAddr,
    answer: Answer<'_>,
    timeouts: &Timeouts,
    mut out: Vec<u8>,
) -> Result<bool, Cut> {
    let method_head = head.method == Method::HEAD;
    // hyper's server ends a response whose length only the close tells
    // (HTTP/1.0 backend) by closing.
    let close_delimited = resp.head.framing == Framing::Close && !resp.head.http11;
    let answer = Answer {
        keep_alive: answer.keep_alive && !close_delimited,
        ..answer
    };
    out.clear();
    out.reserve(resp.buf.len() + 128);
    encode_relayed(&mut out, &resp, method_head, &answer);
    bytes::Buf::advance(&mut resp.buf, resp.head.head_len);
    let rechunk = resp.head.http11;
    let mut waits = Waits::new(timeouts);
    let w = &mut waits;
    match resp.head.framing {
        Framing::Empty => w.send(client, &out).await?,
        Framing::Length(n) => copy_length(client, &mut resp, &mut out, n, w).await?,
        Framing::Chunked => copy_chunked(client, &mut resp, std::mem::take(&mut out), w).await?,
        Framing::Close => {
            copy_to_close(client, &mut resp, std::mem::take(&mut out), rechunk, w).await?
        }
    }
    spare::give_vec(out);
    if resp.head.reusable && resp.buf.is_empty() {
        pool_put(backend, resp.conn, answer.now);
    }
    spare::give_buf(resp.buf);
    Ok(answer.keep_alive)
}

/// `n` body bytes, the first with the head in one write.
pub(super) async fn copy_length<S: FastStream>(
    client: &mut S,
    resp: &mut UpstreamResponse,
    out: &mut Vec<u8>,
    n: u64,
    w: &mut Waits,
) -> Result<(), Cut> {
    let mut left = n;
    let take = (left as usize).min(resp.buf.len());
    out.extend_from_slice(&resp.buf[..take]);
    bytes::Buf::advance(&mut resp.buf, take);
    left -= take as u64;
    w.send(client, out).await?;
    if left == 0 {
        // The common case: the body came with the head.
        return Ok(());
    }
    let mut chunk = Buf::with_capacity(READ_CHUNK.min(left as usize));
    while left > 0 {
        chunk.clear();
        let mut limited = (&mut resp.conn).take(left.min(READ_CHUNK as u64 * 8));
        match w.read(&mut limited, &mut chunk).await? {
            0 => return Err(Cut::BackendBroke("closed before the end")),
            got => left -= got as u64,
        }
        w.send(client, &chunk).await?;
        if chunk.capacity() < READ_CHUNK * 8 && left > chunk.capacity() as u64 {
            chunk.reserve(READ_CHUNK * 8);
        }
    }
    Ok(())
}

/// Until the backend closes, re-chunked for an HTTP/1.1 response (an
/// HTTP/1.0 one ends with the client connection's close: see [`relay`]).
pub(super) async fn copy_to_close<S: FastStream>(
    client: &mut S,
    resp: &mut UpstreamResponse,
    mut out: Vec<u8>,
    rechunk: bool,
    w: &mut Waits,
) -> Result<(), Cut> {
    let mut pending = std::mem::take(&mut resp.buf);
    loop {
        if !pending.is_empty() {
            if rechunk {
                write_chunk(&mut out, &pending);
            } else {
                out.extend_from_slice(&pending);
            }
            pending.clear();
        }
        if !out.is_empty() {
            w.send(client, &out).await?;
        }
        out.clear();
        if pending.capacity() < READ_CHUNK {
            pending.reserve(READ_CHUNK * 8);
        }
        if w.read(&mut resp.conn, &mut pending).await? == 0 {
            break;
        }
    }
    resp.head.reusable = false;
    if rechunk {
        w.send(client, b"0\r\n\r\n").await?;
    }
    Ok(())
}

pub(super) fn write_chunk(out: &mut Vec<u8>, data: &[u8]) {
    let _ = write!(out, "{:X}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// A chunked body, decoded and re-chunked (extensions and trailers dropped,
/// as hyper does). What is decoded goes out before each wait for more, so
/// a streamed body streams and a stalled one is cut where it stalled.
pub(super) async fn copy_chunked<S: FastStream>(
    client: &mut S,
    resp: &mut UpstreamResponse,
    mut out: Vec<u8>,
    w: &mut Waits,
) -> Result<(), Cut> {
    let copied = decode_chunked(client, resp, &mut out, w).await;
    if matches!(copied, Err(Cut::BackendBroke(_))) && !out.is_empty() {
        // What was decoded before the break goes out first, as hyper's relay
        // does: the client sees the response end early, not no response.
        let _ = w.send(client, &out).await;
    }
    copied
}

/// [`copy_chunked`]'s loop; `out` holds what is decoded and not yet sent.
async fn decode_chunked<S: FastStream>(
    client: &mut S,
    resp: &mut UpstreamResponse,
    out: &mut Vec<u8>,
    w: &mut Waits,
) -> Result<(), Cut> {
    loop {
        // The size line.
        let line_end = loop {
            if let Some(i) = resp.buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if resp.buf.len() > 4096 {
                return Err(Cut::BackendBroke("chunk size line too long"));
            }
            w.fill_after(client, resp, out).await?;
        };
        let line = &resp.buf[..line_end];
        let digits = line
            .split(|&b| b == b';')
            .next()
            .unwrap_or(b"")
            .trim_ascii();
        let Some(size) = std::str::from_utf8(digits)
            .ok()
            .filter(|d| !d.is_empty() && d.len() <= 16)
            .and_then(|d| u64::from_str_radix(d, 16).ok())
        else {
            return Err(Cut::BackendBroke("invalid chunk size"));
        };
        bytes::Buf::advance(&mut resp.buf, line_end + 2);
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                if let Some(i) = resp.buf.windows(2).position(|w| w == b"\r\n") {
                    bytes::Buf::advance(&mut resp.buf, i + 2);
                    if i == 0 {
                        out.extend_from_slice(b"0\r\n\r\n");
                        return w.send(client, out).await;
                    }
                    continue;
                }
                if resp.buf.len() > 64 * 1024 {
                    return Err(Cut::BackendBroke("trailers too long"));
                }
                w.fill_after(client, resp, out).await?;
            }
        }
        let mut left = size;
        while left > 0 {
            if resp.buf.is_empty() {
                w.fill_after(client, resp, out).await?;
            }
            let take = (left as usize).min(resp.buf.len());
            write_chunk(out, &resp.buf[..take]);
            bytes::Buf::advance(&mut resp.buf, take);
            left -= take as u64;
        }
        while resp.buf.len() < 2 {
            w.fill_after(client, resp, out).await?;
        }
        if &resp.buf[..2] != b"\r\n" {
            return Err(Cut::BackendBroke("no CRLF after a chunk"));
        }
        bytes::Buf::advance(&mut resp.buf, 2);
        if out.len() >= READ_CHUNK * 8 {
            w.send(client, out).await?;
            out.clear();
        }
    }
}

/// One of lb's own responses (built by the same functions as on the hyper
/// path), written the way hyper's server writes it.
pub(super) fn encode_own(
    out: &mut Vec<u8>,
    resp: &hyper::Response<ResponseBody>,
    keep_alive: bool,
    method_head: bool,
    now: Instant,
) {
    let status = resp.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut close = false;
    for (name, value) in resp.headers() {
        if name == hyper::header::CONNECTION {
            close = true;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive && !close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let body = match resp.body() {
        ResponseBody::Text(Some(t)) => t.clone(),
        _ => Bytes::new(),
    };
    let _ = write!(out, "content-length: {}\r\n", body.len());
    out.extend_from_slice(b"date: ");
    date::extend(out, now);
    out.extend_from_slice(b"\r\n\r\n");
    if !method_head {
        out.extend_from_slice(&body);
    }
}
