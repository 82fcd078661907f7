//! ns per decision (key digest + lookup + source check + route + throttle + quota) at various table sizes, and
//! the path normaliser that runs before it.
//!
//! `cargo bench -p portcullis-proxy --bench decision`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use governor::clock::DefaultClock;
use portcullis_proxy::decision::path::{EscapedSlashes, normalize};
use portcullis_proxy::decision::{CompiledTable, RequestFacts, decide};
use portcullis_table::{Client, Period, Plan, Quota, RouteScope, Table, Throttle, key_digest};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

fn plans() -> BTreeMap<String, Plan> {
    let mut plans = BTreeMap::new();
    plans.insert(
        "gold".to_string(),
        Plan {
            // Generous enough never to refuse during a benchmark, but checked on every request.
            throttle: Some(Throttle { rate: 1_000_000_000, per_millis: 1000, burst: 1_000_000_000 }),
            quota: Some(Quota { limit: 1 << 39, period: Period::Month }),
            routes: vec![
                RouteScope { path_prefix: "/admin".into(), methods: vec!["GET".into()] },
                RouteScope { path_prefix: "/v1".into(), methods: vec!["GET".into(), "POST".into()] },
            ],
            ..Default::default()
        },
    );
    plans
}

fn addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000u32 + i as u32)
}

const KEY_LEN: usize = 40;

/// Key `i`, written into a stack buffer: a real request's key sits in the just-parsed header buffer (in cache),
/// so the harness should not add a cache miss of its own by reading keys from a large array.
fn key(i: usize) -> [u8; KEY_LEN] {
    let mut k = *b"key-00000000-0123456789abcdef01234567890";
    let mut v = i;
    for d in k[4..12].iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    k
}

fn table(n: usize) -> (CompiledTable<DefaultClock>, Vec<[u8; KEY_LEN]>) {
    let keys: Vec<[u8; KEY_LEN]> = (0..n).map(key).collect();
    let clients = (0..n)
        .map(|i| {
            Client::builder(format!("team-{}/client-{i:07}", i % 100))
                .key(keys[i])
                .source(&format!("{}/32", addr(i)))
                .source("192.168.0.0/16")
                .plan("gold")
                .build()
        })
        .collect();
    let t = Table::new("bench/svc", plans(), clients);
    (CompiledTable::compile(&t, None, DefaultClock::default()).unwrap(), keys)
}

fn bench_clients(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision");
    let now = jiff::Timestamp::now();
    for n in [10usize, 10_000, 100_000] {
        let (t, keys) = table(n);
        assert_eq!(keys[n - 1], key(n - 1));
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("clients", n), &n, |b, &n| {
            b.iter(|| {
                i = (i + 7919) % n;
                let k = key(i);
                let f = RequestFacts {
                    addr: IpAddr::V4(addr(i)),
                    method: "GET",
                    path: "/v1/orders/42",
                    key: Some(&k),
                    digest: None,
                    cert: None,
                    now,
                };
                let d = decide(Some(&t), black_box(&f));
                assert!(d.reason().is_none());
            })
        });
    }
    g.finish();
}

fn bench_prefixes(c: &mut Criterion) {
    let n = 100_000usize;
    // One client with 100 000 disjoint /28s.
    let ranges = (0..n).map(|i| format!("{}/28", Ipv4Addr::from(0x0a00_0000u32 + (i as u32) * 32)).parse().unwrap());
    let key = "one-client-many-prefixes-key-0123456789";
    let client = Client::builder("bench/wide").key(key).sources(ranges).plan("gold").build();
    let t = Table::new("bench/svc", plans(), vec![client]);
    let t = CompiledTable::compile(&t, None, DefaultClock::default()).unwrap();
    let now = jiff::Timestamp::now();
    let mut i = 0u32;
    c.bench_function("decision/one_client_100000_prefixes", |b| {
        b.iter(|| {
            i = (i + 7919) % n as u32;
            let f = RequestFacts {
                addr: IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + i * 32 + 5)),
                method: "POST",
                path: "/v1/orders",
                key: Some(key.as_bytes()),
                digest: None,
                cert: None,
                now,
            };
            let d = decide(Some(&t), black_box(&f));
            assert!(d.reason().is_none());
        })
    });
    // For scale: the SHA-256 of the key alone, which every decision pays.
    c.bench_function("decision/key_digest_only", |b| b.iter(|| key_digest(black_box(key.as_bytes()))));
}

/// The path normaliser, which runs before every decision: an already-normal path (checked, borrowed) and one that
/// needs every rule (dot segments, merged slashes, escapes decoded and upper-cased).
fn bench_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision");
    g.bench_function("path_already_normal", |b| {
        b.iter(|| normalize(black_box("/v1/orders/42/items"), EscapedSlashes::Reject).unwrap().len())
    });
    g.bench_function("path_rewritten", |b| {
        b.iter(|| {
            normalize(black_box("/v1/./orders//%34%32/x/../items%2d%7e%c3%a9"), EscapedSlashes::Reject).unwrap().len()
        })
    });
    g.finish();
}

/// What a table swap costs off the request path: validating and compiling 100 000 clients (file mode also parses
/// JSON; both run on the blocking pool while requests keep using the previous table).
fn bench_compile(c: &mut Criterion) {
    let n = 100_000usize;
    let clients: Vec<Client> = (0..n)
        .map(|i| {
            Client::builder(format!("team-{}/client-{i:07}", i % 100))
                .key(key(i))
                .source(&format!("{}/32", addr(i)))
                .plan("gold")
                .build()
        })
        .collect();
    let t = Table::new("bench/svc", plans(), clients);
    let json = t.to_json();
    let previous = CompiledTable::compile(&t, None, DefaultClock::default()).unwrap();
    let mut g = c.benchmark_group("swap");
    g.sample_size(10);
    g.bench_function("compile_100000_clients_carrying_state", |b| {
        b.iter(|| CompiledTable::compile(black_box(&t), Some(&previous), DefaultClock::default()).unwrap())
    });
    g.bench_function("parse_validate_compile_100000_clients_json", |b| {
        b.iter(|| {
            let t = Table::from_json(black_box(&json), "bench").unwrap();
            CompiledTable::compile(&t, Some(&previous), DefaultClock::default()).unwrap()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = bench_clients, bench_prefixes, bench_path, bench_compile
}
criterion_main!(benches);
