//! The CustomResourceDefinitions, generated from the types in `podmig-api`; the committed
//! copies under `helm/podmig/crds/` are checked against them by a test.

use kube::CustomResourceExt;
use podmig_api::v1alpha1::{MigratingPod, Migration};

/// Both CRDs as one YAML stream.
pub fn yaml() -> Result<String, serde_saphyr::SerializeError> {
    Ok(format!(
        "{}---\n{}",
        serde_saphyr::to_string(&MigratingPod::crd())?,
        serde_saphyr::to_string(&Migration::crd())?
    ))
}

/// File name and YAML of each CRD, as committed under `helm/podmig/crds/`.
pub fn files() -> Result<Vec<(&'static str, String)>, serde_saphyr::SerializeError> {
    Ok(vec![
        (
            "migratingpods.podmig.dev.yaml",
            serde_saphyr::to_string(&MigratingPod::crd())?,
        ),
        (
            "migrations.podmig.dev.yaml",
            serde_saphyr::to_string(&Migration::crd())?,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;
    use podmig_api::v1alpha1::{MigratingPod, Migration};

    #[test]
    fn the_yaml_reads_back_as_the_same_crds() {
        let files = super::files().expect("serialize");
        let expected = [
            serde_json::to_value(MigratingPod::crd()).expect("json"),
            serde_json::to_value(Migration::crd()).expect("json"),
        ];
        for ((name, yaml), expected) in files.iter().zip(expected) {
            let read: serde_json::Value = serde_saphyr::from_str(yaml).expect("yaml");
            assert!(read == expected, "{name} does not read back as written");
        }
    }

    #[test]
    fn committed_crds_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/podmig/crds");
        for (name, yaml) in super::files().expect("serialize") {
            let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
            assert!(
                committed == yaml,
                "helm/podmig/crds/{name} is out of date; regenerate with `make crds`"
            );
        }
    }

    #[test]
    fn crds_carry_names_columns_and_status() {
        let y = super::yaml().expect("yaml");
        for needle in [
            "shortNames:\n    - mpod",
            "- mig",
            "categories:\n    - podmig",
            "status: {}",
            "name: Active Pod",
            "name: Frozen ms",
            "minimum: 1.0",
        ] {
            assert!(y.contains(needle), "missing {needle:?}");
        }
    }
}
