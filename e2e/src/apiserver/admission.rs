//! Dynamic admission as kube-apiserver runs it: every write (including subresources such
//! as `pods/eviction`) is matched against the `MutatingWebhookConfiguration`s, then the
//! `ValidatingWebhookConfiguration`s (rules by group/version/resource/operation/scope,
//! `namespaceSelector`, `objectSelector`), and each matching webhook is called over HTTPS
//! (trusting its `caBundle`, within `timeoutSeconds`) with an `AdmissionReview` v1. A denial
//! answers the client with the webhook's code and message; a failed call follows
//! `failurePolicy`; mutations (JSONPatch) are applied in order.

use std::time::Duration;

use axum::body::Bytes;
use base64::Engine;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::{
    api::{Api, ApiError, ApiResult},
    auth::User,
    outbound,
    resources::ResourceDef,
};

/// The operation of a request, as webhook rules name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// POST.
    Create,
    /// PUT or PATCH.
    Update,
    /// DELETE.
    Delete,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Self::Create => "CREATE",
            Self::Update => "UPDATE",
            Self::Delete => "DELETE",
        }
    }
}

/// One request under admission.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The resource addressed.
    pub def: &'a ResourceDef,
    /// `eviction`, `status`, … or empty.
    pub subresource: &'a str,
    /// Namespace (empty when cluster-scoped).
    pub namespace: &'a str,
    /// Name (may be empty on create with generateName).
    pub name: &'a str,
    /// Operation.
    pub operation: Operation,
    /// Who asks.
    pub user: &'a User,
    /// The object as it would be stored (or the subresource's body).
    pub object: Option<Value>,
    /// The object before (update, delete).
    pub old_object: Option<Value>,
    /// The object a subresource acts on (the Pod of an eviction), for `objectSelector`.
    pub parent: Option<Value>,
}

impl Request<'_> {
    /// The kind of the object sent: the subresource's kind where it has its own.
    fn kind(&self) -> Value {
        match self.subresource {
            "eviction" => json!({"group": "policy", "version": "v1", "kind": "Eviction"}),
            "binding" => json!({"group": "", "version": "v1", "kind": "Binding"}),
            _ => {
                json!({"group": self.def.group, "version": self.def.version, "kind": self.def.kind})
            }
        }
    }
}

fn webhooks_of(api: &Api, group: &str, plural: &str) -> Vec<(String, Value)> {
    let Some(def) = api.resource(group, "v1", plural) else {
        return vec![];
    };
    let (mut configs, _) = api.store.list(&def.key(), None);
    configs.sort_by(|a, b| {
        a["metadata"]["name"]
            .as_str()
            .cmp(&b["metadata"]["name"].as_str())
    });
    configs
        .iter()
        .flat_map(|c| {
            let config = c["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            c["webhooks"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |w| (config.clone(), w))
        })
        .collect()
}

/// True when some webhook is configured at all (the common path skips admission).
pub fn any_configured(api: &Api) -> bool {
    [
        "mutatingwebhookconfigurations",
        "validatingwebhookconfigurations",
    ]
    .iter()
    .any(|p| !webhooks_of(api, "admissionregistration.k8s.io", p).is_empty())
}

fn listed(list: &Value, value: &str) -> bool {
    list.as_array().is_some_and(|l| {
        l.iter()
            .filter_map(Value::as_str)
            .any(|x| x == "*" || x == value)
    })
}

fn resource_listed(list: &Value, resource: &str, sub: &str) -> bool {
    list.as_array().is_some_and(|l| {
        l.iter().filter_map(Value::as_str).any(|x| {
            let (r, s) = x.split_once('/').unwrap_or((x, ""));
            (r == "*" || r == resource)
                && (s == sub || (s == "*" && !sub.is_empty()) || (x == "*/*"))
                || (x == "*" && sub.is_empty())
        })
    })
}

fn rule_matches(rule: &Value, req: &Request<'_>) -> bool {
    let scope = rule["scope"].as_str().unwrap_or("*");
    let scope_ok = match scope {
        "Cluster" => !req.def.namespaced,
        "Namespaced" => req.def.namespaced,
        _ => true,
    };
    scope_ok
        && listed(&rule["operations"], req.operation.as_str())
        && listed(&rule["apiGroups"], &req.def.group)
        && listed(&rule["apiVersions"], &req.def.version)
        && resource_listed(&rule["resources"], &req.def.plural, req.subresource)
}

/// A `metav1.LabelSelector` (matchLabels and matchExpressions) against a label map.
pub fn selector_matches(selector: &Value, labels: &Value) -> bool {
    if selector.is_null() {
        return true;
    }
    let label = |k: &str| labels[k].as_str();
    let labels_ok = selector["matchLabels"]
        .as_object()
        .is_none_or(|m| m.iter().all(|(k, v)| label(k) == v.as_str()));
    let exprs_ok = selector["matchExpressions"].as_array().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            let values: Vec<&str> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            match e["operator"].as_str() {
                Some("In") => label(key).is_some_and(|v| values.contains(&v)),
                Some("NotIn") => label(key).is_none_or(|v| !values.contains(&v)),
                Some("Exists") => label(key).is_some(),
                Some("DoesNotExist") => label(key).is_none(),
                _ => false,
            }
        })
    });
    labels_ok && exprs_ok
}

fn webhook_matches(api: &Api, hook: &Value, req: &Request<'_>) -> bool {
    let rules = hook["rules"].as_array().cloned().unwrap_or_default();
    if !rules.iter().any(|r| rule_matches(r, req)) {
        return false;
    }
    if req.def.namespaced && !hook["namespaceSelector"].is_null() {
        let labels = api
            .resource("", "v1", "namespaces")
            .and_then(|d| api.get(&d, "", req.namespace).ok())
            .map(|n| n["metadata"]["labels"].clone())
            .unwrap_or(Value::Null);
        if !selector_matches(&hook["namespaceSelector"], &labels) {
            return false;
        }
    }
    if !hook["objectSelector"].is_null() {
        let of = |o: &Option<Value>| {
            o.as_ref()
                .map(|o| o["metadata"]["labels"].clone())
                .unwrap_or(Value::Null)
        };
        // The object selector looks at the object the subresource acts on.
        let target = if req.subresource.is_empty() {
            of(&req.object)
        } else {
            of(&req.parent)
        };
        if !selector_matches(&hook["objectSelector"], &target)
            && !selector_matches(&hook["objectSelector"], &of(&req.old_object))
        {
            return false;
        }
    }
    true
}

fn review(req: &Request<'_>, uid: &str) -> Value {
    let resource =
        json!({"group": req.def.group, "version": req.def.version, "resource": req.def.plural});
    let mut r = json!({
        "uid": uid,
        "kind": req.kind(),
        "resource": resource,
        "requestKind": req.kind(),
        "requestResource": resource,
        "name": req.name,
        "namespace": req.namespace,
        "operation": req.operation.as_str(),
        "userInfo": {"username": req.user.name, "uid": req.user.uid, "groups": req.user.groups},
        "object": req.object,
        "oldObject": req.old_object,
        "dryRun": false,
    });
    if !req.subresource.is_empty() {
        r["subResource"] = json!(req.subresource);
        r["requestSubResource"] = json!(req.subresource);
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": r})
}

/// Where a webhook is called: its `url`, or its Service's ClusterIP with the name its
/// certificate must hold (`<name>.<namespace>.svc`), as kube-apiserver dials a Service.
fn endpoint(api: &Api, config: &Value) -> Result<(String, Option<String>), String> {
    if let Some(url) = config["url"].as_str() {
        return Ok((url.to_owned(), None));
    }
    let svc = &config["service"];
    let (ns, name) = (
        svc["namespace"].as_str().unwrap_or_default(),
        svc["name"].as_str().unwrap_or_default(),
    );
    let def = api
        .resource("", "v1", "services")
        .ok_or("no services resource")?;
    let found = api
        .get(&def, ns, name)
        .map_err(|_| format!("service \"{name}\" not found"))?;
    let ip = found["spec"]["clusterIP"]
        .as_str()
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .ok_or_else(|| format!("service \"{name}\" has no ClusterIP"))?;
    let port = svc["port"].as_u64().unwrap_or(443);
    let path = svc["path"].as_str().unwrap_or("/");
    Ok((
        format!("https://{ip}:{port}{path}"),
        Some(format!("{name}.{ns}.svc")),
    ))
}

async fn call(api: &Api, hook: &Value, body: &Value) -> Result<Value, String> {
    let config = &hook["clientConfig"];
    let (url, server_name) = endpoint(api, config)?;
    let url = url.as_str();
    let ca = base64::engine::general_purpose::STANDARD
        .decode(config["caBundle"].as_str().unwrap_or_default())
        .map_err(|e| format!("caBundle: {e}"))?;
    let client = outbound::https_client_for(&ca, server_name.as_deref())?;
    let timeout = Duration::from_secs(hook["timeoutSeconds"].as_u64().unwrap_or(10).clamp(1, 30));
    let request = axum::http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(timeout, client.request(request))
        .await
        .map_err(|_| format!("Post {url:?}: context deadline exceeded"))?
        .map_err(|e| format!("Post {url:?}: {e}"))?;
    let status = response.status();
    let bytes = tokio::time::timeout(timeout, response.into_body().collect())
        .await
        .map_err(|_| format!("Post {url:?}: context deadline exceeded"))?
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("Post {url:?}: the server answered {status}"));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("the answer is not an AdmissionReview: {e}"))
}

/// Runs mutating then validating webhooks; returns the object as mutated (or unchanged),
/// or the error to answer.
pub async fn admit(api: &Api, mut req: Request<'_>) -> ApiResult<Option<Value>> {
    for (mutating, plural) in [
        (true, "mutatingwebhookconfigurations"),
        (false, "validatingwebhookconfigurations"),
    ] {
        for (_config, hook) in webhooks_of(api, "admissionregistration.k8s.io", plural) {
            if !webhook_matches(api, &hook, &req) {
                continue;
            }
            let name = hook["name"].as_str().unwrap_or_default().to_owned();
            let uid = uuid::Uuid::new_v4().to_string();
            let answer = match call(api, &hook, &review(&req, &uid)).await {
                Ok(a) => a,
                Err(e) if hook["failurePolicy"].as_str() == Some("Ignore") => {
                    tracing::warn!(webhook = %name, error = %e, "webhook failed; ignored by its failurePolicy");
                    continue;
                }
                Err(e) => {
                    return Err(ApiError::new(
                        500,
                        "InternalError",
                        format!("Internal error occurred: failed calling webhook \"{name}\": {e}"),
                    ));
                }
            };
            let response = &answer["response"];
            if response["uid"].as_str() != Some(uid.as_str()) {
                return Err(ApiError::new(
                    500,
                    "InternalError",
                    format!(
                        "Internal error occurred: webhook \"{name}\" answered for another request uid"
                    ),
                ));
            }
            if response["allowed"].as_bool() != Some(true) {
                let status = &response["status"];
                let code = status["code"].as_u64().map_or(403, |c| c as u16);
                let reason = match code {
                    429 => "TooManyRequests",
                    400 => "BadRequest",
                    422 => "Invalid",
                    404 => "NotFound",
                    409 => "Conflict",
                    _ => "Forbidden",
                };
                let message = status["message"].as_str().unwrap_or_default();
                return Err(ApiError::new(
                    code,
                    reason,
                    format!("admission webhook \"{name}\" denied the request: {message}"),
                ));
            }
            if mutating
                && let Some(patch) = response["patch"].as_str()
                && let Some(object) = req.object.as_mut()
            {
                let ops = base64::engine::general_purpose::STANDARD
                    .decode(patch)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<json_patch::Patch>(&b).ok())
                    .ok_or_else(|| {
                        ApiError::new(500, "InternalError", format!("Internal error occurred: webhook \"{name}\" sent a patch that is not a JSON patch"))
                    })?;
                json_patch::patch(object, &ops).map_err(|e| {
                    ApiError::new(
                        500,
                        "InternalError",
                        format!("Internal error occurred: webhook \"{name}\": {e}"),
                    )
                })?;
            }
        }
    }
    Ok(req.object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_and_selectors() {
        let pods = super::super::resources::builtins()
            .into_iter()
            .find(ResourceDef::is_pod)
            .expect("pods");
        let user = User::default();
        let req = Request {
            def: &pods,
            subresource: "eviction",
            namespace: "default",
            name: "a",
            operation: Operation::Create,
            user: &user,
            object: None,
            old_object: None,
            parent: None,
        };
        let rule = |res: &str| json!({"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": [res]});
        assert!(rule_matches(&rule("pods/eviction"), &req));
        assert!(rule_matches(&rule("pods/*"), &req));
        assert!(rule_matches(&rule("*/*"), &req));
        assert!(!rule_matches(&rule("pods"), &req));
        assert!(!rule_matches(&rule("*"), &req));
        let sel = json!({"matchLabels": {"app": "x"}, "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]});
        assert!(selector_matches(&sel, &json!({"app": "x"})));
        assert!(!selector_matches(&sel, &json!({"app": "x", "tier": "db"})));
        assert!(!selector_matches(&sel, &json!({})));
    }
}
