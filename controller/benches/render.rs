//! Table build + render for one Service with 1 000 / 10 000 / 100 000 clients, from nothing and for a change to one
//! client (`one_change`).
//! Run: `cargo bench -p portcullis-controller --bench render`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use portcullis_controller::fixtures::{Change, build_and_render, fixture};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("build_and_render");
    g.sample_size(10);
    for n in [1_000usize, 10_000, 100_000] {
        let (plans, clients, keys) = fixture(n);
        // Keys are resolved (looked up + SHA-256) on every render, as the controller does from its Secret cache.
        let run = || build_and_render(&plans, &clients, &keys);
        let r = run();
        let bytes: usize = r.shards.iter().map(|(_, s)| s.len()).sum::<usize>() + r.index_json.len();
        eprintln!("{n} clients: {} shards, {bytes} bytes, {:.1} bytes/client", r.shards.len(), bytes as f64 / n as f64);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| b.iter(|| black_box(run())));
    }
    g.finish();
    let mut g = c.benchmark_group("one_change");
    g.sample_size(10);
    for n in [1_000usize, 10_000, 100_000] {
        let change = Change::new(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| b.iter(|| black_box(change.reconcile())));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
