//! Prints both CRDs as YAML; with `--write`, writes them into every checked-in copy ([`CRD_DIRS`]: `crds/` and
//! the chart's `files/crds/`) of the workspace. `cargo xtask crdgen` runs this with `--write`.

use anyhow::Context;
use portcullis_controller::crd::{CRD_DIRS, crd_files, crds_yaml};
use std::path::Path;

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--write") {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
        for dir in CRD_DIRS {
            std::fs::create_dir_all(root.join(dir))?;
            for (file, yaml) in crd_files() {
                let path = root.join(dir).join(file);
                std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {dir}/{file}");
            }
        }
    } else {
        let (ac, up) = crds_yaml();
        print!("{ac}---\n{up}");
    }
    Ok(())
}
