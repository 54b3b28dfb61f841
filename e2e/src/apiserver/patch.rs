//! Strategic merge patch for the core types, reduced to what kubectl and podmig send:
//! lists of known element kinds merge by their key, `finalizers` merges as a set, the
//! `$patch`, `$setElementOrder` and `$deleteFromPrimitiveList` directives are honoured;
//! everything else behaves like a JSON merge patch.
//! See <https://kubernetes.io/docs/tasks/manage-kubernetes-objects/update-api-object-kubectl-patch/>.

use serde_json::{Map, Value};

/// The merge key of list fields whose elements are merged rather than replaced.
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "webhooks" => "name",
        "ports" => "containerPort",
        "volumeMounts" => "mountPath",
        "conditions" => "type",
        "ownerReferences" => "uid",
        _ => return None,
    })
}

/// Applies `patch` to `doc` in place.
pub fn strategic_merge(doc: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *doc = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut p = p.clone();
        p.remove("$patch");
        *doc = Value::Object(p);
        return;
    }
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    let Some(d) = doc.as_object_mut() else { return };
    for (k, v) in p {
        if k.starts_with("$setElementOrder/") || k == "$retainKeys" || k == "$patch" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(cur)), Value::Array(del)) = (d.get_mut(field), v) {
                cur.retain(|x| !del.contains(x));
            }
            continue;
        }
        match v {
            Value::Null => {
                d.remove(k);
            }
            Value::Array(items) => {
                let merged = match (merge_key(k), d.get(k)) {
                    (Some(key), Some(Value::Array(cur))) => merge_list(cur, items, key),
                    (None, Some(Value::Array(cur))) if k == "finalizers" => {
                        let mut cur = cur.clone();
                        for i in items {
                            if !cur.contains(i) {
                                cur.push(i.clone());
                            }
                        }
                        cur
                    }
                    _ => items
                        .iter()
                        .filter(|i| i.get("$patch").is_none())
                        .cloned()
                        .collect(),
                };
                d.insert(k.clone(), Value::Array(merged));
            }
            Value::Object(_) => {
                let entry = d.entry(k.clone()).or_insert(Value::Null);
                strategic_merge(entry, v);
            }
            other => {
                d.insert(k.clone(), other.clone());
            }
        }
    }
}

fn merge_list(current: &[Value], patch: &[Value], key: &str) -> Vec<Value> {
    let mut out: Vec<Value> = current.to_vec();
    for item in patch {
        let id = item.get(key);
        let pos = out.iter().position(|c| id.is_some() && c.get(key) == id);
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                out.remove(i);
            }
            (Some(i), false) => strategic_merge(&mut out[i], item),
            (None, false) => out.push(item.clone()),
            (None, true) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn containers_merge_by_name_and_finalizers_as_a_set() {
        let mut doc = json!({"metadata": {"finalizers": ["a"], "labels": {"x": "1"}},
            "spec": {"unschedulable": false, "containers": [{"name": "app", "image": "i1"}, {"name": "side", "image": "s"}]}});
        strategic_merge(
            &mut doc,
            &json!({"metadata": {"finalizers": ["b"], "labels": {"x": null, "y": "2"}},
            "spec": {"unschedulable": true, "containers": [{"name": "app", "image": "i2"}, {"name": "side", "$patch": "delete"}]}}),
        );
        assert_eq!(doc["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(doc["metadata"]["labels"], json!({"y": "2"}));
        assert_eq!(doc["spec"]["unschedulable"], json!(true));
        assert_eq!(
            doc["spec"]["containers"],
            json!([{"name": "app", "image": "i2"}])
        );
    }

    #[test]
    fn directives_are_honoured() {
        let mut doc = json!({"metadata": {"finalizers": ["a", "b"]}, "spec": {"x": {"old": 1}}});
        strategic_merge(
            &mut doc,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"], "$setElementOrder/finalizers": ["b"]},
            "spec": {"x": {"$patch": "replace", "new": 2}}}),
        );
        assert_eq!(doc["metadata"], json!({"finalizers": ["b"]}));
        assert_eq!(doc["spec"]["x"], json!({"new": 2}));
    }

    #[test]
    fn webhooks_merge_by_name_as_kubectl_apply_sends_a_rotated_ca_bundle() {
        let mut doc = json!({"webhooks": [{"name": "e.podmig.dev", "failurePolicy": "Fail",
            "rules": [{"resources": ["pods/eviction"]}], "clientConfig": {"caBundle": "old"}}]});
        strategic_merge(
            &mut doc,
            &json!({"webhooks": [{"name": "e.podmig.dev", "clientConfig": {"caBundle": "new"}}]}),
        );
        assert_eq!(doc["webhooks"][0]["clientConfig"]["caBundle"], json!("new"));
        assert_eq!(doc["webhooks"][0]["failurePolicy"], json!("Fail"));
        assert_eq!(
            doc["webhooks"][0]["rules"][0]["resources"],
            json!(["pods/eviction"])
        );
    }
}
