//! The resource types the test API server serves: the built-in ones podmig and kubectl
//! use, and those added by CustomResourceDefinitions at run time.

use serde_json::{Value, json};

/// A column of `kubectl get` output for a custom resource (from the CRD).
#[derive(Debug, Clone)]
pub struct PrinterColumn {
    /// Header.
    pub name: String,
    /// `string`, `integer`, `date`, …
    pub type_: String,
    /// Simple JSONPath such as `.status.state`.
    pub json_path: String,
    /// 0 = always shown, 1 = `-o wide`.
    pub priority: i64,
}

/// One served resource.
#[derive(Debug, Clone, Default)]
pub struct ResourceDef {
    /// API group (empty for core).
    pub group: String,
    /// Version.
    pub version: String,
    /// Kind.
    pub kind: String,
    /// Plural name used in URLs.
    pub plural: String,
    /// Singular name.
    pub singular: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Short names (`po`, `mpod`).
    pub short_names: Vec<String>,
    /// Categories (`all`, `podmig`).
    pub categories: Vec<String>,
    /// Has a `status` subresource (main updates keep the stored status).
    pub status: bool,
    /// Extra subresources (`eviction`, `binding`, `token`).
    pub extra_subresources: Vec<String>,
    /// Only `create` (reviews).
    pub create_only: bool,
    /// Printer columns (custom resources).
    pub columns: Vec<PrinterColumn>,
    /// Declared by a CustomResourceDefinition.
    pub custom: bool,
    /// The version's `openAPIV3Schema` (custom resources): pruning, defaults, validation.
    pub schema: Option<std::sync::Arc<Value>>,
}

impl ResourceDef {
    fn new(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            namespaced,
            short_names: vec![],
            categories: vec![],
            status: false,
            extra_subresources: vec![],
            create_only: false,
            columns: vec![],
            custom: false,
            schema: None,
        }
    }

    fn short(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    fn with_status(mut self) -> Self {
        self.status = true;
        self
    }

    fn all(mut self) -> Self {
        self.categories.push("all".into());
        self
    }

    fn sub(mut self, name: &str) -> Self {
        self.extra_subresources.push(name.into());
        self
    }

    fn review(mut self) -> Self {
        self.create_only = true;
        self
    }

    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Storage key of the resource: `group/plural` (versions share storage).
    pub fn key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    /// Verbs for discovery.
    pub fn verbs(&self) -> Vec<&'static str> {
        if self.create_only {
            vec!["create"]
        } else {
            vec![
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ]
        }
    }

    /// True for bound Pods' graceful deletion rules.
    pub fn is_pod(&self) -> bool {
        self.group.is_empty() && self.plural == "pods"
    }

    /// Discovery entries (the resource and its subresources).
    pub fn discovery(&self) -> Vec<Value> {
        let mut out = vec![json!({
            "name": self.plural, "singularName": self.singular, "namespaced": self.namespaced,
            "kind": self.kind, "verbs": self.verbs(), "shortNames": self.short_names,
            "categories": self.categories,
        })];
        if self.status {
            out.push(json!({"name": format!("{}/status", self.plural), "singularName": "",
                "namespaced": self.namespaced, "kind": self.kind, "verbs": ["get", "patch", "update"]}));
        }
        for sub in &self.extra_subresources {
            let (kind, verbs) = match sub.as_str() {
                "eviction" => ("Eviction", json!(["create"])),
                "binding" => ("Binding", json!(["create"])),
                "token" => ("TokenRequest", json!(["create"])),
                "log" => ("Pod", json!(["get"])),
                _ => ("Status", json!(["create"])),
            };
            let group = if sub == "eviction" { "policy" } else { "" };
            let mut e = json!({"name": format!("{}/{sub}", self.plural), "singularName": "",
                "namespaced": self.namespaced, "kind": kind, "verbs": verbs});
            if !group.is_empty() {
                e["group"] = json!(group);
                e["version"] = json!("v1");
            }
            out.push(e);
        }
        out
    }
}

/// The built-in resources.
pub fn builtins() -> Vec<ResourceDef> {
    vec![
        ResourceDef::new("", "v1", "Pod", "pods", true)
            .short(&["po"])
            .with_status()
            .all()
            .sub("eviction")
            .sub("binding")
            .sub("log"),
        ResourceDef::new("", "v1", "Node", "nodes", false)
            .short(&["no"])
            .with_status(),
        ResourceDef::new("", "v1", "Namespace", "namespaces", false)
            .short(&["ns"])
            .with_status(),
        ResourceDef::new("", "v1", "Service", "services", true)
            .short(&["svc"])
            .with_status()
            .all(),
        ResourceDef::new("", "v1", "Endpoints", "endpoints", true).short(&["ep"]),
        ResourceDef::new(
            "discovery.k8s.io",
            "v1",
            "EndpointSlice",
            "endpointslices",
            true,
        ),
        ResourceDef::new("", "v1", "Event", "events", true).short(&["ev"]),
        ResourceDef::new("", "v1", "ConfigMap", "configmaps", true).short(&["cm"]),
        ResourceDef::new("", "v1", "PersistentVolume", "persistentvolumes", false)
            .short(&["pv"])
            .with_status(),
        ResourceDef::new(
            "",
            "v1",
            "PersistentVolumeClaim",
            "persistentvolumeclaims",
            true,
        )
        .short(&["pvc"])
        .with_status(),
        ResourceDef::new("", "v1", "Secret", "secrets", true),
        ResourceDef::new("", "v1", "ServiceAccount", "serviceaccounts", true)
            .short(&["sa"])
            .sub("token"),
        ResourceDef::new("events.k8s.io", "v1", "Event", "events", true).short(&["ev"]),
        ResourceDef::new("apps", "v1", "Deployment", "deployments", true)
            .short(&["deploy"])
            .with_status()
            .all(),
        ResourceDef::new("apps", "v1", "ReplicaSet", "replicasets", true)
            .short(&["rs"])
            .with_status()
            .all(),
        ResourceDef::new("apps", "v1", "DaemonSet", "daemonsets", true)
            .short(&["ds"])
            .with_status()
            .all(),
        ResourceDef::new("batch", "v1", "Job", "jobs", true)
            .with_status()
            .all(),
        ResourceDef::new("coordination.k8s.io", "v1", "Lease", "leases", true),
        ResourceDef::new("node.k8s.io", "v1", "RuntimeClass", "runtimeclasses", false),
        ResourceDef::new(
            "scheduling.k8s.io",
            "v1",
            "PriorityClass",
            "priorityclasses",
            false,
        )
        .short(&["pc"]),
        ResourceDef::new(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        )
        .short(&["crd", "crds"])
        .with_status(),
        ResourceDef::new(
            "admissionregistration.k8s.io",
            "v1",
            "MutatingWebhookConfiguration",
            "mutatingwebhookconfigurations",
            false,
        ),
        ResourceDef::new(
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingWebhookConfiguration",
            "validatingwebhookconfigurations",
            false,
        ),
        ResourceDef::new("rbac.authorization.k8s.io", "v1", "Role", "roles", true),
        ResourceDef::new(
            "rbac.authorization.k8s.io",
            "v1",
            "RoleBinding",
            "rolebindings",
            true,
        ),
        ResourceDef::new(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRole",
            "clusterroles",
            false,
        ),
        ResourceDef::new(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
        ),
        ResourceDef::new(
            "policy",
            "v1",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            true,
        )
        .short(&["pdb"])
        .with_status(),
        ResourceDef::new(
            "authentication.k8s.io",
            "v1",
            "TokenReview",
            "tokenreviews",
            false,
        )
        .review(),
        ResourceDef::new(
            "authorization.k8s.io",
            "v1",
            "SubjectAccessReview",
            "subjectaccessreviews",
            false,
        )
        .review(),
        ResourceDef::new(
            "authorization.k8s.io",
            "v1",
            "SelfSubjectAccessReview",
            "selfsubjectaccessreviews",
            false,
        )
        .review(),
        ResourceDef::new(
            "authentication.k8s.io",
            "v1",
            "SelfSubjectReview",
            "selfsubjectreviews",
            false,
        )
        .review(),
    ]
}

/// The resources a CustomResourceDefinition declares (one per served version).
pub fn from_crd(crd: &Value) -> Vec<ResourceDef> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let strings = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    versions
        .iter()
        .filter(|v| v["served"].as_bool().unwrap_or(true))
        .map(|v| ResourceDef {
            group: s(&spec["group"]),
            version: s(&v["name"]),
            kind: s(&names["kind"]),
            plural: s(&names["plural"]),
            singular: names["singular"]
                .as_str()
                .map_or_else(|| s(&names["kind"]).to_lowercase(), str::to_owned),
            namespaced: spec["scope"].as_str() != Some("Cluster"),
            short_names: strings(&names["shortNames"]),
            categories: strings(&names["categories"]),
            status: v["subresources"]["status"].is_object(),
            extra_subresources: vec![],
            create_only: false,
            custom: true,
            schema: v["schema"]["openAPIV3Schema"]
                .is_object()
                .then(|| std::sync::Arc::new(v["schema"]["openAPIV3Schema"].clone())),
            columns: v["additionalPrinterColumns"]
                .as_array()
                .map(|cols| {
                    cols.iter()
                        .map(|c| PrinterColumn {
                            name: s(&c["name"]),
                            type_: c["type"].as_str().unwrap_or("string").to_owned(),
                            json_path: s(&c["jsonPath"]),
                            priority: c["priority"].as_i64().unwrap_or(0),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}
