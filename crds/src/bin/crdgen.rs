//! Writes the CRD YAML generated from the API types: `crdgen [--check] [repo-root]`.
//!
//! Writes `crds/*.yaml` (plain, for `kubectl apply`) and `charts/unwedge/templates/crds/*.yaml`
//! (the chart's templates); with `--check` it writes nothing and exits 1 when a committed file
//! differs from what the types generate.

use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let check = args.iter().any(|a| a == "--check");
    let root = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
    let mut stale = Vec::new();
    for (dir, files) in [
        ("crds", unwedge_crds::crd_yaml()),
        (
            "charts/unwedge/templates/crds",
            unwedge_crds::crd_chart_templates(),
        ),
    ] {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).expect("create the CRD directory");
        for (file, yaml) in files {
            let path = dir.join(file);
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            if current == yaml {
                continue;
            }
            if check {
                stale.push(path.display().to_string());
            } else {
                std::fs::write(&path, yaml).expect("write the CRD");
                println!("wrote {}", path.display());
            }
        }
    }
    if !stale.is_empty() {
        eprintln!(
            "stale CRD YAML (run `cargo run -p unwedge-crds --bin crdgen`): {}",
            stale.join(", ")
        );
        std::process::exit(1);
    }
}
