//! `bench-upstream`: the benchmark upstream (200 with a 1 KiB body); prints its address on the first stdout line.

fn main() -> anyhow::Result<()> {
    portcullis_bench::servers::upstream_main()
}
