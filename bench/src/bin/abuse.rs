//! `bench-abuse ADDR KIND RATE CONNS LIMIT [TAG]`: the abuse generator of the `abuse` suite; prints `ready` once
//! ramped up, abuses until its stdin closes, then prints its counts as JSON.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    portcullis_bench::abuse::abuse_main(&args)
}
