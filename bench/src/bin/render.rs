//! `bench-render N`: the median of 3 controller build + render runs for N synthetic clients, in seconds.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    portcullis_bench::suites::render_main(&args)
}
