//! Source-range sets: CIDRs turned into sorted, merged integer intervals (IPv4 and IPv6 apart) searched by
//! binary search, so a lookup is O(log n) whatever the number of prefixes.

use ipnet::IpNet;
use std::net::IpAddr;

/// A set of addresses built from CIDRs. IPv4-mapped IPv6 ranges (`::ffff:a.b.c.d/n`, n ≥ 96) also cover the
/// matching IPv4 addresses, because lookups normalise mapped addresses to IPv4 first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrSet {
    v4: Ranges<u32, 2>,
    v6: Ranges<u128, 1>,
}

/// Sorted, merged, inclusive intervals; up to `N` stored inline (most clients have one or two ranges, and the
/// request path then touches no extra cache line), more on the heap.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ranges<T, const N: usize> {
    Inline { len: u8, items: [(T, T); N] },
    Heap(Box<[(T, T)]>),
}

impl<T: Copy + Default, const N: usize> Default for Ranges<T, N> {
    fn default() -> Self {
        Ranges::Inline { len: 0, items: [(T::default(), T::default()); N] }
    }
}

impl<T: Copy + Default, const N: usize> Ranges<T, N> {
    fn from_vec(v: Vec<(T, T)>) -> Self {
        if v.len() <= N {
            let mut items = [(T::default(), T::default()); N];
            items[..v.len()].copy_from_slice(&v);
            Ranges::Inline { len: v.len() as u8, items }
        } else {
            Ranges::Heap(v.into_boxed_slice())
        }
    }

    fn as_slice(&self) -> &[(T, T)] {
        match self {
            Ranges::Inline { len, items } => &items[..usize::from(*len)],
            Ranges::Heap(b) => b,
        }
    }
}

impl CidrSet {
    pub fn new<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in nets {
            match net {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => {
                    let (lo, hi) = (u128::from(n.network()), u128::from(n.broadcast()));
                    v6.push((lo, hi));
                    if n.prefix_len() >= 96 && n.network().to_ipv4_mapped().is_some() {
                        v4.push((lo as u32, hi as u32));
                    }
                }
            }
        }
        Self { v4: Ranges::from_vec(merge(v4)), v6: Ranges::from_vec(merge(v6)) }
    }

    /// Parses a comma-separated CIDR list (bare addresses are taken as host routes).
    pub fn parse_list(s: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net = match part.parse::<IpNet>() {
                Ok(n) => n,
                Err(_) => part.parse::<IpAddr>().map(IpNet::from).map_err(|_| format!("{part:?} is not a CIDR"))?,
            };
            nets.push(net);
        }
        Ok(Self::new(&nets))
    }

    pub fn is_empty(&self) -> bool {
        self.v4.as_slice().is_empty() && self.v6.as_slice().is_empty()
    }

    /// Number of merged intervals (for metrics and benchmarks).
    pub fn intervals(&self) -> usize {
        self.v4.as_slice().len() + self.v6.as_slice().len()
    }

    /// Membership test; IPv4-mapped IPv6 addresses are looked up as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => find(self.v4.as_slice(), u32::from(a)),
            IpAddr::V6(a) => find(self.v6.as_slice(), u128::from(a)),
        }
    }
}

fn find<T: Ord + Copy>(v: &[(T, T)], x: T) -> bool {
    let i = v.partition_point(|&(start, _)| start <= x);
    i > 0 && v[i - 1].1 >= x
}

trait Succ: Copy + Ord {
    fn succ(self) -> Option<Self>;
}
impl Succ for u32 {
    fn succ(self) -> Option<Self> {
        self.checked_add(1)
    }
}
impl Succ for u128 {
    fn succ(self) -> Option<Self> {
        self.checked_add(1)
    }
}

fn merge<T: Succ>(mut v: Vec<(T, T)>) -> Vec<(T, T)> {
    v.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(v.len());
    for (lo, hi) in v {
        if let Some(last) = out.last_mut() {
            // Adjacent or overlapping: extend. `None` from succ means `last` already reaches the maximum.
            if last.1.succ().is_none_or(|next| lo <= next) {
                if hi > last.1 {
                    last.1 = hi;
                }
                continue;
            }
        }
        out.push((lo, hi));
    }
    out
}

/// Normalises an address as the decision logic sees it (IPv4-mapped IPv6 → IPv4).
pub fn normalise(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn set(s: &str) -> CidrSet {
        CidrSet::parse_list(s).unwrap()
    }

    #[test]
    fn basic_membership_and_merging() {
        let s = set("10.0.0.0/8, 10.1.0.0/16, 11.0.0.0/8, 192.168.1.7, 2001:db8::/32");
        assert_eq!(s.v4.as_slice().len(), 2, "10/8 and 11/8 merge, 10.1/16 is inside");
        assert!(s.contains("10.200.0.1".parse().unwrap()));
        assert!(s.contains("11.255.255.255".parse().unwrap()));
        assert!(!s.contains("12.0.0.0".parse().unwrap()));
        assert!(s.contains("192.168.1.7".parse().unwrap()));
        assert!(!s.contains("192.168.1.8".parse().unwrap()));
        assert!(s.contains("2001:db8::1".parse().unwrap()));
        assert!(!s.contains("2001:db9::1".parse().unwrap()));
        assert!(!set("").contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn ipv4_mapped_addresses_and_ranges_are_normalised() {
        let s = set("127.0.0.1/32");
        assert!(s.contains("::ffff:127.0.0.1".parse().unwrap()));
        let m = set("::ffff:10.0.0.0/104");
        assert!(m.contains(IpAddr::V4(Ipv4Addr::new(10, 9, 8, 7))));
        assert!(!m.contains(IpAddr::V4(Ipv4Addr::new(11, 0, 0, 0))));
        let all = set("0.0.0.0/0,::/0");
        assert!(all.contains("255.255.255.255".parse().unwrap()));
        assert!(all.contains("ffff::1".parse().unwrap()));
        assert_eq!(set("0.0.0.0/1,128.0.0.0/1").v4.as_slice(), &[(0, u32::MAX)]);
    }

    fn naive(nets: &[IpNet], ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        nets.iter().any(|n| {
            n.contains(&ip)
                || matches!((n, ip), (IpNet::V6(n6), IpAddr::V4(a)) if n6.prefix_len() >= 96 && n6.contains(&a.to_ipv6_mapped()))
        })
    }

    fn arb_v4() -> impl Strategy<Value = IpNet> {
        // Few distinct high bits so ranges overlap and touch often.
        (0u32..16, any::<u32>(), 0u8..=32).prop_map(|(hi, lo, len)| {
            let addr = Ipv4Addr::from((hi << 28) | (lo >> 4));
            IpNet::V4(ipnet::Ipv4Net::new(addr, len).unwrap().trunc())
        })
    }

    fn arb_v6() -> impl Strategy<Value = IpNet> {
        (0u128..8, any::<u128>(), 0u8..=128, any::<bool>()).prop_map(|(hi, lo, len, mapped)| {
            let raw = if mapped { (0xffffu128 << 32) | (lo & 0xffff_ffff) } else { (hi << 125) | (lo >> 3) };
            let len = if mapped { 96 + len % 33 } else { len };
            IpNet::V6(ipnet::Ipv6Net::new(Ipv6Addr::from(raw), len).unwrap().trunc())
        })
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u32..16, any::<u32>()).prop_map(|(h, l)| IpAddr::V4(Ipv4Addr::from((h << 28) | (l >> 4)))),
            (0u128..8, any::<u128>()).prop_map(|(h, l)| IpAddr::V6(Ipv6Addr::from((h << 125) | (l >> 3)))),
            any::<u32>().prop_map(|l| IpAddr::V6(Ipv4Addr::from(l).to_ipv6_mapped())),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn lookup_agrees_with_naive_scan(
            nets in proptest::collection::vec(prop_oneof![arb_v4(), arb_v6()], 0..40),
            probes in proptest::collection::vec(arb_ip(), 1..64),
        ) {
            let s = CidrSet::new(&nets);
            // Probe the edges of every range too, where off-by-one errors live.
            let mut all = probes.clone();
            for n in &nets {
                all.push(n.network());
                all.push(n.broadcast());
                match n {
                    IpNet::V4(n) => {
                        all.push(IpAddr::V4(Ipv4Addr::from(u32::from(n.network()).wrapping_sub(1))));
                        all.push(IpAddr::V4(Ipv4Addr::from(u32::from(n.broadcast()).wrapping_add(1))));
                    }
                    IpNet::V6(n) => {
                        all.push(IpAddr::V6(Ipv6Addr::from(u128::from(n.network()).wrapping_sub(1))));
                        all.push(IpAddr::V6(Ipv6Addr::from(u128::from(n.broadcast()).wrapping_add(1))));
                    }
                }
            }
            for ip in all {
                prop_assert_eq!(s.contains(ip), naive(&nets, ip), "ip {} nets {:?}", ip, nets);
            }
        }
    }
}
