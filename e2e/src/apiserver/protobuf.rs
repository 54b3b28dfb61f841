//! The Kubernetes protobuf encoding of the few kinds clients send this server that way:
//! Helm keeps its releases in Secrets (or ConfigMaps) through a typed client that sends
//! `application/vnd.kubernetes.protobuf`. A body is the magic `k8s\0` followed by a
//! `runtime.Unknown` envelope whose `raw` holds the object; it is turned into the JSON
//! object the rest of the server works with. Read so: Secrets, ConfigMaps, DeleteOptions,
//! Namespaces, ServiceAccounts, Roles, ClusterRoles and their bindings, TokenRequests,
//! SelfSubjectAccessReviews and SelfSubjectReviews (`kubectl create namespace|
//! serviceaccount|role|rolebinding|token`, `kubectl auth can-i|whoami`); other kinds
//! (workloads: `kubectl create deployment`) still get 415.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{Value, json};

/// The media type.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";

const MAGIC: &[u8] = b"k8s\0";

#[derive(Clone, PartialEq, prost::Message)]
struct Unknown {
    #[prost(message, optional, tag = "1")]
    type_meta: Option<TypeMeta>,
    #[prost(bytes = "vec", tag = "2")]
    raw: Vec<u8>,
    #[prost(string, tag = "3")]
    content_encoding: String,
    #[prost(string, tag = "4")]
    content_type: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TypeMeta {
    #[prost(string, tag = "1")]
    api_version: String,
    #[prost(string, tag = "2")]
    kind: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ObjectMeta {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    generate_name: String,
    #[prost(string, tag = "3")]
    namespace: String,
    #[prost(string, tag = "5")]
    uid: String,
    #[prost(string, tag = "6")]
    resource_version: String,
    #[prost(btree_map = "string, string", tag = "11")]
    labels: BTreeMap<String, String>,
    #[prost(btree_map = "string, string", tag = "12")]
    annotations: BTreeMap<String, String>,
    #[prost(string, repeated, tag = "14")]
    finalizers: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Secret {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(btree_map = "string, bytes", tag = "2")]
    data: BTreeMap<String, Vec<u8>>,
    #[prost(string, tag = "3")]
    type_: String,
    #[prost(btree_map = "string, string", tag = "4")]
    string_data: BTreeMap<String, String>,
    #[prost(bool, optional, tag = "5")]
    immutable: Option<bool>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ConfigMap {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(btree_map = "string, string", tag = "2")]
    data: BTreeMap<String, String>,
    #[prost(btree_map = "string, bytes", tag = "3")]
    binary_data: BTreeMap<String, Vec<u8>>,
    #[prost(bool, optional, tag = "4")]
    immutable: Option<bool>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Preconditions {
    #[prost(string, optional, tag = "1")]
    uid: Option<String>,
    #[prost(string, optional, tag = "2")]
    resource_version: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DeleteOptions {
    #[prost(int64, optional, tag = "1")]
    grace_period_seconds: Option<i64>,
    #[prost(message, optional, tag = "2")]
    preconditions: Option<Preconditions>,
    #[prost(bool, optional, tag = "3")]
    orphan_dependents: Option<bool>,
    #[prost(string, optional, tag = "4")]
    propagation_policy: Option<String>,
    #[prost(string, repeated, tag = "5")]
    dry_run: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Namespace {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ObjectReference {
    #[prost(string, tag = "1")]
    kind: String,
    #[prost(string, tag = "2")]
    namespace: String,
    #[prost(string, tag = "3")]
    name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LocalObjectReference {
    #[prost(string, tag = "1")]
    name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ServiceAccount {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, repeated, tag = "2")]
    secrets: Vec<ObjectReference>,
    #[prost(message, repeated, tag = "3")]
    image_pull_secrets: Vec<LocalObjectReference>,
    #[prost(bool, optional, tag = "4")]
    automount_service_account_token: Option<bool>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResourceAttributes {
    #[prost(string, tag = "1")]
    namespace: String,
    #[prost(string, tag = "2")]
    verb: String,
    #[prost(string, tag = "3")]
    group: String,
    #[prost(string, tag = "4")]
    version: String,
    #[prost(string, tag = "5")]
    resource: String,
    #[prost(string, tag = "6")]
    subresource: String,
    #[prost(string, tag = "7")]
    name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NonResourceAttributes {
    #[prost(string, tag = "1")]
    path: String,
    #[prost(string, tag = "2")]
    verb: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SelfSubjectAccessReviewSpec {
    #[prost(message, optional, tag = "1")]
    resource_attributes: Option<ResourceAttributes>,
    #[prost(message, optional, tag = "2")]
    non_resource_attributes: Option<NonResourceAttributes>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SelfSubjectAccessReview {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<SelfSubjectAccessReviewSpec>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PolicyRule {
    #[prost(string, repeated, tag = "1")]
    verbs: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    api_groups: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    resources: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    resource_names: Vec<String>,
    #[prost(string, repeated, tag = "5")]
    non_resource_urls: Vec<String>,
}

/// A Role or a ClusterRole (an aggregation rule, field 3, is not read: such a body gets
/// 415 and kubectl's JSON path is the way).
#[derive(Clone, PartialEq, prost::Message)]
struct Role {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, repeated, tag = "2")]
    rules: Vec<PolicyRule>,
    #[prost(bytes = "vec", optional, tag = "3")]
    aggregation_rule: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Subject {
    #[prost(string, tag = "1")]
    kind: String,
    #[prost(string, tag = "2")]
    api_group: String,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    namespace: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RoleRef {
    #[prost(string, tag = "1")]
    api_group: String,
    #[prost(string, tag = "2")]
    kind: String,
    #[prost(string, tag = "3")]
    name: String,
}

/// A RoleBinding or a ClusterRoleBinding.
#[derive(Clone, PartialEq, prost::Message)]
struct RoleBinding {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, repeated, tag = "2")]
    subjects: Vec<Subject>,
    #[prost(message, optional, tag = "3")]
    role_ref: Option<RoleRef>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct BoundObjectReference {
    #[prost(string, tag = "1")]
    kind: String,
    #[prost(string, tag = "2")]
    api_version: String,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    uid: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TokenRequestSpec {
    #[prost(string, repeated, tag = "1")]
    audiences: Vec<String>,
    #[prost(message, optional, tag = "3")]
    bound_object_ref: Option<BoundObjectReference>,
    #[prost(int64, optional, tag = "4")]
    expiration_seconds: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TokenRequest {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<TokenRequestSpec>,
}

fn metadata(m: Option<ObjectMeta>) -> Value {
    let m = m.unwrap_or_default();
    let mut out = serde_json::Map::new();
    let mut put = |k: &str, v: Value| {
        let empty = v.as_str() == Some("")
            || v.as_object().is_some_and(|o| o.is_empty())
            || v.as_array().is_some_and(|a| a.is_empty());
        if !empty {
            out.insert(k.into(), v);
        }
    };
    put("name", json!(m.name));
    put("generateName", json!(m.generate_name));
    put("namespace", json!(m.namespace));
    put("uid", json!(m.uid));
    put("resourceVersion", json!(m.resource_version));
    put("labels", json!(m.labels));
    put("annotations", json!(m.annotations));
    put("finalizers", json!(m.finalizers));
    Value::Object(out)
}

fn b64(map: BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
    map.into_iter()
        .map(|(k, v)| (k, base64::engine::general_purpose::STANDARD.encode(v)))
        .collect()
}

/// The JSON form of a protobuf-encoded object, or why it cannot be read.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or("not a Kubernetes protobuf object (no k8s magic)")?;
    let unknown = <Unknown as prost::Message>::decode(rest).map_err(|e| e.to_string())?;
    let tm = unknown.type_meta.unwrap_or_default();
    let raw = unknown.raw.as_slice();
    let mut obj = match (tm.api_version.as_str(), tm.kind.as_str()) {
        ("v1", "Secret") => {
            let s = <Secret as prost::Message>::decode(raw).map_err(|e| e.to_string())?;
            let mut o = json!({"metadata": metadata(s.metadata), "data": b64(s.data)});
            if !s.type_.is_empty() {
                o["type"] = json!(s.type_);
            }
            if !s.string_data.is_empty() {
                o["stringData"] = json!(s.string_data);
            }
            if let Some(i) = s.immutable {
                o["immutable"] = json!(i);
            }
            o
        }
        ("v1", "ConfigMap") => {
            let c = <ConfigMap as prost::Message>::decode(raw).map_err(|e| e.to_string())?;
            let mut o = json!({"metadata": metadata(c.metadata), "data": c.data});
            if !c.binary_data.is_empty() {
                o["binaryData"] = json!(b64(c.binary_data));
            }
            if let Some(i) = c.immutable {
                o["immutable"] = json!(i);
            }
            o
        }
        ("v1" | "meta.k8s.io/v1", "DeleteOptions") => {
            let d = <DeleteOptions as prost::Message>::decode(raw).map_err(|e| e.to_string())?;
            let mut o = json!({});
            if let Some(g) = d.grace_period_seconds {
                o["gracePeriodSeconds"] = json!(g);
            }
            if let Some(p) = d.preconditions {
                o["preconditions"] = json!({"uid": p.uid, "resourceVersion": p.resource_version});
            }
            if let Some(b) = d.orphan_dependents {
                o["orphanDependents"] = json!(b);
            }
            if let Some(p) = d.propagation_policy {
                o["propagationPolicy"] = json!(p);
            }
            if !d.dry_run.is_empty() {
                o["dryRun"] = json!(d.dry_run);
            }
            o
        }
        ("v1", "Namespace") => {
            let n = <Namespace as prost::Message>::decode(raw).map_err(|e| e.to_string())?;
            json!({"metadata": metadata(n.metadata)})
        }
        ("v1", "ServiceAccount") => {
            let sa = <ServiceAccount as prost::Message>::decode(raw).map_err(|e| e.to_string())?;
            let mut o = json!({"metadata": metadata(sa.metadata)});
            if !sa.secrets.is_empty() {
                o["secrets"] = sa
                    .secrets
                    .iter()
                    .map(|r| json!({"kind": r.kind, "namespace": r.namespace, "name": r.name}))
                    .collect();
            }
            if !sa.image_pull_secrets.is_empty() {
                o["imagePullSecrets"] = sa
                    .image_pull_secrets
                    .iter()
                    .map(|r| json!({"name": r.name}))
                    .collect();
            }
            if let Some(a) = sa.automount_service_account_token {
                o["automountServiceAccountToken"] = json!(a);
            }
            o
        }
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => {
            let r = <SelfSubjectAccessReview as prost::Message>::decode(raw)
                .map_err(|e| e.to_string())?;
            let spec = r.spec.unwrap_or_default();
            let mut o = json!({"metadata": metadata(r.metadata), "spec": {}});
            if let Some(a) = spec.resource_attributes {
                o["spec"]["resourceAttributes"] = json!({"namespace": a.namespace, "verb": a.verb,
                    "group": a.group, "version": a.version, "resource": a.resource,
                    "subresource": a.subresource, "name": a.name});
            }
            if let Some(n) = spec.non_resource_attributes {
                o["spec"]["nonResourceAttributes"] = json!({"path": n.path, "verb": n.verb});
            }
            o
        }
        ("rbac.authorization.k8s.io/v1", "Role" | "ClusterRole") => {
            let r = <Role as prost::Message>::decode(raw).map_err(|e| e.to_string())?;
            if r.aggregation_rule.is_some() {
                return Err("an aggregationRule is not read in protobuf here".into());
            }
            let rules: Vec<Value> = r
                .rules
                .into_iter()
                .map(|p| {
                    let mut rule = json!({"verbs": p.verbs});
                    for (k, v) in [
                        ("apiGroups", p.api_groups),
                        ("resources", p.resources),
                        ("resourceNames", p.resource_names),
                        ("nonResourceURLs", p.non_resource_urls),
                    ] {
                        if !v.is_empty() {
                            rule[k] = json!(v);
                        }
                    }
                    rule
                })
                .collect();
            json!({"metadata": metadata(r.metadata), "rules": rules})
        }
        ("rbac.authorization.k8s.io/v1", "RoleBinding" | "ClusterRoleBinding") => {
            let b = <RoleBinding as prost::Message>::decode(raw).map_err(|e| e.to_string())?;
            let subjects: Vec<Value> = b
                .subjects
                .into_iter()
                .map(|s| {
                    let mut o = json!({"kind": s.kind, "name": s.name});
                    if !s.api_group.is_empty() {
                        o["apiGroup"] = json!(s.api_group);
                    }
                    if !s.namespace.is_empty() {
                        o["namespace"] = json!(s.namespace);
                    }
                    o
                })
                .collect();
            let r = b.role_ref.unwrap_or_default();
            json!({"metadata": metadata(b.metadata), "subjects": subjects,
                "roleRef": {"apiGroup": r.api_group, "kind": r.kind, "name": r.name}})
        }
        ("authentication.k8s.io/v1", "TokenRequest") => {
            let t = <TokenRequest as prost::Message>::decode(raw).map_err(|e| e.to_string())?;
            let spec = t.spec.unwrap_or_default();
            let mut o =
                json!({"metadata": metadata(t.metadata), "spec": {"audiences": spec.audiences}});
            if let Some(s) = spec.expiration_seconds {
                o["spec"]["expirationSeconds"] = json!(s);
            }
            if let Some(b) = spec.bound_object_ref {
                o["spec"]["boundObjectRef"] = json!({"kind": b.kind, "apiVersion": b.api_version,
                    "name": b.name, "uid": b.uid});
            }
            o
        }
        ("authentication.k8s.io/v1", "SelfSubjectReview") => json!({"metadata": {}}),
        (v, k) => return Err(format!("{v} {k} is not accepted in protobuf here")),
    };
    obj["apiVersion"] = json!(tm.api_version);
    obj["kind"] = json!(tm.kind);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_protobuf_secret_reads_as_its_json() {
        let secret = Secret {
            metadata: Some(ObjectMeta {
                name: "sh.helm.release.v1.podmig.v1".into(),
                namespace: "podmig-system".into(),
                labels: [("owner".to_owned(), "helm".to_owned())].into(),
                ..Default::default()
            }),
            data: [("release".to_owned(), b"H4sI".to_vec())].into(),
            type_: "helm.sh/release.v1".into(),
            ..Default::default()
        };
        let unknown = Unknown {
            type_meta: Some(TypeMeta {
                api_version: "v1".into(),
                kind: "Secret".into(),
            }),
            raw: prost::Message::encode_to_vec(&secret),
            ..Default::default()
        };
        let mut body = MAGIC.to_vec();
        body.extend(prost::Message::encode_to_vec(&unknown));
        let obj = decode(&body).expect("decodes");
        assert_eq!(obj["kind"], "Secret");
        assert_eq!(obj["metadata"]["name"], "sh.helm.release.v1.podmig.v1");
        assert_eq!(obj["metadata"]["labels"]["owner"], "helm");
        assert_eq!(obj["type"], "helm.sh/release.v1");
        assert_eq!(obj["data"]["release"], "SDRzSQ==");
        assert!(decode(b"{}").is_err());
    }

    fn wrap(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let unknown = Unknown {
            type_meta: Some(TypeMeta {
                api_version: api_version.into(),
                kind: kind.into(),
            }),
            raw,
            ..Default::default()
        };
        let mut body = MAGIC.to_vec();
        body.extend(prost::Message::encode_to_vec(&unknown));
        body
    }

    #[test]
    fn kubectl_auth_can_i_and_create_namespace_read_as_their_json() {
        let ssar = SelfSubjectAccessReview {
            spec: Some(SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: "default".into(),
                    verb: "create".into(),
                    resource: "pods".into(),
                    subresource: "migrate".into(),
                    ..Default::default()
                }),
                non_resource_attributes: None,
            }),
            ..Default::default()
        };
        let obj = decode(&wrap(
            "authorization.k8s.io/v1",
            "SelfSubjectAccessReview",
            prost::Message::encode_to_vec(&ssar),
        ))
        .expect("ssar");
        assert_eq!(obj["spec"]["resourceAttributes"]["subresource"], "migrate");
        assert_eq!(obj["spec"]["resourceAttributes"]["verb"], "create");
        let ns = Namespace {
            metadata: Some(ObjectMeta {
                name: "evil".into(),
                ..Default::default()
            }),
        };
        let obj = decode(&wrap("v1", "Namespace", prost::Message::encode_to_vec(&ns)))
            .expect("namespace");
        assert_eq!(
            (obj["kind"].as_str(), obj["metadata"]["name"].as_str()),
            (Some("Namespace"), Some("evil"))
        );
        let sa = ServiceAccount {
            metadata: Some(ObjectMeta {
                name: "mover".into(),
                ..Default::default()
            }),
            image_pull_secrets: vec![LocalObjectReference {
                name: "regcred".into(),
            }],
            automount_service_account_token: Some(false),
            ..Default::default()
        };
        let obj = decode(&wrap(
            "v1",
            "ServiceAccount",
            prost::Message::encode_to_vec(&sa),
        ))
        .expect("service account");
        assert_eq!(obj["imagePullSecrets"][0]["name"], "regcred");
        assert_eq!(obj["automountServiceAccountToken"], false);
    }

    #[test]
    fn rbac_objects_and_token_requests_read_as_their_json() {
        let role = Role {
            metadata: Some(ObjectMeta {
                name: "r".into(),
                ..Default::default()
            }),
            rules: vec![PolicyRule {
                verbs: vec!["create".into()],
                api_groups: vec![String::new()],
                resources: vec!["nodes/handover".into()],
                ..Default::default()
            }],
            aggregation_rule: None,
        };
        let obj = decode(&wrap(
            "rbac.authorization.k8s.io/v1",
            "ClusterRole",
            prost::Message::encode_to_vec(&role),
        ))
        .expect("role");
        assert_eq!(obj["rules"][0]["resources"][0], "nodes/handover");
        assert_eq!(obj["rules"][0]["apiGroups"][0], "");
        let binding = RoleBinding {
            metadata: None,
            subjects: vec![Subject {
                kind: "ServiceAccount".into(),
                name: "mover".into(),
                namespace: "default".into(),
                ..Default::default()
            }],
            role_ref: Some(RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: "podmig-migrator".into(),
            }),
        };
        let obj = decode(&wrap(
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            prost::Message::encode_to_vec(&binding),
        ))
        .expect("binding");
        assert_eq!(obj["subjects"][0]["namespace"], "default");
        assert_eq!(obj["roleRef"]["name"], "podmig-migrator");
        let token = TokenRequest {
            metadata: None,
            spec: Some(TokenRequestSpec {
                audiences: vec!["x".into()],
                bound_object_ref: None,
                expiration_seconds: Some(600),
            }),
        };
        let obj = decode(&wrap(
            "authentication.k8s.io/v1",
            "TokenRequest",
            prost::Message::encode_to_vec(&token),
        ))
        .expect("token request");
        assert_eq!(obj["spec"]["expirationSeconds"], 600);
    }
}
