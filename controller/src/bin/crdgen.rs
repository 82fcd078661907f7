//! Prints both CRDs as YAML; with `--write`, writes them into `crds/` of the workspace.

use portcullis_controller::crd::{API_CLIENTS_CRD_FILE, GENERATED_HEADER, USAGE_PLANS_CRD_FILE, crds_yaml};
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let (ac, up) = crds_yaml();
    if std::env::args().any(|a| a == "--write") {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
        for (file, yaml) in [(API_CLIENTS_CRD_FILE, &ac), (USAGE_PLANS_CRD_FILE, &up)] {
            std::fs::write(root.join(file), format!("{GENERATED_HEADER}{yaml}"))?;
            eprintln!("wrote {file}");
        }
    } else {
        print!("{ac}---\n{up}");
    }
    Ok(())
}
