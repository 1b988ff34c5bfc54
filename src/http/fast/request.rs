//! Request heads on the fast path: parsed with httparse, checked by the
//! hyper path's own rules, rewritten for the backend; the body read whole.

use std::borrow::Cow;
use std::io::Write as _;
use std::ops::Range;
use std::time::Duration;

use super::FastStream;
use hyper::body::Bytes;
use hyper::http::uri::Uri;
use hyper::{Method, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use super::{
    content_length, dropped_hop, has_token, lower, range_in, Buf, HeaderRanges, MAX_HEADERS,
    MAX_URI_LEN,
};
use crate::http::affinity::AffinityCookies;
use crate::http::body::ClientFault;
use crate::http::proxy::{self, HeadView};

/// What parsing the bytes so far gave.
pub(super) enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// A complete head the fast path serves; its bytes left the buffer.
    Fast(Head),
    /// hyper must see this message (and the rest of the connection).
    Hyper,
}

/// A parsed request head, pointing into its bytes.
pub(super) struct Head {
    /// The head exactly as received.
    pub(super) bytes: Bytes,
    /// Parsed once for the checks, the retry policy and the metrics.
    pub(super) method: Method,
    /// The origin-form target, sharing `bytes`.
    pub(super) uri: Uri,
    /// `(name, value)` ranges into `bytes`, in order.
    pub(super) headers: HeaderRanges,
    /// `Content-Length`, 0 when absent.
    pub(super) body_len: u64,
    /// Neither `Connection: close` nor anything else ends the connection.
    pub(super) keep_alive: bool,
    /// The client waits for `100 Continue` before it sends its body: one
    /// `Expect` whose value is `100-continue` in any case (hyper's test),
    /// and a body (hyper ignores the expectation without one).
    pub(super) expect_continue: bool,
}

impl Drop for Head {
    fn drop(&mut self) {
        super::spare::give_ranges(std::mem::take(&mut self.headers));
    }
}

impl HeadView for Head {
    fn method(&self) -> &Method {
        &self.method
    }

    fn uri(&self) -> &Uri {
        &self.uri
    }

    fn version(&self) -> Version {
        Version::HTTP_11
    }

    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| self.bytes[n.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| &self.bytes[v.clone()])
    }
}

pub(super) fn parse_request(buf: &mut Buf, max_head: usize, body_limit: u64) -> Parsed {
    if buf.starts_with(b"PRI ") {
        return Parsed::Hyper;
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Hyper,
    };
    if len > max_head || req.version != Some(1) {
        return Parsed::Hyper;
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Parsed::Hyper;
    };
    if !path.starts_with('/') || path.len() > MAX_URI_LEN {
        return Parsed::Hyper;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Hyper;
    };
    // Every offset into `buf` comes from here; one httparse could not have
    // given (not a slice of `buf`) leaves the head to hyper.
    let range = |s: &[u8]| range_in(buf, s);
    let mut body_len: Option<u64> = None;
    let mut keep_alive = true;
    let mut expect: Option<bool> = None;
    let mut headers = super::spare::ranges(req.headers.len());
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            match (content_length(h.value), body_len) {
                (Some(n), None) => body_len = Some(n),
                // hyper keeps one of equal values.
                (Some(n), Some(prev)) if n == prev => continue,
                _ => return Parsed::Hyper,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Parsed::Hyper;
        } else if name.eq_ignore_ascii_case(b"expect") {
            // Any other expectation, or several `Expect` (hyper reads the
            // last), stays hyper's.
            if expect.is_some() || !h.value.eq_ignore_ascii_case(b"100-continue") {
                return Parsed::Hyper;
            }
            expect = Some(true);
        } else if name.eq_ignore_ascii_case(b"connection") && has_token(h.value, "close") {
            keep_alive = false;
        }
        let (Some(name), Some(value)) = (range(name), range(h.value)) else {
            return Parsed::Hyper;
        };
        headers.push((name, value));
    }
    let Some(path) = range(path.as_bytes()) else {
        return Parsed::Hyper;
    };
    let body_len = body_len.unwrap_or(0);
    if body_len > body_limit {
        return Parsed::Hyper;
    }
    let bytes = buf.split_to(len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(bytes.slice(path)) else {
        return unread(buf, &bytes);
    };
    let head = Head {
        bytes,
        method,
        uri,
        headers,
        body_len,
        keep_alive,
        expect_continue: expect.is_some() && body_len > 0,
    };
    if proxy::check_request(&head).is_err() {
        return unread(buf, &head.bytes);
    }
    Parsed::Fast(head)
}

/// Puts a head taken from `buf` back in front of it, for hyper.
pub(super) fn unread(buf: &mut Buf, head: &[u8]) -> Parsed {
    let mut all = Buf::with_capacity(head.len() + buf.len());
    all.extend_from_slice(head);
    all.extend_from_slice(buf);
    *buf = all;
    Parsed::Hyper
}

impl Head {
    /// The head lb sends upstream, as the hyper path's rewrite and hyper's
    /// client would write it; `None` when the hyper path would refuse it.
    /// With `affinity`, lb's cookie is taken out of `Cookie` (as
    /// [`AffinityCookies::take`] does on the hyper path) and the backend it
    /// names is returned with the head.
    pub(super) fn rewrite(
        &self,
        client_ip: std::net::IpAddr,
        affinity: Option<&AffinityCookies>,
        rewritten_target: Option<&str>,
        over_tls: bool,
    ) -> Option<(Vec<u8>, Option<usize>)> {
        let cookies = affinity.filter(|c| self.values("cookie").any(|v| c.carries(v)));
        let mut pinned = None;
        let named = proxy::connection_named(self.values("connection"));
        // The hyper path's rule (and refusal) for a client's X-Forwarded-For.
        let prior = proxy::client_forwarded_for(self, &named, client_ip).ok()?;
        // A route that strips its prefix sends its own target.
        let pq = rewritten_target
            .unwrap_or_else(|| self.uri.path_and_query().map_or("/", |p| p.as_str()));
        let mut out = super::spare::vec(self.bytes.len() + 128 + self.body_len as usize);
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(pq.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let mut host: Option<Range<usize>> = None;
        let (mut scratch, mut long) = ([0u8; 64], Vec::new());
        for (n, v) in &self.headers {
            let name = lower(&self.bytes[n.clone()], &mut scratch, &mut long);
            let name_str = std::str::from_utf8(name).unwrap_or("");
            let mut value = Cow::Borrowed(&self.bytes[v.clone()]);
            if let (Some(cookies), "cookie") = (cookies, name_str) {
                match cookies.strip(&self.bytes[v.clone()], &mut pinned) {
                    Some(rest) => value = rest,
                    None => continue,
                }
            }
            if dropped_hop(name_str, &named)
                || matches!(
                    name_str,
                    "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host"
                )
            {
                continue;
            }
            if name_str == "host" {
                host = Some(v.clone());
            }
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(&value);
            out.extend_from_slice(b"\r\n");
        }
        if let Some(host) = host {
            out.extend_from_slice(b"x-forwarded-host: ");
            out.extend_from_slice(&self.bytes[host]);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(if over_tls {
            b"x-forwarded-proto: https\r\nx-forwarded-for: "
        } else {
            b"x-forwarded-proto: http\r\nx-forwarded-for: "
        });
        match prior {
            Some(xff) => out.extend_from_slice(xff.as_bytes()),
            None => write_ip(&mut out, client_ip),
        }
        out.extend_from_slice(b"\r\n\r\n");
        Some((out, pinned))
    }
}

/// Appends `ip` as `Display` writes it, without the formatting machinery
/// for the common IPv4 case (once per request).
pub(super) fn write_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// The request body, still on the client's side of the connection.
pub(super) struct PendingBody<'a> {
    /// The client's connection, for the `100 Continue` and the body.
    pub(super) client: &'a mut dyn super::ClientIo,
    /// Bytes read after the head: the body starts here.
    pub(super) buf: &'a mut Buf,
    /// `Content-Length`.
    pub(super) len: u64,
    /// The client waits for `100 Continue` before sending the body.
    pub(super) expect_continue: bool,
    /// `timeouts.client_body`: the longest wait for the client.
    pub(super) stall: Duration,
}

/// hyper's interim answer, byte for byte.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl PendingBody<'_> {
    /// Sends `100 Continue` when the client waits for it (as hyper's server
    /// does when the body is first asked for, even if it is already in),
    /// then appends the body (what `buf` holds, then reads) to `request`.
    pub(super) async fn read_into(self, request: &mut Vec<u8>) -> Result<(), ClientFault> {
        if self.expect_continue {
            match timeout(self.stall, self.client.write_all(CONTINUE)).await {
                Err(_) => return Err(ClientFault::Stalled),
                Ok(Err(_)) => return Err(ClientFault::Aborted),
                Ok(Ok(())) => {}
            }
        }
        let mut left = self.len as usize;
        let take = left.min(self.buf.len());
        request.extend_from_slice(&self.buf[..take]);
        bytes::Buf::advance(self.buf, take);
        left -= take;
        while left > 0 {
            let before = request.len();
            request.reserve(left);
            let mut limited = (&mut *self.client).take(left as u64);
            match timeout(self.stall, limited.read_buf(request)).await {
                Err(_) => return Err(ClientFault::Stalled),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(ClientFault::Aborted),
                Ok(Ok(_)) => left -= request.len() - before,
            }
        }
        Ok(())
    }
}

/// After lb answered without reading a body of `len` bytes, whether the
/// connection can serve another request: as hyper's server decides
/// (`poll_drain_or_close_read`), only if the body is in already — what was
/// read, else one read that does not wait — and then it is skipped.
pub(super) fn skip_unread_body<S: FastStream>(client: &mut S, buf: &mut Buf, len: u64) -> bool {
    let len = len as usize;
    if buf.is_empty() {
        buf.reserve(len);
        let _ = client.try_read_buf(buf);
    }
    if buf.len() < len {
        return false;
    }
    bytes::Buf::advance(buf, len);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Some(expect_continue)` when the fast path takes the head, `None`
    /// when hyper does.
    fn taken(extra: &str) -> Option<bool> {
        let head = format!("POST / HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
        let mut buf = Buf::from(head.as_bytes());
        match parse_request(&mut buf, 64 * 1024, 1024) {
            Parsed::Fast(head) => Some(head.expect_continue),
            Parsed::Hyper => None,
            Parsed::Partial => panic!("partial: {extra}"),
        }
    }

    #[test]
    fn only_a_lone_100_continue_expectation_stays_on_the_fast_path() {
        let cl = "Content-Length: 5\r\n";
        assert_eq!(taken(&format!("{cl}Expect: 100-continue\r\n")), Some(true));
        assert_eq!(taken(&format!("Expect: 100-Continue\r\n{cl}")), Some(true));
        assert_eq!(taken(cl), Some(false));
        // No body: hyper sends no 100 either.
        assert_eq!(
            taken("Content-Length: 0\r\nExpect: 100-continue\r\n"),
            Some(false)
        );
        assert_eq!(taken("Expect: 100-continue\r\n"), Some(false));
        for hyper in [
            "Expect: 100-continue, x\r\n",
            "Expect: x\r\n",
            "Expect: 100-continue\r\nExpect: 100-continue\r\n",
        ] {
            assert_eq!(taken(&format!("{cl}{hyper}")), None, "{hyper}");
        }
        // Over `buffer_body_limit`, or chunked: hyper's.
        assert_eq!(
            taken("Content-Length: 2000\r\nExpect: 100-continue\r\n"),
            None
        );
        assert_eq!(
            taken("Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n"),
            None
        );
    }

    #[test]
    fn write_ip_matches_display() {
        let ips = [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "9.99.100.255",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:192.0.2.1",
        ];
        for ip in ips {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            write_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
    }
}
