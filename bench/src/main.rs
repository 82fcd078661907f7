//! `portcullis-bench <suite> [--smoke]`; `cargo xtask bench …` builds and runs this. See the library docs.

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("bench is in the repo");
    let args: Vec<String> = std::env::args().skip(1).collect();
    portcullis_bench::main(root, &args)
}
