//! OpenAPI v3 documents per group-version, as kube-apiserver publishes them under
//! `/openapi/v3`: the operations (with the `fieldValidation` parameter, from which kubectl
//! learns that the server validates) and the schemas of the kinds — a CRD's
//! `openAPIV3Schema` and the built-in types generated from k8s-openapi — each tagged with
//! its group-version-kind, which is how `kubectl explain` finds them.

use std::{collections::HashMap, sync::OnceLock};

use k8s_openapi::api::{
    apps::v1 as apps, coordination::v1 as coordination, core::v1 as core, node::v1 as node,
    policy::v1 as policy, rbac::v1 as rbac,
};
use serde_json::{Map, Value, json};

use super::resources::ResourceDef;

/// The schema name kube-apiserver uses: reversed group, version, kind
/// (`io.k8s.api.core.v1.Pod`, `dev.podmig.v1alpha1.MigratingPod`).
fn schema_name(r: &ResourceDef) -> String {
    let group = match r.group.as_str() {
        "" => "io.k8s.api.core".to_owned(),
        g if g.ends_with(".k8s.io") || !g.contains('.') => {
            format!(
                "io.k8s.api.{}",
                g.trim_end_matches(".k8s.io").replace('.', "_")
            )
        }
        g => g.split('.').rev().collect::<Vec<_>>().join("."),
    };
    format!("{group}.{}.{}", r.version, r.kind)
}

fn generate<T: schemars::JsonSchema>() -> Value {
    let generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(kube::core::schema::StructuralSchemaRewriter)
        .into_generator();
    let mut schema =
        serde_json::to_value(generator.into_root_schema_for::<T>()).unwrap_or_default();
    if let Some(o) = schema.as_object_mut() {
        o.remove("$schema");
        o.remove("title");
    }
    schema
}

/// The schemas of the built-in kinds podmig, its chart and kubectl's usual commands touch.
fn builtin_schemas() -> &'static HashMap<(&'static str, &'static str), Value> {
    static SCHEMAS: OnceLock<HashMap<(&'static str, &'static str), Value>> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        HashMap::from([
            (("", "Pod"), generate::<core::Pod>()),
            (("", "Service"), generate::<core::Service>()),
            (("", "ConfigMap"), generate::<core::ConfigMap>()),
            (
                ("", "PersistentVolume"),
                generate::<core::PersistentVolume>(),
            ),
            (
                ("", "PersistentVolumeClaim"),
                generate::<core::PersistentVolumeClaim>(),
            ),
            (("", "Secret"), generate::<core::Secret>()),
            (("", "Namespace"), generate::<core::Namespace>()),
            (("", "Node"), generate::<core::Node>()),
            (("", "ServiceAccount"), generate::<core::ServiceAccount>()),
            (("", "Event"), generate::<core::Event>()),
            (("apps", "Deployment"), generate::<apps::Deployment>()),
            (("apps", "DaemonSet"), generate::<apps::DaemonSet>()),
            (("apps", "ReplicaSet"), generate::<apps::ReplicaSet>()),
            (
                ("batch", "Job"),
                generate::<k8s_openapi::api::batch::v1::Job>(),
            ),
            (
                ("coordination.k8s.io", "Lease"),
                generate::<coordination::Lease>(),
            ),
            (
                ("node.k8s.io", "RuntimeClass"),
                generate::<node::RuntimeClass>(),
            ),
            (
                ("policy", "PodDisruptionBudget"),
                generate::<policy::PodDisruptionBudget>(),
            ),
            (
                ("rbac.authorization.k8s.io", "Role"),
                generate::<rbac::Role>(),
            ),
            (
                ("rbac.authorization.k8s.io", "RoleBinding"),
                generate::<rbac::RoleBinding>(),
            ),
            (
                ("rbac.authorization.k8s.io", "ClusterRole"),
                generate::<rbac::ClusterRole>(),
            ),
            (
                ("rbac.authorization.k8s.io", "ClusterRoleBinding"),
                generate::<rbac::ClusterRoleBinding>(),
            ),
        ])
    })
}

fn schema_of(r: &ResourceDef) -> Option<Value> {
    if let Some(s) = &r.schema {
        return Some((**s).clone());
    }
    builtin_schemas()
        .get(&(r.group.as_str(), r.kind.as_str()))
        .cloned()
}

/// The document of one group/version.
pub fn document(resources: &[ResourceDef], g: &str, v: &str, version: &str) -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    let param = json!([{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}]);
    for r in resources.iter().filter(|r| r.group == g && r.version == v) {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let base = if g.is_empty() {
            format!("/api/{v}")
        } else {
            format!("/apis/{g}/{v}")
        };
        let coll = if r.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}", r.plural)
        } else {
            format!("{base}/{}", r.plural)
        };
        let name = schema_name(r);
        let body = json!({"content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}}});
        let op = json!({"x-kubernetes-group-version-kind": gvk, "parameters": param,
            "requestBody": body, "responses": {}});
        paths.insert(coll.clone(), json!({"post": op}));
        paths.insert(format!("{coll}/{{name}}"), json!({"put": op, "patch": op}));
        if let Some(mut schema) = schema_of(r) {
            schema["x-kubernetes-group-version-kind"] = json!([gvk]);
            schemas.insert(name, schema);
        }
    }
    json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": version},
        "paths": paths, "components": {"schemas": schemas}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_core_schemas() {
        let pod = super::super::resources::builtins()
            .into_iter()
            .find(|r| r.is_pod())
            .expect("pods");
        assert_eq!(schema_name(&pod), "io.k8s.api.core.v1.Pod");
        let doc = document(&[pod], "", "v1", "v1.32.0");
        let schema = &doc["components"]["schemas"]["io.k8s.api.core.v1.Pod"];
        assert!(
            schema["properties"]["spec"]["properties"]["containers"]["description"].is_string()
        );
        assert_eq!(schema["x-kubernetes-group-version-kind"][0]["kind"], "Pod");
    }
}

/// OpenAPI v2's `Document` in gnostic's protobuf form (`openapi_v2.Document`), with only
/// the fields this server fills: client-go asks `/openapi/v2` for it (kubectl's and
/// Helm's client-side validation). Its definitions are empty: clients skip client-side
/// checks of kinds they find no schema for and rely on the server's `fieldValidation`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct V2Document {
    /// `swagger: "2.0"`.
    #[prost(string, tag = "1")]
    pub swagger: String,
    /// Title and version.
    #[prost(message, optional, tag = "2")]
    pub info: Option<V2Info>,
}

/// OpenAPI v2's `Info`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct V2Info {
    /// Title.
    #[prost(string, tag = "1")]
    pub title: String,
    /// Version.
    #[prost(string, tag = "2")]
    pub version: String,
}

/// The `/openapi/v2` document: protobuf bytes, or JSON.
pub fn v2_document(version: &str, protobuf: bool) -> (Vec<u8>, &'static str) {
    if protobuf {
        let doc = V2Document {
            swagger: "2.0".into(),
            info: Some(V2Info {
                title: "Kubernetes".into(),
                version: version.into(),
            }),
        };
        (
            prost::Message::encode_to_vec(&doc),
            // What kube-openapi answers for its protobuf form: the media type clients ask
            // for has an `@`, which no media type parser accepts.
            "application/octet-stream",
        )
    } else {
        let doc = serde_json::json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": version}, "paths": {}, "definitions": {}});
        (doc.to_string().into_bytes(), "application/json")
    }
}
