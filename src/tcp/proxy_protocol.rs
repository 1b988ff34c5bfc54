//! HAProxy's PROXY protocol header (`send_proxy_protocol: v1|v2`), written
//! to the backend before any client byte so it sees the client's address.
//! Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::net::SocketAddr;

use crate::config::ProxyProtocol;

/// The v2 signature, the first 12 bytes of every v2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header for a connection from `client` accepted on `local` (lb's own
/// listening address as the client reached it).
pub fn header(version: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    match version {
        ProxyProtocol::V1 => v1(client, local),
        ProxyProtocol::V2 => v2(client, local),
    }
}

/// The header for a connection lb opens on its own behalf (a health
/// probe): the spec's `UNKNOWN` (v1) and `LOCAL` command (v2), which tell
/// the backend to use the connection's own addresses. HAProxy sends the same
/// with `check-send-proxy`; a backend that requires the header then sees a
/// well-formed probe, not a protocol error.
pub fn local_header(version: ProxyProtocol) -> Vec<u8> {
    match version {
        ProxyProtocol::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        ProxyProtocol::V2 => {
            let mut h = V2_SIGNATURE.to_vec();
            // Version 2, command LOCAL; UNSPEC family; no address block.
            h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
            h
        }
    }
}

fn v1(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let family = match (client, local) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => "TCP4",
        (SocketAddr::V6(_), SocketAddr::V6(_)) => "TCP6",
        // Mixed families cannot be described; the spec's answer.
        _ => return b"PROXY UNKNOWN\r\n".to_vec(),
    };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        client.ip(),
        local.ip(),
        client.port(),
        local.port()
    )
    .into_bytes()
}

fn v2(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut h = Vec::with_capacity(16 + 36);
    h.extend_from_slice(&V2_SIGNATURE);
    // Version 2, command PROXY.
    h.push(0x21);
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            h.push(0x11); // TCP over IPv4
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&c.ip().octets());
            h.extend_from_slice(&l.ip().octets());
        }
        (SocketAddr::V6(c), SocketAddr::V6(l)) => {
            h.push(0x21); // TCP over IPv6
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&c.ip().octets());
            h.extend_from_slice(&l.ip().octets());
        }
        _ => {
            h.push(0x00); // UNSPEC, no addresses
            h.extend_from_slice(&0u16.to_be_bytes());
            return h;
        }
    }
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&local.port().to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn local_headers_carry_no_address() {
        assert_eq!(local_header(ProxyProtocol::V1), b"PROXY UNKNOWN\r\n");
        let v2 = local_header(ProxyProtocol::V2);
        assert_eq!(&v2[..12], &V2_SIGNATURE);
        assert_eq!(&v2[12..], &[0x20, 0x00, 0x00, 0x00]);
    }

    #[test]
    fn v1_lines() {
        let h = header(
            ProxyProtocol::V1,
            addr("192.0.2.7:51000"),
            addr("127.0.0.1:5432"),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 5432\r\n");
        let h = header(
            ProxyProtocol::V1,
            addr("[2001:db8::1]:4000"),
            addr("[::1]:80"),
        );
        assert_eq!(h, b"PROXY TCP6 2001:db8::1 ::1 4000 80\r\n");
        let h = header(ProxyProtocol::V1, addr("192.0.2.7:1"), addr("[::1]:80"));
        assert_eq!(h, b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn v2_ipv4_layout() {
        let h = header(
            ProxyProtocol::V2,
            addr("192.0.2.7:51000"),
            addr("127.0.0.1:5432"),
        );
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..20], &[192, 0, 2, 7]);
        assert_eq!(&h[20..24], &[127, 0, 0, 1]);
        assert_eq!(&h[24..], &[0xc7, 0x38, 0x15, 0x38]);
        let h6 = header(ProxyProtocol::V2, addr("[::1]:1"), addr("[::1]:2"));
        assert_eq!(h6.len(), 16 + 36);
        assert_eq!(h6[13], 0x21);
    }
}
