//! The server name in a TLS ClientHello, read without terminating TLS: for
//! SNI passthrough, where a TCP listener routes on the name and relays the
//! encrypted bytes untouched.
//!
//! [`peek_sni`] parses what has arrived so far; [`read_client_hello`] reads
//! a stream until the answer is known. The caller then writes the bytes
//! read to the chosen backend and copies the rest both ways.
//!
//! The parse follows RFC 8446 §4.1.2 and RFC 6066 §3: TLS records
//! (type 22, handshake) carrying one handshake message of type 1; in it
//! legacy_version, random, legacy_session_id, cipher_suites,
//! legacy_compression_methods and extensions; in extension 0
//! (server_name) a list whose `host_name` (type 0) entry is the name. The
//! ClientHello may span several records. It is bounded: at most
//! [`MAX_CLIENT_HELLO`] bytes of handshake message in at most
//! [`MAX_RECORDS`] records, so at most [`MAX_PEEK_BYTES`] bytes are ever
//! needed. Nothing here panics on any input.

use std::borrow::Cow;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The largest ClientHello accepted, handshake header included (16 KiB).
/// Real ones are 200 bytes to 2 KiB (post-quantum key shares included).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// The most TLS records a ClientHello may be split over. Clients send it
/// in one; a few records is legal, hundreds is an attack on the buffer.
pub const MAX_RECORDS: usize = 64;

/// TLS record header: type, version (2), length (2).
const RECORD_HEADER: usize = 5;

/// Handshake header: type, length (3).
const HANDSHAKE_HEADER: usize = 4;

/// The most bytes [`peek_sni`] can need before it answers: a
/// [`MAX_CLIENT_HELLO`] message in [`MAX_RECORDS`] records. A good default
/// `limit` for [`read_client_hello`].
pub const MAX_PEEK_BYTES: usize = MAX_CLIENT_HELLO + MAX_RECORDS * RECORD_HEADER;

/// A TLS record's plaintext is at most 2^14 bytes (RFC 8446 §5.1).
const MAX_RECORD_PAYLOAD: usize = 1 << 14;

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST_NAME: u8 = 0;

/// What the bytes so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// A ClientHello has begun and is not complete: read more.
    NeedMore,
    /// A complete, well-formed ClientHello. `Some`: its host_name,
    /// lowercased, without a trailing dot. `None`: it has no server_name.
    Sni(Option<String>),
    /// The first bytes are not a TLS handshake record (plain HTTP, SSLv2,
    /// anything else).
    NotTls,
    /// TLS records, but not a ClientHello this parser accepts.
    Invalid(&'static str),
}

/// Parses the ClientHello at the start of `buf`. Bytes after it (more
/// records) are ignored. Call again with more bytes after `NeedMore`.
pub fn peek_sni(buf: &[u8]) -> Peek {
    match assemble(buf) {
        Ok(body) => match parse_client_hello(&body) {
            Ok(sni) => Peek::Sni(sni),
            Err(reason) => Peek::Invalid(reason),
        },
        Err(peek) => peek,
    }
}

/// The ClientHello body (after the handshake header) from the records at
/// the start of `buf`; borrowed when one record holds it all.
fn assemble(buf: &[u8]) -> Result<Cow<'_, [u8]>, Peek> {
    match buf {
        [] => return Err(Peek::NeedMore),
        [first, ..] if *first != CONTENT_HANDSHAKE => return Err(Peek::NotTls),
        [_] => return Err(Peek::NeedMore),
        [_, major, ..] if *major != 3 => return Err(Peek::NotTls),
        _ => {}
    }
    let mut pos = 0;
    let mut records = 0;
    // The first record's fragment, and all fragments once a second record
    // is needed.
    let mut first: &[u8] = &[];
    let mut joined: Vec<u8> = Vec::new();
    loop {
        if records == MAX_RECORDS {
            return Err(Peek::Invalid("ClientHello split over too many records"));
        }
        let Some(header) = buf.get(pos..pos + RECORD_HEADER) else {
            return Err(Peek::NeedMore);
        };
        if header[0] != CONTENT_HANDSHAKE {
            return Err(Peek::Invalid("non-handshake record inside the ClientHello"));
        }
        if header[1] != 3 {
            return Err(Peek::Invalid("record version is not 3.x"));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 {
            return Err(Peek::Invalid("empty handshake record"));
        }
        if len > MAX_RECORD_PAYLOAD {
            return Err(Peek::Invalid("record longer than 16 KiB"));
        }
        pos += RECORD_HEADER;
        records += 1;
        let available = len.min(buf.len() - pos);
        let fragment = &buf[pos..pos + available];
        let have: &[u8] = if records == 1 {
            first = fragment;
            first
        } else {
            if joined.is_empty() {
                joined.reserve(first.len() + len);
                joined.extend_from_slice(first);
            }
            joined.extend_from_slice(fragment);
            &joined
        };
        if have.len() >= HANDSHAKE_HEADER {
            if have[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(Peek::Invalid(
                    "first handshake message is not a ClientHello",
                ));
            }
            let body_len =
                (usize::from(have[1]) << 16) | (usize::from(have[2]) << 8) | usize::from(have[3]);
            let end = HANDSHAKE_HEADER + body_len;
            if end > MAX_CLIENT_HELLO {
                return Err(Peek::Invalid("ClientHello larger than 16 KiB"));
            }
            if have.len() >= end {
                return Ok(if records == 1 {
                    Cow::Borrowed(&first[HANDSHAKE_HEADER..end])
                } else {
                    joined.truncate(end);
                    joined.drain(..HANDSHAKE_HEADER);
                    Cow::Owned(joined)
                });
            }
        }
        if available < len {
            return Err(Peek::NeedMore);
        }
        pos += len;
    }
}

/// Big-endian reads over a byte slice, `None` past its end.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(rest: &'a [u8]) -> Self {
        Reader { rest }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    /// A vector with a two-byte length.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }
}

/// The host_name of a complete ClientHello body.
fn parse_client_hello(body: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader::new(body);
    let version = r.u16().ok_or("ClientHello ends in legacy_version")?;
    if version >> 8 != 3 {
        return Err("ClientHello version is not 3.x");
    }
    r.take(32).ok_or("ClientHello ends in random")?;
    let session_id = r.vec8().ok_or("ClientHello ends in legacy_session_id")?;
    if session_id.len() > 32 {
        return Err("legacy_session_id longer than 32 bytes");
    }
    let suites = r.vec16().ok_or("ClientHello ends in cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err("cipher_suites is empty or of odd length");
    }
    let compression = r
        .vec8()
        .ok_or("ClientHello ends in legacy_compression_methods")?;
    if compression.is_empty() {
        return Err("legacy_compression_methods is empty");
    }
    if r.is_empty() {
        // No extensions at all (before TLS 1.2 this was legal).
        return Ok(None);
    }
    let extensions = r.vec16().ok_or("ClientHello ends in extensions")?;
    if !r.is_empty() {
        return Err("bytes after the extensions");
    }
    let mut r = Reader::new(extensions);
    let mut sni = None;
    let mut seen = false;
    while !r.is_empty() {
        let kind = r.u16().ok_or("extensions end inside an extension")?;
        let data = r.vec16().ok_or("extensions end inside an extension")?;
        if kind == EXTENSION_SERVER_NAME {
            if seen {
                return Err("two server_name extensions");
            }
            seen = true;
            sni = parse_server_name(data)?;
        }
    }
    Ok(sni)
}

/// The host_name in a server_name extension (RFC 6066 §3).
fn parse_server_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader::new(data);
    let list = r.vec16().ok_or("server_name extension truncated")?;
    if !r.is_empty() {
        return Err("bytes after the server_name list");
    }
    if list.is_empty() {
        return Err("server_name list is empty");
    }
    let mut r = Reader::new(list);
    let mut host = None;
    while !r.is_empty() {
        let kind = r.u8().ok_or("server_name list truncated")?;
        // Every name type so far defined carries a two-byte length.
        let name = r.vec16().ok_or("server_name list truncated")?;
        if kind == NAME_TYPE_HOST_NAME {
            if host.is_some() {
                return Err("two host_name entries");
            }
            host = Some(host_name(name)?);
        }
    }
    Ok(host)
}

/// A host_name as ASCII letters, digits, `-`, `_` and `.`, lowercased, one
/// trailing dot dropped.
fn host_name(name: &[u8]) -> Result<String, &'static str> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() {
        return Err("empty host_name");
    }
    if name.len() > 253 {
        return Err("host_name longer than 253 bytes");
    }
    if !name
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("host_name is not a DNS name");
    }
    let mut name = name.to_vec();
    name.make_ascii_lowercase();
    // Checked ASCII above.
    String::from_utf8(name).map_err(|_| "host_name is not a DNS name")
}

/// Why [`read_client_hello`] found no server name.
#[derive(Debug, thiserror::Error)]
pub enum ReadHelloError {
    #[error("reading the ClientHello: {0}")]
    Io(#[from] io::Error),
    #[error("no complete ClientHello within {0:?}")]
    Timeout(Duration),
    #[error("client closed the connection after {read} bytes, before its ClientHello ended")]
    Closed { read: usize },
    #[error("not TLS: the client's first bytes are not a TLS handshake")]
    NotTls,
    #[error("invalid ClientHello: {0}")]
    Invalid(&'static str),
    #[error("no complete ClientHello within {limit} bytes")]
    TooLarge { limit: usize },
}

/// Reads from `stream` until its ClientHello is complete, at most `limit`
/// bytes ([`MAX_PEEK_BYTES`] is enough for any hello [`peek_sni`]
/// accepts) and for at most `timeout` in all. Returns every byte read (the
/// ClientHello, and whatever followed it in the same reads: relay all of
/// it) and the server name (`None`: the hello has none).
pub async fn read_client_hello<S>(
    stream: &mut S,
    limit: usize,
    timeout: Duration,
) -> Result<(Vec<u8>, Option<String>), ReadHelloError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    tokio::time::timeout(timeout, read_until_known(stream, limit))
        .await
        .map_err(|_| ReadHelloError::Timeout(timeout))?
}

async fn read_until_known<S>(
    stream: &mut S,
    limit: usize,
) -> Result<(Vec<u8>, Option<String>), ReadHelloError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    const CHUNK: usize = 4096;
    let mut buf = Vec::with_capacity(limit.min(CHUNK));
    loop {
        if buf.len() >= limit {
            return Err(ReadHelloError::TooLarge { limit });
        }
        let old = buf.len();
        buf.resize(old + (limit - old).min(CHUNK), 0);
        let n = match stream.read(&mut buf[old..]).await {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                buf.truncate(old);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        buf.truncate(old + n);
        if n == 0 {
            return Err(ReadHelloError::Closed { read: old });
        }
        match peek_sni(&buf) {
            Peek::NeedMore => continue,
            Peek::Sni(sni) => return Ok((buf, sni)),
            Peek::NotTls => return Err(ReadHelloError::NotTls),
            Peek::Invalid(reason) => return Err(ReadHelloError::Invalid(reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, SupportedProtocolVersion};
    use tokio::io::AsyncWriteExt;

    fn client_config(
        versions: &[&'static SupportedProtocolVersion],
        sni: bool,
    ) -> Arc<ClientConfig> {
        let mut config = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.enable_sni = sni;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// The bytes a rustls client sends first, connecting to `name`.
    fn client_hello(
        name: &str,
        sni: bool,
        versions: &[&'static SupportedProtocolVersion],
    ) -> Vec<u8> {
        let server_name = ServerName::try_from(name.to_string()).unwrap();
        let mut conn = ClientConnection::new(client_config(versions, sni), server_name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    fn hellos() -> Vec<(Vec<u8>, Option<&'static str>)> {
        vec![
            (
                client_hello("Example.COM", true, rustls::DEFAULT_VERSIONS),
                Some("example.com"),
            ),
            (
                client_hello("www.example.com", true, &[&rustls::version::TLS12]),
                Some("www.example.com"),
            ),
            (
                client_hello("a.test", true, &[&rustls::version::TLS13]),
                Some("a.test"),
            ),
            // SNI disabled, and an IP address (which rustls never sends).
            (
                client_hello("example.com", false, rustls::DEFAULT_VERSIONS),
                None,
            ),
            (
                client_hello("127.0.0.1", true, rustls::DEFAULT_VERSIONS),
                None,
            ),
        ]
    }

    /// Re-frames the handshake message of a one-record hello into records
    /// of at most `size` bytes.
    fn refragment(hello: &[u8], size: usize) -> Vec<u8> {
        let len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
        assert_eq!(hello.len(), RECORD_HEADER + len, "one record");
        let mut out = Vec::new();
        for chunk in hello[RECORD_HEADER..].chunks(size) {
            out.extend_from_slice(&hello[..3]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn real_client_hellos() {
        for (hello, want) in hellos() {
            assert_eq!(
                peek_sni(&hello),
                Peek::Sni(want.map(String::from)),
                "{want:?}"
            );
        }
    }

    #[test]
    fn every_prefix_needs_more() {
        for (hello, want) in hellos() {
            for cut in 0..hello.len() {
                assert_eq!(
                    peek_sni(&hello[..cut]),
                    Peek::NeedMore,
                    "{want:?} cut at {cut}"
                );
            }
            // Whatever follows the ClientHello changes nothing.
            let mut more = hello.clone();
            more.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01, 0x17, 0x03]);
            assert_eq!(peek_sni(&more), Peek::Sni(want.map(String::from)));
        }
    }

    #[test]
    fn hello_over_several_records() {
        for (hello, want) in hellos() {
            for size in [1000, 300, 64, hello.len().div_ceil(MAX_RECORDS)] {
                let framed = refragment(&hello, size);
                assert_eq!(
                    peek_sni(&framed),
                    Peek::Sni(want.map(String::from)),
                    "size {size}"
                );
                for cut in 0..framed.len() {
                    assert_eq!(
                        peek_sni(&framed[..cut]),
                        Peek::NeedMore,
                        "size {size} cut {cut}"
                    );
                }
            }
            // Any size below message / (MAX_RECORDS + 1) needs more records.
            let message = hello.len() - RECORD_HEADER;
            let too_many = refragment(&hello, message / (MAX_RECORDS + 1));
            assert_eq!(
                peek_sni(&too_many),
                Peek::Invalid("ClientHello split over too many records")
            );
        }
    }

    #[test]
    fn not_tls() {
        for input in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"PRI * HTTP/2.0\r\n",
            b"\x80\x2e\x01\x00\x02", // SSLv2-style hello
            b"\x16\x02",
            b"\x16\x7f\x00",
            b"\x00",
        ] {
            assert_eq!(peek_sni(input), Peek::NotTls, "{input:?}");
        }
        assert_eq!(peek_sni(b""), Peek::NeedMore);
        assert_eq!(peek_sni(b"\x16"), Peek::NeedMore);
        assert_eq!(peek_sni(b"\x16\x03\x01\x00"), Peek::NeedMore);
    }

    #[test]
    fn invalid_framing() {
        let (hello, _) = &hellos()[0];
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"\x16\x03\x01\x00\x00".to_vec(), "empty handshake record"),
            (
                b"\x16\x03\x01\x40\x01".to_vec(),
                "record longer than 16 KiB",
            ),
            (
                b"\x16\x03\x01\x00\x04\x02\x00\x00\x00".to_vec(),
                "first handshake message is not a ClientHello",
            ),
            (
                b"\x16\x03\x01\x00\x04\x01\x00\x40\x00".to_vec(),
                "ClientHello larger than 16 KiB",
            ),
            (
                b"\x16\x03\x01\x00\x02\x01\x00\x17\x03\x03\x00\x01\x00".to_vec(),
                "non-handshake record inside the ClientHello",
            ),
            (
                b"\x16\x03\x01\x00\x02\x01\x00\x16\x02\x03\x00\x01\x00".to_vec(),
                "record version is not 3.x",
            ),
            // A ClientHello of 4 bytes: the version alone, then nothing.
            (
                b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00".to_vec(),
                "ClientHello ends in random",
            ),
        ];
        for (input, reason) in cases {
            assert_eq!(peek_sni(&input), Peek::Invalid(reason), "{input:?}");
        }
        // The largest allowed message is still only NeedMore while short.
        let mut big = b"\x16\x03\x01\x40\x00\x01\x00\x3f\xfc".to_vec();
        big.resize(1000, 0);
        assert_eq!(peek_sni(&big), Peek::NeedMore);
        // A hello whose extensions' length is off by one.
        let mut off = hello.clone();
        let ext_len_at = extensions_length_offset(&off);
        off[ext_len_at + 1] = off[ext_len_at + 1].wrapping_add(1);
        assert!(
            matches!(peek_sni(&off), Peek::Invalid(_)),
            "{:?}",
            peek_sni(&off)
        );
    }

    /// Where the two-byte extensions length sits in a one-record hello.
    fn extensions_length_offset(hello: &[u8]) -> usize {
        let mut at = RECORD_HEADER + HANDSHAKE_HEADER + 2 + 32;
        at += 1 + usize::from(hello[at]);
        at += 2 + usize::from(u16::from_be_bytes([hello[at], hello[at + 1]]));
        at += 1 + usize::from(hello[at]);
        at
    }

    /// A hand-built hello: one record, the given extensions block.
    fn hello_with_extensions(extensions: &[u8]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]);
        body.extend_from_slice(&[0x01, 0x00]);
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(extensions);
        let mut out = vec![0x16, 0x03, 0x01];
        out.extend_from_slice(&((body.len() + 4) as u16).to_be_bytes());
        out.push(HANDSHAKE_CLIENT_HELLO);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&body);
        out
    }

    fn sni_extension(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in entries {
            list.push(*kind);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut ext = vec![0x00, 0x00];
        ext.extend_from_slice(&((list.len() + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
        ext.extend_from_slice(&list);
        ext
    }

    #[test]
    fn server_name_rules() {
        let ok =
            |entries: &[(u8, &[u8])]| peek_sni(&hello_with_extensions(&sni_extension(entries)));
        assert_eq!(
            ok(&[(0, b"A.Example.")]),
            Peek::Sni(Some("a.example".into()))
        );
        assert_eq!(
            ok(&[(1, b"other"), (0, b"x.test")]),
            Peek::Sni(Some("x.test".into()))
        );
        assert_eq!(ok(&[(1, b"other")]), Peek::Sni(None));
        assert_eq!(
            ok(&[(0, b"a"), (0, b"b")]),
            Peek::Invalid("two host_name entries")
        );
        assert_eq!(ok(&[(0, b"")]), Peek::Invalid("empty host_name"));
        assert_eq!(
            ok(&[(0, b"a b")]),
            Peek::Invalid("host_name is not a DNS name")
        );
        assert_eq!(
            ok(&[(0, b"a\0b")]),
            Peek::Invalid("host_name is not a DNS name")
        );
        assert_eq!(
            ok(&[(0, "é.test".as_bytes())]),
            Peek::Invalid("host_name is not a DNS name")
        );
        assert_eq!(
            ok(&[(0, &[b'a'; 254])]),
            Peek::Invalid("host_name longer than 253 bytes")
        );
        assert_eq!(ok(&[]), Peek::Invalid("server_name list is empty"));

        let two = [sni_extension(&[(0, b"a")]), sni_extension(&[(0, b"b")])].concat();
        assert_eq!(
            peek_sni(&hello_with_extensions(&two)),
            Peek::Invalid("two server_name extensions")
        );
        // Other extensions around it are skipped.
        let around = [
            &b"\x00\x0a\x00\x02\x00\x1d"[..],
            &sni_extension(&[(0, b"m.test")])[..],
            &b"\xff\x01\x00\x00"[..],
        ]
        .concat();
        assert_eq!(
            peek_sni(&hello_with_extensions(&around)),
            Peek::Sni(Some("m.test".into()))
        );
        assert_eq!(peek_sni(&hello_with_extensions(b"")), Peek::Sni(None));
        // An empty server_name extension (what a server echoes) is refused.
        assert_eq!(
            peek_sni(&hello_with_extensions(b"\x00\x00\x00\x00")),
            Peek::Invalid("server_name extension truncated")
        );
        assert_eq!(
            peek_sni(&hello_with_extensions(b"\x00\x00\x00")),
            Peek::Invalid("extensions end inside an extension")
        );
    }

    #[test]
    fn hello_without_extensions() {
        let mut hello = hello_with_extensions(b"");
        // Drop the (empty) extensions block altogether.
        hello.truncate(hello.len() - 2);
        hello[4] -= 2;
        hello[8] -= 2;
        assert_eq!(peek_sni(&hello), Peek::Sni(None));
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = fastrand::Rng::with_seed(17);
        for _ in 0..20_000 {
            let len = rng.usize(0..300);
            let mut input: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            // Half of them look like a handshake record, to get past the
            // first checks.
            if rng.bool() && len >= 6 {
                input[0] = 0x16;
                input[1] = 0x03;
                input[5] = 0x01;
            }
            let _ = peek_sni(&input);
        }
        // Every single-byte change and every truncation of real hellos.
        for (hello, _) in hellos() {
            for at in 0..hello.len() {
                for value in [0x00, 0x01, 0x7f, 0x80, 0xff, hello[at] ^ 0x01] {
                    let mut bad = hello.clone();
                    bad[at] = value;
                    let _ = peek_sni(&bad);
                }
                let _ = peek_sni(&hello[at..]);
            }
        }
    }

    async fn feed(mut writer: tokio::io::DuplexStream, bytes: Vec<u8>, piece: usize) {
        for chunk in bytes.chunks(piece) {
            writer.write_all(chunk).await.unwrap();
            tokio::task::yield_now().await;
        }
        // Keep the stream open until the reader is done.
        std::future::pending::<()>().await;
    }

    #[tokio::test]
    async fn reads_a_hello_in_pieces() {
        let hello = client_hello("Piece.Test", true, rustls::DEFAULT_VERSIONS);
        for piece in [1, 7, 100, 4096] {
            let (mut reader, writer) = tokio::io::duplex(64);
            let writing = tokio::spawn(feed(writer, hello.clone(), piece));
            let (bytes, sni) =
                read_client_hello(&mut reader, MAX_PEEK_BYTES, Duration::from_secs(5))
                    .await
                    .unwrap();
            assert_eq!(bytes, hello, "piece {piece}");
            assert_eq!(sni.as_deref(), Some("piece.test"));
            writing.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn read_errors() {
        let hello = client_hello("a.test", true, rustls::DEFAULT_VERSIONS);
        let half = hello[..hello.len() / 2].to_vec();

        let (mut reader, writer) = tokio::io::duplex(64 * 1024);
        let writing = tokio::spawn(feed(writer, half.clone(), 4096));
        let err = read_client_hello(&mut reader, MAX_PEEK_BYTES, Duration::from_secs(3))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "no complete ClientHello within 3s");
        writing.abort();

        let (mut reader, mut writer) = tokio::io::duplex(64 * 1024);
        writer.write_all(&half).await.unwrap();
        drop(writer);
        let err = read_client_hello(&mut reader, MAX_PEEK_BYTES, Duration::from_secs(3))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ReadHelloError::Closed { read } if read == half.len()),
            "{err}"
        );

        let (mut reader, mut writer) = tokio::io::duplex(64 * 1024);
        writer.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let err = read_client_hello(&mut reader, MAX_PEEK_BYTES, Duration::from_secs(3))
            .await
            .unwrap_err();
        assert!(matches!(err, ReadHelloError::NotTls), "{err}");

        let (mut reader, mut writer) = tokio::io::duplex(64 * 1024);
        writer.write_all(&hello).await.unwrap();
        let err = read_client_hello(&mut reader, 100, Duration::from_secs(3))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "no complete ClientHello within 100 bytes");

        let (mut reader, mut writer) = tokio::io::duplex(64 * 1024);
        writer.write_all(b"\x16\x03\x01\x00\x00").await.unwrap();
        let err = read_client_hello(&mut reader, MAX_PEEK_BYTES, Duration::from_secs(3))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid ClientHello: empty handshake record"
        );
    }
}
