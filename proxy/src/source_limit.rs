//! `--max-connections-per-source`: how many client connections one source may hold open at once.
//!
//! The source is the TCP peer's address; for a peer in `--trusted-proxies` with `--proxy-protocol` it is the PROXY
//! header's source address (the caller decides which and when). IPv6 sources are counted by their /64: one host
//! commonly holds a whole /64, so a per-address count would not bound it. IPv4-mapped IPv6 addresses count as IPv4.
//!
//! A connection over the cap is refused (closed before anything is read), not queued: queueing it would hold one of
//! `--max-connections`' slots, which is what the cap protects. The count is a map behind a mutex, touched twice per
//! connection (open, close), never per request; a source's entry is removed when its last connection closes, so the
//! map holds only sources with open connections (at most `--max-connections` entries).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// The address a source is counted under: IPv4 as is, IPv6 by its /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

#[derive(Debug)]
pub struct SourceLimit {
    /// 0: no cap.
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; the count drops when this does.
#[derive(Debug)]
pub struct SourceSlot(Option<(Arc<SourceLimit>, IpAddr)>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{key} already holds {max} connections (--max-connections-per-source)")]
pub struct AtLimit {
    pub key: IpAddr,
    pub max: usize,
}

impl SourceLimit {
    /// `max` connections per source; 0 turns the cap off.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { max, open: Mutex::new(HashMap::new()) })
    }

    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    /// Counts a connection from `ip`, or refuses it when its source is at the cap.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<SourceSlot, AtLimit> {
        if self.max == 0 {
            return Ok(SourceSlot(None));
        }
        let key = source_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return Err(AtLimit { key, max: self.max });
        }
        *n += 1;
        Ok(SourceSlot(Some((self.clone(), key))))
    }

    /// Connections open from `ip`'s source (tests, debugging).
    pub fn open(&self, ip: IpAddr) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(&source_key(ip)).copied().unwrap_or(0)
    }

    /// Sources with at least one open connection.
    pub fn sources(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl SourceSlot {
    /// A slot that counts nothing (source not capped).
    pub fn uncounted() -> Self {
        Self(None)
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Some((limit, key)) = self.0.take() {
            let mut open = limit.open.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = open.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_holds_at_most_max_and_gets_its_slots_back() {
        let l = SourceLimit::new(2);
        let a1 = l.acquire(ip("192.0.2.1")).unwrap();
        let a2 = l.acquire(ip("192.0.2.1")).unwrap();
        let e = l.acquire(ip("192.0.2.1")).unwrap_err();
        assert_eq!(e, AtLimit { key: ip("192.0.2.1"), max: 2 });
        let _b = l.acquire(ip("192.0.2.2")).expect("another source is not affected");
        assert_eq!(l.open(ip("192.0.2.1")), 2);
        drop(a1);
        let _a3 = l.acquire(ip("192.0.2.1")).expect("a closed connection frees its slot");
        drop(a2);
        assert_eq!(l.open(ip("192.0.2.1")), 1);
    }

    #[test]
    fn entries_go_when_their_last_connection_closes() {
        let l = SourceLimit::new(3);
        let slots: Vec<_> = (1..=50).map(|i| l.acquire(ip(&format!("198.51.100.{i}"))).unwrap()).collect();
        assert_eq!(l.sources(), 50);
        drop(slots);
        assert_eq!(l.sources(), 0);
    }

    #[test]
    fn zero_means_no_cap() {
        let l = SourceLimit::new(0);
        assert!(!l.enabled());
        let slots: Vec<_> = (0..1000).map(|_| l.acquire(ip("192.0.2.1")).unwrap()).collect();
        assert_eq!(slots.len(), 1000);
        assert_eq!(l.sources(), 0, "nothing is counted");
    }

    #[test]
    fn ipv6_counts_by_slash_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(source_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(source_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        let l = SourceLimit::new(1);
        let _a = l.acquire(ip("2001:db8:1:2::1")).unwrap();
        assert!(l.acquire(ip("2001:db8:1:2:ffff::9")).is_err(), "same /64");
        assert!(l.acquire(ip("2001:db8:1:3::1")).is_ok(), "another /64");
        let _v4 = l.acquire(ip("192.0.2.7")).unwrap();
        assert!(l.acquire(ip("::ffff:192.0.2.7")).is_err(), "mapped address is the same source");
    }
}
