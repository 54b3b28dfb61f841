//! Authentication (bearer tokens the server issues) and RBAC authorization evaluated over
//! the stored Roles, ClusterRoles and their bindings, as kube-apiserver does.

use std::{collections::HashMap, sync::RwLock};

use serde_json::Value;

use super::api::Api;

/// An authenticated user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    /// User name (`admin`, `system:serviceaccount:ns:name`, `system:node:n1`).
    pub name: String,
    /// Uid.
    pub uid: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Extra user info (a Pod-bound token's Pod and node, as upstream sets them).
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

impl User {
    /// The identity of a ServiceAccount's token.
    pub fn service_account(ns: &str, name: &str, uid: &str) -> Self {
        Self {
            name: format!("system:serviceaccount:{ns}:{name}"),
            uid: uid.to_owned(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
            extra: Default::default(),
        }
    }
}

/// Known tokens.
#[derive(Default)]
pub struct Tokens(RwLock<HashMap<String, User>>);

impl Tokens {
    /// Registers `token` for `user`.
    pub fn add(&self, token: &str, user: User) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(token.to_owned(), user);
    }

    /// Issues a fresh random token for `user`.
    pub fn issue(&self, user: User) -> String {
        let token = format!("pmt-{}", uuid::Uuid::new_v4().simple());
        self.add(&token, user);
        token
    }

    /// The user a token belongs to.
    pub fn authenticate(&self, token: &str) -> Option<User> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(token)
            .cloned()
    }
}

/// What a request wants to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    /// API group.
    pub group: String,
    /// Resource (plural).
    pub resource: String,
    /// Subresource (`status`, `eviction`, …).
    pub subresource: String,
    /// Namespace (empty for cluster scope).
    pub namespace: String,
    /// Object name (empty for collections).
    pub name: String,
    /// For non-resource requests (`/healthz`): the path.
    pub path: Option<String>,
}

fn matches(list: &Value, want: &str) -> bool {
    list.as_array().is_some_and(|a| {
        a.iter()
            .any(|v| v.as_str() == Some("*") || v.as_str() == Some(want))
    })
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    if let Some(path) = &a.path {
        return rule["nonResourceURLs"].as_array().is_some_and(|urls| {
            urls.iter().filter_map(Value::as_str).any(|u| {
                u == "*" || u == path || u.strip_suffix('*').is_some_and(|p| path.starts_with(p))
            })
        }) && matches(&rule["verbs"], &a.verb);
    }
    let resource = if a.subresource.is_empty() {
        a.resource.clone()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let names_ok = rule["resourceNames"].as_array().is_none_or(|n| {
        n.is_empty()
            || (!a.name.is_empty() && n.iter().any(|x| x.as_str() == Some(a.name.as_str())))
    });
    matches(&rule["apiGroups"], &a.group)
        && (matches(&rule["resources"], &resource)
            || (!a.subresource.is_empty()
                && matches(&rule["resources"], &format!("{}/*", a.resource))))
        && matches(&rule["verbs"], &a.verb)
        && names_ok
}

fn subject_matches(subject: &Value, user: &User) -> bool {
    let name = subject["name"].as_str().unwrap_or_default();
    match subject["kind"].as_str() {
        Some("User") => name == user.name,
        Some("Group") => user.groups.iter().any(|g| g == name),
        Some("ServiceAccount") => {
            let ns = subject["namespace"].as_str().unwrap_or_default();
            user.name == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

/// Decides whether `user` may do `a`; the reason names the binding that allowed it.
pub fn authorize(api: &Api, user: &User, a: &Attributes) -> (bool, String) {
    if user.groups.iter().any(|g| g == "system:masters") {
        return (true, "system:masters".into());
    }
    // Discovery, version and health are open to every authenticated user (system:discovery).
    if let Some(p) = &a.path
        && (p == "/api"
            || p == "/apis"
            || p.starts_with("/api/")
            || p.starts_with("/apis/")
            || p == "/version"
            || p.starts_with("/healthz")
            || p.starts_with("/livez")
            || p.starts_with("/readyz")
            || p.starts_with("/openapi"))
        && a.verb == "get"
    {
        return (true, "system:discovery".into());
    }
    let role = |kind: &str, name: &str, ns: &str| -> Option<Value> {
        let (plural, ns) = if kind == "ClusterRole" {
            ("clusterroles", "")
        } else {
            ("roles", ns)
        };
        let def = api.resource("rbac.authorization.k8s.io", "v1", plural)?;
        api.get(&def, ns, name).ok()
    };
    let bindings = |plural: &str, ns: Option<&str>| {
        api.resource("rbac.authorization.k8s.io", "v1", plural)
            .map(|d| api.store.list(&d.key(), ns).0)
            .unwrap_or_default()
    };
    let check = |binding: &Value, ns: &str| -> bool {
        if !binding["subjects"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| subject_matches(s, user)))
        {
            return false;
        }
        let r = &binding["roleRef"];
        role(
            r["kind"].as_str().unwrap_or_default(),
            r["name"].as_str().unwrap_or_default(),
            ns,
        )
        .and_then(|role| role["rules"].as_array().cloned())
        .is_some_and(|rules| rules.iter().any(|rule| rule_allows(rule, a)))
    };
    for b in bindings("clusterrolebindings", None) {
        if check(&b, "") {
            return (
                true,
                format!(
                    "allowed by ClusterRoleBinding {:?}",
                    b["metadata"]["name"].as_str().unwrap_or_default()
                ),
            );
        }
    }
    if !a.namespace.is_empty() {
        for b in bindings("rolebindings", Some(&a.namespace)) {
            if check(&b, &a.namespace) {
                return (
                    true,
                    format!(
                        "allowed by RoleBinding {:?} in {}",
                        b["metadata"]["name"].as_str().unwrap_or_default(),
                        a.namespace
                    ),
                );
            }
        }
    }
    (false, String::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attrs(verb: &str, resource: &str, sub: &str, ns: &str) -> Attributes {
        Attributes {
            verb: verb.into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            ..Default::default()
        }
    }

    #[test]
    fn role_bindings_grant_only_their_rules() {
        let api = Api::new();
        let rbac = |p: &str| {
            api.resource("rbac.authorization.k8s.io", "v1", p)
                .expect("rbac")
        };
        api.create(&rbac("roles"), "default", json!({"metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods", "pods/status"], "verbs": ["get", "list", "watch"]}]})).expect("role");
        api.create(&rbac("rolebindings"), "default", json!({"metadata": {"name": "rb"},
            "subjects": [{"kind": "ServiceAccount", "name": "ctl", "namespace": "default"}],
            "roleRef": {"kind": "Role", "name": "pod-reader", "apiGroup": "rbac.authorization.k8s.io"}})).expect("binding");
        let sa = User::service_account("default", "ctl", "u");
        assert!(authorize(&api, &sa, &attrs("list", "pods", "", "default")).0);
        assert!(authorize(&api, &sa, &attrs("get", "pods", "status", "default")).0);
        assert!(!authorize(&api, &sa, &attrs("delete", "pods", "", "default")).0);
        assert!(!authorize(&api, &sa, &attrs("list", "pods", "", "other")).0);
        let stranger = User::service_account("default", "other", "u2");
        assert!(!authorize(&api, &stranger, &attrs("list", "pods", "", "default")).0);
        let admin = User {
            name: "admin".into(),
            uid: "a".into(),
            groups: vec!["system:masters".into()],
            ..Default::default()
        };
        assert!(authorize(&api, &admin, &attrs("delete", "nodes", "", "")).0);
    }
}
