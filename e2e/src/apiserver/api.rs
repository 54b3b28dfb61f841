//! The API semantics, independent of HTTP: create/update/patch/delete with optimistic
//! concurrency, status subresources, finalizers and graceful Pod deletion, owner-reference
//! garbage collection, and CRDs turning into served resources.

use std::sync::RwLock;

use serde_json::{Value, json};

use super::{
    resources::{self, ResourceDef},
    schema::{self, FieldError},
    store::{Key, Store},
};

/// An API error, answered as a `metav1.Status`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub code: u16,
    /// `reason` of the Status (`NotFound`, `Conflict`, …).
    pub reason: &'static str,
    /// Human message.
    pub message: String,
    /// `details` of the Status (field causes of a 422).
    pub details: Option<Value>,
}

/// Result with [`ApiError`].
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// A new error.
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }
    /// 404.
    pub fn not_found(def: &ResourceDef, name: &str) -> Self {
        let what = if def.group.is_empty() {
            def.plural.clone()
        } else {
            format!("{}.{}", def.plural, def.group)
        };
        Self::new(404, "NotFound", format!("{what} \"{name}\" not found"))
    }
    /// 404 for a path no resource is served at (kube-apiserver's wording).
    pub fn no_route() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    /// 422.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }
    /// 422 for schema violations, with the causes kubectl prints field by field.
    pub fn invalid_fields(def: &ResourceDef, name: &str, errors: &[FieldError]) -> Self {
        let lines: Vec<String> = errors.iter().map(FieldError::line).collect();
        let list = if lines.len() == 1 {
            lines[0].clone()
        } else {
            format!("[{}]", lines.join(", "))
        };
        let qualified = if def.group.is_empty() {
            def.kind.clone()
        } else {
            format!("{}.{}", def.kind, def.group)
        };
        let mut e = Self::invalid(format!("{qualified} \"{name}\" is invalid: {list}"));
        e.details = Some(json!({"name": name, "group": def.group, "kind": def.kind,
            "causes": errors.iter().map(FieldError::cause).collect::<Vec<_>>()}));
        e
    }
    /// The error as a `Status` object.
    pub fn status(&self) -> Value {
        let mut status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code});
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// Applies a patch of `kind` to `doc` (what PATCH stores, before the metadata rules).
pub fn apply_patch(doc: &mut Value, kind: PatchType, body: &Value) -> ApiResult<()> {
    match kind {
        PatchType::Merge | PatchType::Apply => json_patch::merge(doc, body),
        PatchType::Strategic => super::patch::strategic_merge(doc, body),
        PatchType::Json => {
            // NB: like kube-apiserver (evanphx/json-patch), a `test` for null passes
            // on a missing path; kube-runtime's finalizer helper relies on it.
            let mut body = body.clone();
            if let Some(ops) = body.as_array_mut() {
                ops.retain(|op| {
                    !(op["op"] == "test"
                        && op["value"].is_null()
                        && op["path"]
                            .as_str()
                            .is_some_and(|p| doc.pointer(p).is_none()))
                });
            }
            let ops: json_patch::Patch = serde_json::from_value(body)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(doc, &ops).map_err(|e| {
                ApiError::invalid(format!("the JSON patch could not be applied: {e}"))
            })?;
        }
    }
    Ok(())
}

/// Options of a deletion (query parameters or a DeleteOptions body).
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    /// Grace period in seconds; None = the object's default.
    pub grace_period: Option<i64>,
    /// `Background` (default), `Foreground` or `Orphan`.
    pub propagation: Option<String>,
    /// Precondition on the uid.
    pub uid: Option<String>,
    /// Precondition on the resourceVersion.
    pub resource_version: Option<String>,
}

impl DeleteOptions {
    /// Reads a DeleteOptions body (absent fields stay as they are).
    pub fn merge_body(mut self, body: &Value) -> Self {
        if let Some(g) = body["gracePeriodSeconds"].as_i64() {
            self.grace_period = Some(g);
        }
        if let Some(p) = body["propagationPolicy"].as_str() {
            self.propagation = Some(p.to_owned());
        }
        if body["orphanDependents"].as_bool() == Some(true) {
            self.propagation = Some("Orphan".into());
        }
        if let Some(u) = body["preconditions"]["uid"].as_str() {
            self.uid = Some(u.to_owned());
        }
        if let Some(r) = body["preconditions"]["resourceVersion"].as_str() {
            self.resource_version = Some(r.to_owned());
        }
        self
    }
}

/// How a patch body is to be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// RFC 7386.
    Merge,
    /// RFC 6902.
    Json,
    /// Kubernetes strategic merge (lists of known kinds merged by key).
    Strategic,
    /// Server-side apply (simplified: the applied fields are merged in; created if absent).
    Apply,
}

fn now() -> String {
    crate::clock::now()
}

fn finalizers(obj: &Value) -> usize {
    obj["metadata"]["finalizers"].as_array().map_or(0, Vec::len)
}

/// The served API.
pub struct Api {
    /// Objects.
    pub store: Store,
    resources: RwLock<Vec<ResourceDef>>,
    /// The /24 ClusterIPs are allocated from (its first three octets), once set.
    service_range: std::sync::OnceLock<[u8; 3]>,
}

impl Default for Api {
    fn default() -> Self {
        Self::new()
    }
}

impl Api {
    /// The API with the built-in resources and the `default`, `kube-system` namespaces.
    pub fn new() -> Self {
        let api = Self {
            store: Store::new(),
            resources: RwLock::new(resources::builtins()),
            service_range: std::sync::OnceLock::new(),
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let def = api
                .resource("", "v1", "namespaces")
                .expect("namespaces are built in");
            let _ = api.create(
                &def,
                "",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            );
        }
        api
    }

    /// Every served resource.
    pub fn resources(&self) -> Vec<ResourceDef> {
        self.resources
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The resource at `group/version/plural`.
    pub fn resource(&self, group: &str, version: &str, plural: &str) -> Option<ResourceDef> {
        self.resources()
            .into_iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    fn key(def: &ResourceDef, ns: &str, name: &str) -> Key {
        (
            def.key(),
            if def.namespaced {
                ns.to_owned()
            } else {
                String::new()
            },
            name.to_owned(),
        )
    }

    /// One object.
    pub fn get(&self, def: &ResourceDef, ns: &str, name: &str) -> ApiResult<Value> {
        self.store
            .get(&Self::key(def, ns, name))
            .ok_or_else(|| ApiError::not_found(def, name))
    }

    /// Creates an object: name or generateName, uid, timestamps, defaults.
    pub fn create(&self, def: &ResourceDef, ns: &str, mut obj: Value) -> ApiResult<Value> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body is not a JSON object"));
        }
        if def.namespaced {
            let nsdef = self.resource("", "v1", "namespaces").expect("built in");
            match self.store.get(&Self::key(&nsdef, "", ns)) {
                None => {
                    return Err(ApiError::new(
                        404,
                        "NotFound",
                        format!("namespaces \"{ns}\" not found"),
                    ));
                }
                Some(n) if !n["metadata"]["deletionTimestamp"].is_null() => {
                    return Err(ApiError::new(
                        403,
                        "Forbidden",
                        format!(
                            "unable to create new content in namespace {ns} because it is being terminated"
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        let meta = &mut obj["metadata"];
        if !meta.is_object() {
            *meta = json!({});
        }
        let mut name = meta["name"].as_str().unwrap_or_default().to_owned();
        if name.is_empty() {
            let prefix = meta["generateName"].as_str().unwrap_or_default();
            if prefix.is_empty() {
                return Err(ApiError::invalid(format!(
                    "{} is invalid: metadata.name: Required value: name or generateName is required",
                    def.kind
                )));
            }
            let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..5].to_owned();
            name = format!("{prefix}{suffix}");
        }
        if let Some(body_ns) = meta["namespace"].as_str().filter(|n| !n.is_empty())
            && def.namespaced
            && body_ns != ns
        {
            return Err(ApiError::bad_request(format!(
                "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({ns})"
            )));
        }
        meta["name"] = json!(name);
        if def.namespaced {
            meta["namespace"] = json!(ns);
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
        meta["creationTimestamp"] = json!(now());
        meta["generation"] = json!(1);
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
            m.remove("resourceVersion");
        }
        obj["apiVersion"] = json!(def.api_version());
        obj["kind"] = json!(def.kind);
        self.defaults(def, &mut obj);
        Self::structural(def, &name, &mut obj)?;
        if def.group == "apiextensions.k8s.io" {
            self.accept_crd(&mut obj)?;
        }
        let key = Self::key(def, ns, &name);
        let created = self
            .store
            .write(&key, |old| match old {
                Some(_) => Err(ApiError::new(
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", def.plural),
                )),
                None => Ok(Some(obj)),
            })?
            .expect("written");
        if def.group == "apiextensions.k8s.io" {
            self.register_crd(&created);
        }
        self.mirror_event(def, ns, &name, Some(&created));
        Ok(created)
    }

    /// A custom resource as storage keeps it: unknown fields pruned, defaults applied,
    /// valid against its version's schema (422 with field causes otherwise).
    fn structural(def: &ResourceDef, name: &str, obj: &mut Value) -> ApiResult<()> {
        let Some(schema) = &def.schema else {
            return Ok(());
        };
        schema::prune(schema, obj);
        schema::apply_defaults(schema, obj);
        let errors = schema::validate(schema, obj);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid_fields(def, name, &errors))
        }
    }

    /// Sets the /24 (`a.b.c.0/24`) Services' ClusterIPs come from (once).
    pub fn set_service_range(&self, first_three: [u8; 3]) {
        let _ = self.service_range.set(first_three);
    }

    /// kube-apiserver's Service defaults and allocations: `type: ClusterIP`, a free
    /// ClusterIP of the service range, TCP ports with `targetPort` = `port`, and a free
    /// `nodePort` (30000–32767) for each port of a `NodePort` Service.
    fn service_defaults(&self, def: &ResourceDef, obj: &mut Value) {
        let (taken, _) = self.store.list(&def.key(), None);
        let spec = &mut obj["spec"];
        if spec["type"].is_null() {
            spec["type"] = json!("ClusterIP");
        }
        if spec["sessionAffinity"].is_null() {
            spec["sessionAffinity"] = json!("None");
        }
        if let Some([a, b, c]) = self.service_range.get().copied()
            && spec["clusterIP"].as_str().is_none_or(str::is_empty)
            && spec["type"] != "ExternalName"
        {
            let used: std::collections::HashSet<String> = taken
                .iter()
                .filter_map(|s| s["spec"]["clusterIP"].as_str().map(str::to_owned))
                .collect();
            if let Some(ip) = (1..=254)
                .map(|d| format!("{a}.{b}.{c}.{d}"))
                .find(|ip| !used.contains(ip))
            {
                spec["clusterIP"] = json!(ip);
                spec["clusterIPs"] = json!([ip]);
            }
        }
        let mut used_ports: std::collections::HashSet<u64> = taken
            .iter()
            .flat_map(|s| s["spec"]["ports"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["nodePort"].as_u64())
            .collect();
        let node_port = spec["type"] == "NodePort" || spec["type"] == "LoadBalancer";
        if let Some(ports) = spec["ports"].as_array_mut() {
            for p in ports {
                if p["protocol"].is_null() {
                    p["protocol"] = json!("TCP");
                }
                if p["targetPort"].is_null() {
                    p["targetPort"] = p["port"].clone();
                }
                if node_port
                    && p["nodePort"].is_null()
                    && let Some(n) = (30000..=32767).find(|n| !used_ports.contains(n))
                {
                    used_ports.insert(n);
                    p["nodePort"] = json!(n);
                }
            }
        }
    }

    /// The Priority admission plugin: `spec.priority` (and `preemptionPolicy`) from the
    /// Pod's PriorityClass, or from the global default class, else 0.
    fn priority_admission(&self, spec: &mut Value) {
        if !spec["priority"].is_null() {
            return;
        }
        let class = self
            .resource("scheduling.k8s.io", "v1", "priorityclasses")
            .and_then(|def| {
                let (all, _) = self.store.list(&def.key(), None);
                match spec["priorityClassName"].as_str() {
                    Some(name) => all.into_iter().find(|c| c["metadata"]["name"] == name),
                    None => all.into_iter().find(|c| c["globalDefault"] == true),
                }
            });
        match class {
            Some(c) => {
                spec["priority"] = c["value"].clone();
                spec["preemptionPolicy"] = c
                    .get("preemptionPolicy")
                    .filter(|v| !v.is_null())
                    .cloned()
                    .unwrap_or(json!("PreemptLowerPriority"));
            }
            None => {
                spec["priority"] = json!(0);
                spec["preemptionPolicy"] = json!("PreemptLowerPriority");
            }
        }
    }

    fn defaults(&self, def: &ResourceDef, obj: &mut Value) {
        if def.group.is_empty() && def.plural == "services" {
            self.service_defaults(def, obj);
        }
        if def.is_pod() {
            let spec = &mut obj["spec"];
            if spec["restartPolicy"].is_null() {
                spec["restartPolicy"] = json!("Always");
            }
            if spec["terminationGracePeriodSeconds"].is_null() {
                spec["terminationGracePeriodSeconds"] = json!(30);
            }
            if spec["schedulerName"].is_null() {
                spec["schedulerName"] = json!("default-scheduler");
            }
            service_account_admission(spec);
            self.priority_admission(spec);
            if obj["status"]["phase"].is_null() {
                obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            }
        }
        if def.group == "batch" && def.plural == "jobs" {
            let spec = &mut obj["spec"];
            for (k, v) in [
                ("backoffLimit", json!(6)),
                ("completions", json!(1)),
                ("parallelism", json!(1)),
            ] {
                if spec[k].is_null() {
                    spec[k] = v;
                }
            }
        }
        // apps/v1 defaults, as kube-apiserver sets them (kubectl rollout status reads them).
        if def.group == "apps" {
            let spec = &mut obj["spec"];
            let set = |spec: &mut Value, k: &str, v: Value| {
                if spec[k].is_null() {
                    spec[k] = v;
                }
            };
            match def.plural.as_str() {
                "deployments" => {
                    set(spec, "replicas", json!(1));
                    set(spec, "revisionHistoryLimit", json!(10));
                    set(spec, "progressDeadlineSeconds", json!(600));
                    set(
                        spec,
                        "strategy",
                        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}),
                    );
                }
                "daemonsets" => {
                    set(spec, "revisionHistoryLimit", json!(10));
                    set(
                        spec,
                        "updateStrategy",
                        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}),
                    );
                }
                "replicasets" => set(spec, "replicas", json!(1)),
                _ => {}
            }
        }
        if def.group.is_empty() && def.plural == "namespaces" {
            obj["status"] = json!({"phase": "Active"});
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
        }
    }

    fn accept_crd(&self, crd: &mut Value) -> ApiResult<()> {
        let spec = &crd["spec"];
        let plural = spec["names"]["plural"].as_str().unwrap_or_default();
        let group = spec["group"].as_str().unwrap_or_default();
        if plural.is_empty()
            || group.is_empty()
            || spec["versions"].as_array().is_none_or(Vec::is_empty)
        {
            return Err(ApiError::invalid(
                "CustomResourceDefinition is invalid: spec.group, spec.names.plural and spec.versions are required",
            ));
        }
        let expected = format!("{plural}.{group}");
        if crd["metadata"]["name"].as_str() != Some(expected.as_str()) {
            return Err(ApiError::invalid(format!(
                "CustomResourceDefinition.apiextensions.k8s.io \"{}\" is invalid: metadata.name: Invalid value: must be spec.names.plural+\".\"+spec.group ({expected})",
                crd["metadata"]["name"].as_str().unwrap_or_default()
            )));
        }
        let t = now();
        crd["status"] = json!({
            "acceptedNames": spec["names"].clone(),
            "storedVersions": spec["versions"].as_array().map(|v| v.iter().filter(|x| x["storage"].as_bool() == Some(true)).map(|x| x["name"].clone()).collect::<Vec<_>>()).unwrap_or_default(),
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": t},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": t},
            ],
        });
        Ok(())
    }

    fn register_crd(&self, crd: &Value) {
        let defs = resources::from_crd(crd);
        let mut all = self
            .resources
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.retain(|r| {
            !defs
                .iter()
                .any(|d| d.group == r.group && d.plural == r.plural)
        });
        all.extend(defs);
    }

    fn unregister_crd(&self, crd: &Value) {
        let group = crd["spec"]["group"].as_str().unwrap_or_default().to_owned();
        let plural = crd["spec"]["names"]["plural"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.resources
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|r| !(r.group == group && r.plural == plural));
        let key = format!("{group}/{plural}");
        for ((r, ns, name), _) in self.store.all() {
            if r == key {
                let _ = self.store.write::<ApiError>(&(r, ns, name), |_| Ok(None));
            }
        }
    }

    /// Replaces an object (PUT) or, with `status_only`, its status.
    pub fn replace(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        obj: Value,
        status_only: bool,
    ) -> ApiResult<Value> {
        if obj["metadata"]["name"].as_str().is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                obj["metadata"]["name"].as_str().unwrap_or_default()
            )));
        }
        let rv = obj["metadata"]["resourceVersion"]
            .as_str()
            .map(str::to_owned)
            .filter(|s| !s.is_empty());
        self.update_with(def, ns, name, rv.as_deref(), status_only, |_| Ok(obj))
    }

    /// Patches an object (or its status).
    pub fn patch(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        kind: PatchType,
        body: &Value,
        status_only: bool,
    ) -> ApiResult<Value> {
        if kind == PatchType::Apply && self.store.get(&Self::key(def, ns, name)).is_none() {
            let mut obj = body.clone();
            obj["metadata"]["name"] = json!(name);
            return self.create(def, ns, obj);
        }
        let rv = body["metadata"]["resourceVersion"]
            .as_str()
            .map(str::to_owned)
            .filter(|s| !s.is_empty());
        self.update_with(def, ns, name, rv.as_deref(), status_only, |current| {
            let mut doc = current.clone();
            apply_patch(&mut doc, kind, body)?;
            Ok(doc)
        })
    }

    /// The core of every update: precondition on rv, immutable metadata, status rules,
    /// generation, and finalization when the last finalizer of a deleted object goes.
    fn update_with(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        rv: Option<&str>,
        status_only: bool,
        change: impl FnOnce(&Value) -> ApiResult<Value>,
    ) -> ApiResult<Value> {
        let key = Self::key(def, ns, name);
        let written = self.store.write(&key, |old| {
            let old = old.ok_or_else(|| ApiError::not_found(def, name))?;
            if let Some(rv) = rv
                && old["metadata"]["resourceVersion"].as_str() != Some(rv)
            {
                return Err(ApiError::new(409, "Conflict", format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    if def.group.is_empty() { def.plural.clone() } else { format!("{}.{}", def.plural, def.group) })));
            }
            let mut new = change(old)?;
            if !new.is_object() {
                return Err(ApiError::bad_request("the object is not a JSON object"));
            }
            // Immutable and server-owned fields.
            for f in ["uid", "creationTimestamp", "name", "namespace", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"] {
                match old["metadata"].get(f) {
                    Some(v) => new["metadata"][f] = v.clone(),
                    None => {
                        if let Some(m) = new["metadata"].as_object_mut() {
                            m.remove(f);
                        }
                    }
                }
            }
            new["apiVersion"] = json!(def.api_version());
            new["kind"] = json!(def.kind);
            if status_only {
                let mut kept = old.clone();
                kept["status"] = new["status"].clone();
                new = kept;
            } else if def.status {
                new["status"] = old["status"].clone();
                if new["status"].is_null()
                    && let Some(o) = new.as_object_mut()
                {
                    o.remove("status");
                }
            }
            Self::structural(def, name, &mut new)?;
            let spec_changed = {
                let strip = |v: &Value| {
                    let mut v = v.clone();
                    if let Some(o) = v.as_object_mut() {
                        o.remove("metadata");
                        o.remove("status");
                    }
                    v
                };
                strip(&new) != strip(old)
            };
            if spec_changed {
                let g = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                new["metadata"]["generation"] = json!(g);
            }
            if Self::may_remove(def, &new) {
                return Ok(None);
            }
            Ok(Some(new))
        })?;
        match written {
            Some(obj)
                if obj["metadata"]["deletionTimestamp"].is_null()
                    || self.store.get(&key).is_some() =>
            {
                if def.group == "apiextensions.k8s.io" {
                    self.register_crd(&obj);
                }
                self.mirror_event(def, ns, name, Some(&obj));
                Ok(obj)
            }
            Some(removed) => {
                self.after_removal(def, &removed, "Background");
                Ok(removed)
            }
            None => Err(ApiError::not_found(def, name)),
        }
    }

    /// An object marked for deletion goes when no finalizer is left and, for a Pod bound to
    /// a node, its kubelet has confirmed (grace period 0).
    fn may_remove(def: &ResourceDef, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        if meta["deletionTimestamp"].is_null() || finalizers(obj) > 0 {
            return false;
        }
        !(def.is_pod()
            && !obj["spec"]["nodeName"].is_null()
            && meta["deletionGracePeriodSeconds"].as_i64().unwrap_or(0) > 0)
    }

    /// Deletes an object with the Kubernetes rules for finalizers and graceful Pod deletion.
    pub fn delete(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> ApiResult<Value> {
        let key = Self::key(def, ns, name);
        let propagation = opts
            .propagation
            .clone()
            .unwrap_or_else(|| "Background".into());
        let mut removed = false;
        let result = self.store.write(&key, |old| {
            let old = old.ok_or_else(|| ApiError::not_found(def, name))?;
            if let Some(uid) = &opts.uid
                && old["metadata"]["uid"].as_str() != Some(uid)
            {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        old["metadata"]["uid"].as_str().unwrap_or_default()
                    ),
                ));
            }
            if let Some(rv) = &opts.resource_version
                && old["metadata"]["resourceVersion"].as_str() != Some(rv)
            {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!("Precondition failed: ResourceVersion in precondition: {rv}"),
                ));
            }
            let mut new = old.clone();
            let bound_pod = def.is_pod() && !old["spec"]["nodeName"].is_null();
            let grace = if bound_pod {
                let default = old["spec"]["terminationGracePeriodSeconds"]
                    .as_i64()
                    .unwrap_or(30);
                let asked = opts.grace_period.unwrap_or(default).max(0);
                // A deletion in progress can only shorten its grace period.
                old["metadata"]["deletionGracePeriodSeconds"]
                    .as_i64()
                    .map_or(asked, |g| g.min(asked))
            } else {
                0
            };
            if new["metadata"]["deletionTimestamp"].is_null() {
                new["metadata"]["deletionTimestamp"] = json!(crate::clock::from_now(grace));
            }
            new["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            if Self::may_remove(def, &new) {
                removed = true;
                return Ok(None);
            }
            if new == *old {
                return Err(ApiError::new(0, "Unchanged", ""));
            }
            Ok(Some(new))
        });
        let obj = match result {
            Err(e) if e.code == 0 => return self.get(def, ns, name),
            other => other?.ok_or_else(|| ApiError::not_found(def, name))?,
        };
        if removed {
            self.after_removal(def, &obj, &propagation);
            self.mirror_event(def, ns, name, None);
        }
        Ok(obj)
    }

    /// A real API server serves one set of Events through `events.k8s.io/v1` and core
    /// `v1`: a write through either is seen through both, fields mapped as upstream does.
    fn mirror_event(&self, def: &ResourceDef, ns: &str, name: &str, obj: Option<&Value>) {
        let (other_group, to_core) = match (def.group.as_str(), def.plural.as_str()) {
            ("events.k8s.io", "events") => ("", true),
            ("", "events") => ("events.k8s.io", false),
            _ => return,
        };
        let Some(other) = self
            .resources()
            .into_iter()
            .find(|r| r.group == other_group && r.plural == "events")
        else {
            return;
        };
        let key = Self::key(&other, ns, name);
        let mirrored = obj.map(|o| {
            let mut m = if to_core {
                super::events::to_core(o)
            } else {
                super::events::to_events_v1(o)
            };
            m["apiVersion"] = json!(other.api_version());
            m["kind"] = json!(other.kind);
            m
        });
        let _ = self.store.write(&key, |_| Ok::<_, ApiError>(mirrored));
    }

    /// Cascades a removal: dependents (owner references), a CRD's resources, a
    /// namespace's contents.
    fn after_removal(&self, def: &ResourceDef, obj: &Value, propagation: &str) {
        if def.group == "apiextensions.k8s.io" {
            self.unregister_crd(obj);
        }
        let uid = obj["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let in_ns = (def.group.is_empty() && def.plural == "namespaces").then(|| {
            obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        });
        let defs = self.resources();
        for ((res, ns, name), dep) in self.store.all() {
            let owned = dep["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(uid.as_str())));
            let in_namespace = in_ns.as_deref().is_some_and(|n| !n.is_empty() && n == ns);
            if !(owned || in_namespace) {
                continue;
            }
            let Some(ddef) = defs.iter().find(|d| d.key() == res).cloned() else {
                continue;
            };
            if owned && propagation == "Orphan" {
                let _ = self.update_with(&ddef, &ns, &name, None, false, |cur| {
                    let mut cur = cur.clone();
                    if let Some(refs) = cur["metadata"]["ownerReferences"].as_array_mut() {
                        refs.retain(|r| r["uid"].as_str() != Some(uid.as_str()));
                    }
                    Ok(cur)
                });
            } else {
                let _ = self.delete(&ddef, &ns, &name, &DeleteOptions::default());
            }
        }
    }

    /// Binds a Pod to a node (the `binding` subresource).
    pub fn bind(&self, def: &ResourceDef, ns: &str, name: &str, node: &str) -> ApiResult<Value> {
        if node.is_empty() {
            return Err(ApiError::invalid(
                "Binding is invalid: target.name: Required value",
            ));
        }
        let key = Self::key(def, ns, name);
        self.store
            .write(&key, |old| {
                let old = old.ok_or_else(|| ApiError::not_found(def, name))?;
                if !old["spec"]["nodeName"].is_null() {
                    return Err(ApiError::new(409, "Conflict", format!(
                        "Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node \"{}\"",
                        old["spec"]["nodeName"].as_str().unwrap_or_default())));
                }
                let mut new = old.clone();
                new["spec"]["nodeName"] = json!(node);
                Ok(Some(new))
            })?
            .ok_or_else(|| ApiError::not_found(def, name))
    }
}

/// Where kubelet mounts a Pod's service-account credentials in each container.
pub const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The ServiceAccount admission plugin: the Pod runs as `default` unless it names an
/// account, and unless it opts out (`automountServiceAccountToken: false`) gets the
/// `kube-api-access-*` projected volume (a bound token, the cluster CA from the
/// `kube-root-ca.crt` ConfigMap, its namespace) mounted read-only in every container.
fn service_account_admission(spec: &mut Value) {
    if spec["serviceAccountName"]
        .as_str()
        .is_none_or(str::is_empty)
    {
        spec["serviceAccountName"] = json!("default");
    }
    spec["serviceAccount"] = spec["serviceAccountName"].clone();
    if spec["automountServiceAccountToken"] == json!(false) {
        return;
    }
    let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
    if volumes.iter().any(|v| {
        v["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("kube-api-access-"))
    }) {
        return;
    }
    let name = format!(
        "kube-api-access-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..5]
    );
    let mut volumes = volumes;
    volumes.push(json!({"name": name, "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
    ]}}));
    spec["volumes"] = Value::Array(volumes);
    for kind in ["initContainers", "containers"] {
        let Some(containers) = spec[kind].as_array_mut() else {
            continue;
        };
        for c in containers {
            let mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
            if mounts
                .iter()
                .any(|m| m["mountPath"] == json!(SERVICE_ACCOUNT_MOUNT))
            {
                continue;
            }
            let mut mounts = mounts;
            mounts
                .push(json!({"name": name, "readOnly": true, "mountPath": SERVICE_ACCOUNT_MOUNT}));
            c["volumeMounts"] = Value::Array(mounts);
        }
    }
}
