//! The committed CRD YAML must be exactly what the types generate.

use std::path::Path;

#[test]
fn committed_crd_yaml_matches_the_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (dir, files) in [
        ("crds", unwedge_crds::crd_yaml()),
        (
            "charts/unwedge/templates/crds",
            unwedge_crds::crd_chart_templates(),
        ),
    ] {
        for (file, yaml) in files {
            let path = root.join(dir).join(file);
            let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{} is missing ({e}): run `cargo run -p unwedge-crds --bin crdgen`",
                    path.display()
                )
            });
            assert!(
                committed == yaml,
                "{} is stale: run `cargo run -p unwedge-crds --bin crdgen` and commit the result",
                path.display()
            );
        }
    }
}
