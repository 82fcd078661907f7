//! `bench-openloop ADDR RATE SECS CONNS KEY`: the open-loop generator; prints a JSON result on stdout.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    portcullis_bench::load::openloop_main(&args)
}
