//! The CustomResourceDefinitions, generated from the types in `podmig-api`; the committed
//! copies under `helm/podmig/crds/` are checked against them by a test.

use kube::CustomResourceExt;
use podmig_api::v1alpha1::{MigratingPod, Migration};

/// Both CRDs as one YAML stream.
pub fn yaml() -> Result<String, serde_yaml::Error> {
    Ok(format!(
        "{}---\n{}",
        serde_yaml::to_string(&MigratingPod::crd())?,
        serde_yaml::to_string(&Migration::crd())?
    ))
}

/// File name and YAML of each CRD, as committed under `helm/podmig/crds/`.
pub fn files() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    Ok(vec![
        (
            "migratingpods.podmig.dev.yaml",
            serde_yaml::to_string(&MigratingPod::crd())?,
        ),
        (
            "migrations.podmig.dev.yaml",
            serde_yaml::to_string(&Migration::crd())?,
        ),
    ])
}

#[cfg(test)]
mod tests {
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
