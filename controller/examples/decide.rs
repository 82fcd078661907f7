//! `cargo run --release -p portcullis-controller --features fixtures --example decide -- [N] [ROUNDS]`: the time of
//! `reconcile_service`'s build (decide) of a table of N clients (default 100 000) after one client changed, from
//! caches filled as the propagation bench fills them ([`portcullis_controller::fixtures::Cached`]).
//! `DECIDE_STATUSES=1`: every client's status written (each object replaced) after the first build, as after the
//! bench's bulk load; `DECIDE_THREAD=1`: the caches filled (and statuses written) on another thread than the builds;
//! `DECIDE_SCATTER=1`: every client object replaced in a shuffled order among other allocations.

use portcullis_controller::fixtures::Cached;
use portcullis_table::naming::index_name;
use portcullis_table::shard::{MAX_SHARD_BYTES, Previous, render};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a number")).collect();
    let n = args.first().copied().unwrap_or(100_000);
    let rounds = args.get(1).copied().unwrap_or(15);
    let t = Instant::now();
    // `DECIDE_THREAD`: the caches filled on another thread than the builds (as the reflectors fill them in the
    // controller: another malloc arena, another core's cache).
    let mut caches = if std::env::var_os("DECIDE_THREAD").is_some() {
        std::thread::spawn(move || Cached::new(n)).join().expect("filled")
    } else {
        Cached::new(n)
    };
    eprintln!("caches of {n} clients filled in {:?}", t.elapsed());
    let t = Instant::now();
    let mut memo = caches.decide(None).memo.expect("a memo");
    let mut index =
        render(&memo.table, &index_name("orders"), Previous::NONE, 1, MAX_SHARD_BYTES).expect("renders").index;
    eprintln!("first build {:?}", t.elapsed());
    // As in the propagation bench: every client's status written after the bulk load, and a build after that.
    if std::env::var_os("DECIDE_STATUSES").is_some() {
        let t = Instant::now();
        caches = std::thread::spawn(move || {
            caches.write_statuses();
            caches
        })
        .join()
        .expect("written");
        let d = caches.decide(Some(&memo));
        memo = d.memo.expect("a memo");
        eprintln!("statuses written and a build after them {:?}", t.elapsed());
    }
    // `DECIDE_SCATTER`: every client object replaced in a shuffled order among kept 1–8 KiB allocations, and a
    // build after that (the running controller's heap after a bulk load).
    let _filler = if std::env::var_os("DECIDE_SCATTER").is_some() {
        let t = Instant::now();
        let filler = caches.scatter();
        let d = caches.decide(Some(&memo));
        memo = d.memo.expect("a memo");
        eprintln!("clients scattered and a build after them {:?}", t.elapsed());
        filler
    } else {
        Vec::new()
    };
    let (mut took, mut rendering) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        caches.change((r * 7919) % n, 2 + r as i64);
        let t = Instant::now();
        let d = caches.decide(Some(&memo));
        took.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(d.changed.as_ref().map(Vec::len), Some(1), "one client changed");
        let t = Instant::now();
        let previous = Previous { changed: d.changed.as_deref(), ..Previous::of(Some(&index), Some(&memo.table)) };
        let rendered =
            render(&d.table, &index_name("orders"), previous, 2 + r as u64, MAX_SHARD_BYTES).expect("renders");
        rendering.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(rendered.shards.len(), 1, "one shard written");
        index = rendered.index;
        memo = d.memo.expect("a memo");
    }
    rendering.sort_by(f64::total_cmp);
    println!("render of that change: median {:.1} ms", rendering[rendering.len() / 2]);
    took.sort_by(f64::total_cmp);
    println!(
        "decide after a one-client change, {n} clients, {rounds} rounds: min {:.1} ms, median {:.1} ms, max {:.1} ms",
        took[0],
        took[took.len() / 2],
        took[took.len() - 1]
    );
}
