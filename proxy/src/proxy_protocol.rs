//! PROXY protocol v1 (text) and v2 (binary) headers, parsed by hand (HAProxy's `proxy-protocol.txt`).
//!
//! Only the source address is used. `LOCAL` (v2) and `UNKNOWN` (v1) commands, UNIX and unspecified families
//! carry no client address: the socket peer is used then.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const V1_PREFIX: &[u8] = b"PROXY ";
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1: a header is at most 107 bytes including CRLF.
const V1_MAX: usize = 107;
/// v2: we accept at most this many bytes of addresses + TLVs.
const V2_MAX_PAYLOAD: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The original client, when the header carries one.
    pub source: Option<SocketAddr>,
    /// Bytes the header occupies at the start of the stream.
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The bytes so far could still be a PROXY header: read more.
    Incomplete,
    /// Not a PROXY header (plain HTTP, or TLS, ...).
    NotProxy,
    Header(ProxyHeader),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    #[error("malformed PROXY v2 header: {0}")]
    V2(&'static str),
}

/// Classifies the first bytes of a connection.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let could_be = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        buf[..n] == sig[..n]
    };
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    if could_be(V1_PREFIX) {
        if buf.len() < V1_PREFIX.len() {
            return Ok(Parsed::Incomplete);
        }
        return parse_v1(buf);
    }
    if could_be(V2_SIGNATURE) {
        if buf.len() < 16 {
            return Ok(Parsed::Incomplete);
        }
        return parse_v2(buf);
    }
    Ok(Parsed::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::V1("no CRLF within 107 bytes"))
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::V1("not ASCII"))?;
    let len = end + 2;
    let mut parts = line.split(' ');
    parts.next(); // "PROXY"
    match parts.next() {
        Some("UNKNOWN") => Ok(Parsed::Header(ProxyHeader { source: None, len })),
        Some(proto @ ("TCP4" | "TCP6")) => {
            let fields: Vec<&str> = parts.collect();
            let [src, dst, sport, dport] = fields[..] else { return Err(ProxyError::V1("expected 4 fields")) };
            let src: IpAddr = src.parse().map_err(|_| ProxyError::V1("bad source address"))?;
            let _dst: IpAddr = dst.parse().map_err(|_| ProxyError::V1("bad destination address"))?;
            let sport: u16 = sport.parse().map_err(|_| ProxyError::V1("bad source port"))?;
            let _dport: u16 = dport.parse().map_err(|_| ProxyError::V1("bad destination port"))?;
            if (proto == "TCP4") != src.is_ipv4() {
                return Err(ProxyError::V1("address family does not match protocol"));
            }
            Ok(Parsed::Header(ProxyHeader { source: Some(SocketAddr::new(src, sport)), len }))
        }
        _ => Err(ProxyError::V1("unknown protocol")),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::V2("version is not 2"));
    }
    let fam = buf[13];
    let payload = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if payload > V2_MAX_PAYLOAD {
        return Err(ProxyError::V2("header too long"));
    }
    let len = 16 + payload;
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let body = &buf[16..len];
    let source = match ver_cmd & 0x0f {
        0 => None, // LOCAL: health checks from the proxy itself
        1 => match fam >> 4 {
            0 | 3 => None, // UNSPEC, UNIX
            1 => {
                if body.len() < 12 {
                    return Err(ProxyError::V2("short IPv4 address block"));
                }
                let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([body[8], body[9]])))
            }
            2 => {
                if body.len() < 36 {
                    return Err(ProxyError::V2("short IPv6 address block"));
                }
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[..16]);
                Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), u16::from_be_bytes([body[32], body[33]])))
            }
            _ => return Err(ProxyError::V2("unknown address family")),
        },
        _ => return Err(ProxyError::V2("unknown command")),
    };
    Ok(Parsed::Header(ProxyHeader { source, len }))
}

/// Encodes a v2 PROXY header (for tests and tools).
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(src).octets());
            out.extend_from_slice(&v6(dst).octets());
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
        }
    }
    out
}

/// Encodes a v1 PROXY header (for tests and tools).
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {proto} {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port()).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_round_trip_and_incremental() {
        let h = encode_v1(sa("192.0.2.1:5555"), sa("127.0.0.1:8443"));
        let mut buf = h.clone();
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n");
        for n in 1..h.len() {
            assert_eq!(parse(&buf[..n]).unwrap(), Parsed::Incomplete, "{n}");
        }
        assert_eq!(
            parse(&buf).unwrap(),
            Parsed::Header(ProxyHeader { source: Some(sa("192.0.2.1:5555")), len: h.len() })
        );
        let h6 = encode_v1(sa("[2001:db8::1]:1"), sa("[::1]:2"));
        assert!(
            matches!(parse(&h6).unwrap(), Parsed::Header(ProxyHeader { source: Some(s), .. }) if s == sa("[2001:db8::1]:1"))
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), Parsed::Header(ProxyHeader { source: None, len: 15 }));
    }

    #[test]
    fn v1_garbage_is_an_error() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4\r\n"[..],
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP9 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 99999 2\r\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse(&[b'P', b'R', b'O', b'X', b'Y', b' ', b'x'].repeat(20)).is_err());
    }

    #[test]
    fn v2_round_trip() {
        let h = encode_v2(sa("192.0.2.1:5555"), sa("127.0.0.1:8443"));
        for n in 1..h.len() {
            assert_eq!(parse(&h[..n]).unwrap(), Parsed::Incomplete, "{n}");
        }
        assert_eq!(parse(&h).unwrap(), Parsed::Header(ProxyHeader { source: Some(sa("192.0.2.1:5555")), len: 28 }));
        let h6 = encode_v2(sa("[2001:db8::1]:7"), sa("[::1]:8"));
        assert_eq!(parse(&h6).unwrap(), Parsed::Header(ProxyHeader { source: Some(sa("[2001:db8::1]:7")), len: 52 }));
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local).unwrap(), Parsed::Header(ProxyHeader { source: None, len: 16 }));
        let mut bad = h.clone();
        bad[12] = 0x31;
        assert!(parse(&bad).is_err());
    }

    #[test]
    fn http_is_not_proxy() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n").unwrap(), Parsed::NotProxy);
        assert_eq!(parse(b"PRI * HTTP/2.0").unwrap(), Parsed::NotProxy);
        assert_eq!(parse(b"PRO").unwrap(), Parsed::Incomplete);
        assert_eq!(parse(b"\r\n\r\nX").unwrap(), Parsed::NotProxy);
    }
}
