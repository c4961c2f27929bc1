//! `charts/micromine/crds/` must hold exactly what the Rust types derive, so a field added
//! in code cannot ship with a chart whose API server would drop it.

use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use micromine_resources::crd;

const REGENERATE: &str =
    "regenerate with `cargo run -p micromine-controller -- crd --out-dir charts/micromine/crds`";

#[test]
fn the_chart_holds_exactly_the_derived_definitions() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/micromine/crds");
    let mut expected = Vec::new();
    for definition in crd::definitions() {
        let name = crd::file_name(&definition);
        let path = dir.join(&name);
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; {REGENERATE}", path.display()));
        let derived = crd::to_yaml(&definition).expect("serializes");
        assert!(
            on_disk == derived,
            "{name} has drifted from the code; {REGENERATE}"
        );
        // What kubectl would read back is the same definition, not just the same text.
        let parsed: CustomResourceDefinition =
            serde_saphyr::from_str(&on_disk).expect("the file parses as a CRD");
        assert_eq!(parsed, definition, "{name} does not read back as itself");
        expected.push(name);
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .expect("crds directory")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    present.sort();
    expected.sort();
    assert_eq!(
        present,
        expected,
        "stray or missing files in {}",
        dir.display()
    );
}
