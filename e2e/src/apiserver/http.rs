//! The HTTP face of the test API server: routing of the Kubernetes REST paths,
//! authentication and authorization, content negotiation (JSON, Table), watch streams.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{
    admission::{self, Operation},
    api::{Api, ApiError, ApiResult, DeleteOptions, PatchType},
    auth::{self, Attributes, Tokens, User},
    outbound::KubeletClient,
    resources::ResourceDef,
    selectors::{FieldSelector, LabelSelector},
    store::EventType,
    table,
};

/// Version reported at `/version` (the kubectl on these machines is 1.32).
pub const VERSION: &str = "v1.32.0";

/// What the handlers share.
pub struct ServerState {
    /// The API.
    pub api: Arc<Api>,
    /// Tokens.
    pub tokens: Arc<Tokens>,
    /// How often watches with bookmarks get one.
    pub bookmark_interval: Duration,
    /// How to reach kubelets (`pods/log`), once the cluster has nodes.
    pub kubelet: Arc<std::sync::OnceLock<KubeletClient>>,
    /// Every request RBAC denied: `user verb resource[/subresource] ns/name`.
    pub denied: Arc<std::sync::Mutex<Vec<String>>>,
}

fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(e: &ApiError) -> Response {
    json_response(e.code, &e.status())
}

/// The parsed path of a resource request.
#[derive(Debug, Default)]
struct Target {
    group: String,
    version: String,
    namespace: String,
    plural: String,
    name: String,
    subresource: String,
}

impl Target {
    fn is_pod_log(&self, def: &ResourceDef) -> bool {
        def.is_pod() && self.subresource == "log" && !self.name.is_empty()
    }
}

/// `pods/log`: proxied to the kubelet of the Pod's node (its InternalIP and kubelet
/// port from the Node's status), streamed back as kubelet sends it.
async fn pod_log(st: &ServerState, def: &ResourceDef, t: &Target, uri: &Uri) -> Response {
    let pod = match st.api.get(def, &t.namespace, &t.name) {
        Ok(p) => p,
        Err(e) => return error(&e),
    };
    let Some(node_name) = pod["spec"]["nodeName"].as_str() else {
        return error(&ApiError::bad_request(format!(
            "pod {} does not have a host assigned",
            t.name
        )));
    };
    let containers: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let query: HashMap<String, String> = Query::try_from_uri(uri)
        .map(|q: Query<HashMap<String, String>>| q.0)
        .unwrap_or_default();
    let container = match query.get("container") {
        Some(c) if containers.contains(&c.as_str()) => c.clone(),
        Some(c) => {
            return error(&ApiError::bad_request(format!(
                "container {c} is not valid for pod {}",
                t.name
            )));
        }
        None if containers.len() == 1 => containers[0].to_owned(),
        None => {
            return error(&ApiError::bad_request(format!(
                "a container name must be specified for pod {}, choose one of: [{}]",
                t.name,
                containers.join(" ")
            )));
        }
    };
    let Some(nodes) = st.api.resource("", "v1", "nodes") else {
        return error(&ApiError::no_route());
    };
    let node = match st.api.get(&nodes, "", node_name) {
        Ok(n) => n,
        Err(e) => return error(&e),
    };
    let ip = node["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a["address"].as_str());
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"].as_u64();
    let (Some(ip), Some(port), Some(kubelet)) = (ip, port, st.kubelet.get()) else {
        return error(&ApiError::new(
            503,
            "ServiceUnavailable",
            format!("the kubelet of node {node_name} cannot be reached"),
        ));
    };
    let forwarded: Vec<String> = [
        "follow",
        "previous",
        "tailLines",
        "timestamps",
        "limitBytes",
    ]
    .iter()
    .filter_map(|k| query.get(*k).map(|v| format!("{k}={v}")))
    .collect();
    let url = format!(
        "https://{ip}:{port}/containerLogs/{}/{}/{container}?{}",
        t.namespace,
        t.name,
        forwarded.join("&")
    );
    let request = axum::http::Request::get(url)
        .header(header::AUTHORIZATION, format!("Bearer {}", kubelet.token))
        .body(http_body_util::Full::new(Bytes::new()));
    let Ok(request) = request else {
        return error(&ApiError::bad_request("invalid log request"));
    };
    match kubelet.client.request(request).await {
        Ok(resp) if resp.status().is_success() => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain")],
            Body::new(resp.into_body()),
        )
            .into_response(),
        Ok(resp) => {
            let code = resp.status().as_u16();
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
                .unwrap_or_default();
            let reason = if code == 404 {
                "NotFound"
            } else {
                "BadRequest"
            };
            error(&ApiError::new(code, reason, body))
        }
        Err(e) => error(&ApiError::new(
            500,
            "InternalError",
            format!("Get kubelet logs of node {node_name}: {e}"),
        )),
    }
}

fn parse_target(api: &Api, segs: &[&str]) -> Option<Target> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => (String::new(), (*v).to_owned(), rest),
        ["apis", g, v, rest @ ..] => ((*g).to_owned(), (*v).to_owned(), rest),
        _ => return None,
    };
    let namespaced = |plural: &str| {
        api.resource(&group, &version, plural)
            .is_some_and(|d| d.namespaced)
    };
    let mut t = Target {
        group: group.clone(),
        version: version.clone(),
        ..Default::default()
    };
    let rest: Vec<&str> = match rest {
        ["namespaces", ns, plural, tail @ ..] if namespaced(plural) => {
            t.namespace = (*ns).to_owned();
            std::iter::once(*plural)
                .chain(tail.iter().copied())
                .collect()
        }
        other => other.to_vec(),
    };
    match rest.as_slice() {
        [plural] => t.plural = (*plural).to_owned(),
        [plural, name] => {
            t.plural = (*plural).to_owned();
            t.name = (*name).to_owned();
        }
        [plural, name, sub] => {
            t.plural = (*plural).to_owned();
            t.name = (*name).to_owned();
            t.subresource = (*sub).to_owned();
        }
        _ => return None,
    }
    Some(t)
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

fn parse_body(body: &Bytes) -> ApiResult<Value> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// The user a request acts as: with `Impersonate-User` (and `Impersonate-Group`), the
/// named user, if the caller may `impersonate` them (as kube-apiserver decides it);
/// otherwise the caller.
fn impersonated(api: &Api, caller: User, headers: &HeaderMap) -> ApiResult<User> {
    let Some(name) = headers
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
    else {
        return Ok(caller);
    };
    let groups: Vec<String> = headers
        .get_all("impersonate-group")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    let may = |resource: &str, name: &str, namespace: &str| {
        let a = Attributes {
            verb: "impersonate".into(),
            resource: resource.into(),
            name: name.into(),
            namespace: namespace.into(),
            ..Default::default()
        };
        auth::authorize(api, &caller, &a).0
    };
    let sa = name
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'));
    let allowed = match sa {
        Some((ns, sa_name)) => may("serviceaccounts", sa_name, ns),
        None => may("users", name, ""),
    };
    let forbidden = |what: &str, who: &str| {
        ApiError::new(
            403,
            "Forbidden",
            format!(
                "{what} \"{who}\" is forbidden: User \"{}\" cannot impersonate resource \"{what}\" in API group \"\" at the cluster scope",
                caller.name
            ),
        )
    };
    if !allowed {
        return Err(forbidden("users", name));
    }
    if let Some(g) = groups.iter().find(|g| !may("groups", g, "")) {
        return Err(forbidden("groups", g));
    }
    let mut user = match sa {
        // A ServiceAccount's groups, as its own token would carry them.
        Some((ns, sa_name)) if groups.is_empty() => User::service_account(ns, sa_name, ""),
        _ => User {
            name: name.to_owned(),
            uid: String::new(),
            groups,
            ..Default::default()
        },
    };
    if !user.groups.iter().any(|g| g == "system:authenticated") {
        user.groups.push("system:authenticated".into());
    }
    Ok(user)
}

/// The single handler behind every path.
pub async fn handle(
    State(st): State<Arc<ServerState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_end_matches('/').to_owned();
    let query: HashMap<String, String> = Query::try_from_uri(&uri)
        .map(|q: Query<HashMap<String, String>>| q.0)
        .unwrap_or_default();
    match path.as_str() {
        "/healthz" | "/livez" | "/readyz" => return (StatusCode::OK, "ok").into_response(),
        "/version" => {
            return json_response(
                200,
                &json!({"major": "1", "minor": "32", "gitVersion": VERSION,
                "platform": "linux/amd64", "goVersion": "n/a", "compiler": "podmig-e2e"}),
            );
        }
        _ => {}
    }
    let Some(user) = bearer(&headers).and_then(|t| st.tokens.authenticate(t)) else {
        return error(&ApiError::new(401, "Unauthorized", "Unauthorized"));
    };
    let user = match impersonated(&st.api, user, &headers) {
        Ok(u) => u,
        Err(e) => return error(&e),
    };
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let discovery = matches!(
        segs.as_slice(),
        ["api"] | ["apis"] | ["api", _] | ["apis", _] | ["apis", _, _]
    ) || segs.first() == Some(&"openapi");
    if discovery {
        let a = Attributes {
            verb: "get".into(),
            path: Some(path.clone()),
            ..Default::default()
        };
        if !auth::authorize(&st.api, &user, &a).0 {
            return error(&ApiError::new(
                403,
                "Forbidden",
                format!(
                    "forbidden: User \"{}\" cannot get path \"{path}\"",
                    user.name
                ),
            ));
        }
        if segs == ["openapi", "v2"] {
            let protobuf = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("protobuf"));
            let (bytes, content_type) = super::openapi::v2_document(VERSION, protobuf);
            return ([(header::CONTENT_TYPE, content_type)], bytes).into_response();
        }
        return discovery_response(&st.api, &segs);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let body = if !body.is_empty() && content_type.contains("protobuf") {
        // Secrets and ConfigMaps (Helm's release storage) are read in protobuf too; other
        // kinds only in JSON, as from a server without their protobuf codec.
        match super::protobuf::decode(&body) {
            Ok(obj) => Bytes::from(obj.to_string()),
            Err(why) => {
                return error(&ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json, application/merge-patch+json, application/json-patch+json (got {content_type}: {why})"
                    ),
                ));
            }
        }
    } else {
        body
    };
    let Some(t) = parse_target(&st.api, &segs) else {
        return error(&ApiError::no_route());
    };
    let Some(def) = st.api.resource(&t.group, &t.version, &t.plural) else {
        return error(&ApiError::no_route());
    };
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&method, t.name.is_empty()) {
        (&Method::GET, true) if watch => "watch",
        (&Method::GET, true) => "list",
        (&Method::GET, false) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "deletecollection",
        (&Method::DELETE, false) => "delete",
        _ => {
            return error(&ApiError::new(
                405,
                "MethodNotAllowed",
                format!("method {method} is not allowed"),
            ));
        }
    };
    let attrs = Attributes {
        verb: verb.into(),
        group: t.group.clone(),
        resource: t.plural.clone(),
        subresource: t.subresource.clone(),
        namespace: t.namespace.clone(),
        name: t.name.clone(),
        path: None,
    };
    let (allowed, _) = auth::authorize(&st.api, &user, &attrs);
    if !allowed {
        let res = if t.subresource.is_empty() {
            t.plural.clone()
        } else {
            format!("{}/{}", t.plural, t.subresource)
        };
        let mut msg = format!(
            "{res}{} is forbidden: User \"{}\" cannot {verb} resource \"{res}\" in API group \"{}\"",
            if t.name.is_empty() {
                String::new()
            } else {
                format!(" \"{}\"", t.name)
            },
            user.name,
            t.group
        );
        if !t.namespace.is_empty() {
            msg.push_str(&format!(" in the namespace \"{}\"", t.namespace));
        } else {
            msg.push_str(" at the cluster scope");
        }
        st.denied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(format!(
                "{} {verb} {res} {}/{}",
                user.name, t.namespace, t.name
            ));
        return error(&ApiError::new(403, "Forbidden", msg));
    }
    if def.namespaced && t.namespace.is_empty() && !t.name.is_empty() {
        return error(&ApiError::no_route());
    }
    let table = wants_table(&headers);
    let warnings = match field_validation(&def, verb, &query, &headers, &body) {
        Ok(w) => w,
        Err(e) => return error(&e),
    };
    let mut body = body;
    if matches!(verb, "create" | "update" | "patch" | "delete")
        && admission::any_configured(&st.api)
    {
        match admit(&st, &def, &t, &user, verb, &headers, &body).await {
            Ok(Admitted::Unchanged) => {}
            Ok(Admitted::Body(b)) => body = b,
            Ok(Admitted::Replace(obj)) => {
                return match st.api.replace(
                    &def,
                    &t.namespace,
                    &t.name,
                    obj,
                    t.subresource == "status",
                ) {
                    Ok(o) => json_response(200, &o),
                    Err(e) => error(&e),
                };
            }
            Err(e) => return error(&e),
        }
    }
    let result = match verb {
        "watch" => return watch_response(&st, &def, &t, &query, table),
        "list" => list(&st.api, &def, &t, &query).map(|(items, rv)| {
            if table {
                (200, table::table(&def, &items, rv))
            } else {
                (
                    200,
                    json!({"kind": format!("{}List", def.kind), "apiVersion": def.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
                )
            }
        }),
        "get" if t.is_pod_log(&def) => return pod_log(&st, &def, &t, &uri).await,
        "get" if t.subresource.is_empty() || t.subresource == "status" => {
            st.api.get(&def, &t.namespace, &t.name).map(|o| {
                if table {
                    (
                        200,
                        table::table(&def, std::slice::from_ref(&o), st.api.store.rv()),
                    )
                } else {
                    (200, o)
                }
            })
        }
        "create" => create(&st, &def, &t, &user, &body).await,
        "update" => parse_body(&body).and_then(|obj| {
            subresource_ok(&def, &t, &["status"])?;
            st.api
                .replace(&def, &t.namespace, &t.name, obj, t.subresource == "status")
                .map(|o| (200, o))
        }),
        "patch" => patch(&st.api, &def, &t, &headers, &body),
        "delete" => {
            let opts = delete_options(&query);
            parse_body(&body).and_then(|b| {
                st.api
                    .delete(&def, &t.namespace, &t.name, &opts.merge_body(&b))
                    .map(|o| (200, o))
            })
        }
        "deletecollection" => list(&st.api, &def, &t, &query).map(|(items, rv)| {
            let opts = delete_options(&query);
            let deleted: Vec<Value> = items
                .iter()
                .filter_map(|o| {
                    let ns = o["metadata"]["namespace"].as_str().unwrap_or_default();
                    let name = o["metadata"]["name"].as_str().unwrap_or_default();
                    st.api.delete(&def, ns, name, &opts).ok()
                })
                .collect();
            (
                200,
                json!({"kind": format!("{}List", def.kind), "apiVersion": def.api_version(),
                "metadata": {"resourceVersion": rv.to_string()}, "items": deleted}),
            )
        }),
        _ => Err(ApiError::no_route()),
    };
    let mut response = match result {
        Ok((code, mut v)) => {
            if matches!(verb, "get" | "list") && !table {
                default_on_read(&def, &mut v);
            }
            json_response(code, &v)
        }
        Err(e) => error(&e),
    };
    for w in warnings {
        if let Ok(value) = header::HeaderValue::from_str(&format!("299 - {w:?}")) {
            response.headers_mut().append("warning", value);
        }
    }
    response
}

/// What admission made of a write.
enum Admitted {
    /// Go on with the request as sent.
    Unchanged,
    /// Go on with this body (mutated).
    Body(Bytes),
    /// A patch whose result was mutated: store this object (precondition: the version the
    /// patch was applied to).
    Replace(Value),
}

/// Runs the admission webhooks on a write: builds the object as it would be stored (a
/// patch applied to the current object), and the old object.
async fn admit(
    st: &ServerState,
    def: &ResourceDef,
    t: &Target,
    user: &User,
    verb: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<Admitted> {
    let current = || st.api.get(def, &t.namespace, &t.name);
    let (operation, object, old, parent) = match verb {
        "create" if t.subresource.is_empty() => {
            let mut obj = parse_body(body)?;
            if def.namespaced && obj.is_object() {
                obj["metadata"]["namespace"] = json!(t.namespace);
            }
            (Operation::Create, Some(obj), None, None)
        }
        "create" => {
            let parent = current().ok();
            (Operation::Create, Some(parse_body(body)?), None, parent)
        }
        "update" => (
            Operation::Update,
            Some(parse_body(body)?),
            Some(current()?),
            None,
        ),
        "patch" => {
            let kind = match headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
            {
                "application/json-patch+json" => PatchType::Json,
                "application/strategic-merge-patch+json" => PatchType::Strategic,
                "application/apply-patch+yaml" | "application/apply-patch+json" => PatchType::Apply,
                _ => PatchType::Merge,
            };
            // Server-side apply creates what does not exist yet: admitted as a create.
            let old = match current() {
                Err(e) if e.code == 404 && kind == PatchType::Apply => None,
                other => Some(other?),
            };
            let mut new = old.clone().unwrap_or_else(|| {
                json!({"apiVersion": def.api_version(), "kind": def.kind,
                    "metadata": {"name": t.name, "namespace": t.namespace}})
            });
            super::api::apply_patch(&mut new, kind, &parse_body(body)?)?;
            let operation = if old.is_some() {
                Operation::Update
            } else {
                Operation::Create
            };
            (operation, Some(new), old, None)
        }
        _ => (Operation::Delete, None, current().ok(), None),
    };
    let name = object
        .as_ref()
        .and_then(|o| o["metadata"]["name"].as_str())
        .unwrap_or(&t.name)
        .to_owned();
    let request = admission::Request {
        def,
        subresource: &t.subresource,
        namespace: &t.namespace,
        name: &name,
        operation,
        user,
        object: object.clone(),
        old_object: old.clone(),
        parent,
    };
    let admitted = admission::admit(&st.api, request).await?;
    Ok(match admitted {
        Some(o) if Some(&o) != object.as_ref() => {
            if verb == "patch" && old.is_some() {
                let mut o = o;
                o["metadata"]["resourceVersion"] = old
                    .map(|x| x["metadata"]["resourceVersion"].clone())
                    .unwrap_or_default();
                Admitted::Replace(o)
            } else {
                Admitted::Body(Bytes::from(o.to_string()))
            }
        }
        _ => Admitted::Unchanged,
    })
}

/// `fieldValidation` of a write to a custom resource: unknown fields in the body are
/// rejected (`Strict`, as kubectl sends it), reported as warnings (`Warn`, the default) or
/// dropped silently (`Ignore`); storage prunes them in every case.
fn field_validation(
    def: &ResourceDef,
    verb: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<Vec<String>> {
    let Some(schema) = &def.schema else {
        return Ok(vec![]);
    };
    let json_patch = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json-patch+json"));
    if !matches!(verb, "create" | "update" | "patch") || json_patch || body.is_empty() {
        return Ok(vec![]);
    }
    let Ok(obj) = serde_json::from_slice::<Value>(body) else {
        return Ok(vec![]);
    };
    let unknown: Vec<String> = super::schema::unknown_fields(schema, &obj)
        .into_iter()
        .map(|f| format!("unknown field {f:?}"))
        .collect();
    match query.get("fieldValidation").map(String::as_str) {
        Some("Strict") if !unknown.is_empty() => Err(ApiError::bad_request(format!(
            "{kind} in version {v:?} cannot be handled as a {kind}: strict decoding error: {}",
            unknown.join(", "),
            kind = def.kind,
            v = def.version
        ))),
        Some("Ignore") => Ok(vec![]),
        _ => Ok(unknown),
    }
}

/// Defaults of the schema on what is read, as the apiserver applies them when decoding
/// from storage (objects written before a default was added get it too).
fn default_on_read(def: &ResourceDef, v: &mut Value) {
    let Some(schema) = &def.schema else {
        return;
    };
    if v["kind"].as_str().is_some_and(|k| k.ends_with("List")) {
        for item in v["items"].as_array_mut().into_iter().flatten() {
            super::schema::apply_defaults(schema, item);
        }
    } else {
        super::schema::apply_defaults(schema, v);
    }
}

fn subresource_ok(def: &ResourceDef, t: &Target, allowed: &[&str]) -> ApiResult<()> {
    if t.subresource.is_empty()
        || (allowed.contains(&t.subresource.as_str()) && (t.subresource != "status" || def.status))
    {
        Ok(())
    } else {
        Err(ApiError::new(
            404,
            "NotFound",
            format!("{}/{} is not served", def.plural, t.subresource),
        ))
    }
}

fn delete_options(query: &HashMap<String, String>) -> DeleteOptions {
    DeleteOptions {
        grace_period: query.get("gracePeriodSeconds").and_then(|g| g.parse().ok()),
        propagation: query.get("propagationPolicy").cloned(),
        ..Default::default()
    }
}

fn selectors(query: &HashMap<String, String>) -> ApiResult<(LabelSelector, FieldSelector)> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

fn list(
    api: &Api,
    def: &ResourceDef,
    t: &Target,
    query: &HashMap<String, String>,
) -> ApiResult<(Vec<Value>, u64)> {
    let (labels, fields) = selectors(query)?;
    let ns = (def.namespaced && !t.namespace.is_empty()).then_some(t.namespace.as_str());
    let (items, rv) = api.store.list(&def.key(), ns);
    Ok((
        items
            .into_iter()
            .filter(|o| labels.matches(o) && fields.matches(o))
            .collect(),
        rv,
    ))
}

fn patch(
    api: &Api,
    def: &ResourceDef,
    t: &Target,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<(u16, Value)> {
    subresource_ok(def, t, &["status"])?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let kind = match ct.split(';').next().unwrap_or_default().trim() {
        "application/merge-patch+json" => PatchType::Merge,
        "application/json-patch+json" => PatchType::Json,
        "application/strategic-merge-patch+json" if def.custom => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
            ));
        }
        "application/strategic-merge-patch+json" => PatchType::Strategic,
        "application/apply-patch+yaml" | "application/apply-patch+json" => PatchType::Apply,
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format ({other:?}) - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
                ),
            ));
        }
    };
    let body: Value = serde_json::from_slice(body).map_err(|e| {
        if kind == PatchType::Apply {
            ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("server-side apply bodies must be JSON here: {e}"),
            )
        } else {
            ApiError::bad_request(format!("the patch is not valid JSON: {e}"))
        }
    })?;
    let created = kind == PatchType::Apply && api.get(def, &t.namespace, &t.name).is_err();
    api.patch(
        def,
        &t.namespace,
        &t.name,
        kind,
        &body,
        t.subresource == "status",
    )
    .map(|o| (if created { 201 } else { 200 }, o))
}

async fn create(
    st: &ServerState,
    def: &ResourceDef,
    t: &Target,
    user: &User,
    body: &Bytes,
) -> ApiResult<(u16, Value)> {
    let obj = parse_body(body)?;
    let api = &st.api;
    match (def.plural.as_str(), t.subresource.as_str()) {
        ("tokenreviews", _) => {
            let token = obj["spec"]["token"].as_str().unwrap_or_default();
            let status = match st.tokens.authenticate(token) {
                Some(u) => {
                    json!({"authenticated": true, "user": {"username": u.name, "uid": u.uid, "groups": u.groups, "extra": u.extra}, "audiences": obj["spec"]["audiences"]})
                }
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            return Ok((
                201,
                json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {}, "spec": obj["spec"], "status": status}),
            ));
        }
        ("selfsubjectreviews", _) => {
            // `kubectl auth whoami`: who the request's credentials are.
            return Ok((
                201,
                json!({"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {},
                    "status": {"userInfo": {"username": user.name, "uid": user.uid, "groups": user.groups, "extra": user.extra}}}),
            ));
        }
        ("subjectaccessreviews" | "selfsubjectaccessreviews", _) => {
            let spec = &obj["spec"];
            let subject = if def.plural == "selfsubjectaccessreviews" {
                user.clone()
            } else {
                let groups = spec["groups"]
                    .as_array()
                    .map(|g| {
                        g.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                User {
                    name: spec["user"].as_str().unwrap_or_default().to_owned(),
                    uid: spec["uid"].as_str().unwrap_or_default().to_owned(),
                    groups,
                    ..Default::default()
                }
            };
            let r = &spec["resourceAttributes"];
            let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            let attrs = if r.is_object() {
                Attributes {
                    verb: s(&r["verb"]),
                    group: s(&r["group"]),
                    resource: s(&r["resource"]),
                    subresource: s(&r["subresource"]),
                    namespace: s(&r["namespace"]),
                    name: s(&r["name"]),
                    path: None,
                }
            } else {
                let n = &spec["nonResourceAttributes"];
                Attributes {
                    verb: s(&n["verb"]),
                    path: Some(s(&n["path"])),
                    ..Default::default()
                }
            };
            let (allowed, reason) = auth::authorize(api, &subject, &attrs);
            return Ok((
                201,
                json!({"kind": def.kind, "apiVersion": "authorization.k8s.io/v1", "metadata": {}, "spec": spec,
                "status": {"allowed": allowed, "reason": reason}}),
            ));
        }
        ("pods", "eviction") => {
            let opts = DeleteOptions::default().merge_body(&obj["deleteOptions"]);
            api.delete(def, &t.namespace, &t.name, &opts)?;
            return Ok((
                201,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ));
        }
        ("pods", "binding") => {
            let node = obj["target"]["name"].as_str().unwrap_or_default();
            api.bind(def, &t.namespace, &t.name, node)?;
            return Ok((
                201,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ));
        }
        ("serviceaccounts", "token") => {
            let sa = api.get(def, &t.namespace, &t.name)?;
            let mut u = User::service_account(
                &t.namespace,
                &t.name,
                sa["metadata"]["uid"].as_str().unwrap_or_default(),
            );
            // A token bound to a Pod names the Pod and its node in the user's extra info
            // (upstream 1.30+, ServiceAccountTokenPodNodeInfo).
            let bound = &obj["spec"]["boundObjectRef"];
            if bound["kind"] == "Pod"
                && let Some(pods) = api.resource("", "v1", "pods")
                && let Ok(pod) = api.get(
                    &pods,
                    &t.namespace,
                    bound["name"].as_str().unwrap_or_default(),
                )
            {
                let s = |v: &Value| vec![v.as_str().unwrap_or_default().to_owned()];
                u.extra.insert(
                    "authentication.kubernetes.io/pod-name".into(),
                    s(&pod["metadata"]["name"]),
                );
                u.extra.insert(
                    "authentication.kubernetes.io/pod-uid".into(),
                    s(&pod["metadata"]["uid"]),
                );
                if pod["spec"]["nodeName"].is_string() {
                    u.extra.insert(
                        podmig_api::EXTRA_NODE_NAME.into(),
                        s(&pod["spec"]["nodeName"]),
                    );
                }
            }
            let token = st.tokens.issue(u);
            let exp = crate::clock::from_now(3600);
            return Ok((
                201,
                json!({"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1", "metadata": {"name": t.name, "namespace": t.namespace},
                "spec": obj["spec"], "status": {"token": token, "expirationTimestamp": exp}}),
            ));
        }
        (_, "") if t.name.is_empty() => {}
        _ => {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "POST is not supported here",
            ));
        }
    }
    api.create(def, &t.namespace, obj).map(|o| (201, o))
}

fn discovery_response(api: &Api, segs: &[&str]) -> Response {
    let resources = api.resources();
    let groups = || {
        let mut seen: Vec<(String, Vec<String>)> = Vec::new();
        for r in resources.iter().filter(|r| !r.group.is_empty()) {
            match seen.iter_mut().find(|(g, _)| *g == r.group) {
                Some((_, vs)) if !vs.contains(&r.version) => vs.push(r.version.clone()),
                Some(_) => {}
                None => seen.push((r.group.clone(), vec![r.version.clone()])),
            }
        }
        seen
    };
    let group_json = |g: &str, vs: &[String]| {
        let versions: Vec<Value> = vs
            .iter()
            .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
            .collect();
        json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
    };
    let resource_list = |g: &str, v: &str| {
        let list: Vec<Value> = resources
            .iter()
            .filter(|r| r.group == g && r.version == v)
            .flat_map(ResourceDef::discovery)
            .collect();
        let gv = if g.is_empty() {
            v.to_owned()
        } else {
            format!("{g}/{v}")
        };
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list})
    };
    let (code, body) = match segs {
        ["api"] => (
            200,
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
        ),
        ["apis"] => (
            200,
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups().iter().map(|(g, vs)| group_json(g, vs)).collect::<Vec<_>>()}),
        ),
        ["api", "v1"] => (200, resource_list("", "v1")),
        ["apis", g] => match groups().into_iter().find(|(x, _)| x == g) {
            Some((g, vs)) => {
                let mut j = group_json(&g, &vs);
                j["kind"] = json!("APIGroup");
                j["apiVersion"] = json!("v1");
                (200, j)
            }
            None => (404, ApiError::no_route().status()),
        },
        ["apis", g, v] if resources.iter().any(|r| r.group == *g && r.version == *v) => {
            (200, resource_list(g, v))
        }
        ["openapi", "v3"] => {
            let mut paths = serde_json::Map::new();
            let mut gvs: Vec<(String, String)> = resources
                .iter()
                .map(|r| (r.group.clone(), r.version.clone()))
                .collect();
            gvs.sort();
            gvs.dedup();
            for (g, v) in gvs {
                let key = if g.is_empty() {
                    format!("api/{v}")
                } else {
                    format!("apis/{g}/{v}")
                };
                paths.insert(
                    key.clone(),
                    json!({"serverRelativeURL": format!("/openapi/v3/{key}")}),
                );
            }
            (200, json!({"paths": paths}))
        }
        ["openapi", "v3", "api", v] => (200, super::openapi::document(&resources, "", v, VERSION)),
        ["openapi", "v3", "apis", g, v] => {
            (200, super::openapi::document(&resources, g, v, VERSION))
        }
        _ => (404, ApiError::no_route().status()),
    };
    json_response(code, &body)
}

fn watch_event(kind: &str, obj: &Value, def: &ResourceDef, table: bool, rv: u64) -> String {
    let object = if table && kind != "BOOKMARK" && kind != "ERROR" {
        table::table(def, std::slice::from_ref(obj), rv)
    } else {
        obj.clone()
    };
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    line
}

fn watch_response(
    st: &Arc<ServerState>,
    def: &ResourceDef,
    t: &Target,
    query: &HashMap<String, String>,
    table: bool,
) -> Response {
    let (labels, fields) = match selectors(query) {
        Ok(s) => s,
        Err(e) => return error(&e),
    };
    let ns = (def.namespaced && !t.namespace.is_empty()).then(|| t.namespace.clone());
    let in_scope = move |o: &Value| {
        ns.as_deref()
            .is_none_or(|n| o["metadata"]["namespace"].as_str() == Some(n))
            && labels.matches(o)
            && fields.matches(o)
    };
    // WatchList (client-go's default since 1.35): the current objects as ADDED events,
    // then a bookmark marking their end, then changes.
    let send_initial = matches!(
        query.get("sendInitialEvents").map(String::as_str),
        Some("true" | "1")
    );
    let since = query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0" && !send_initial)
        .map(|v| v.parse::<u64>());
    let bookmarks = matches!(
        query.get("allowWatchBookmarks").map(String::as_str),
        Some("true" | "1")
    );
    let timeout = Duration::from_secs(
        query
            .get("timeoutSeconds")
            .and_then(|s| s.parse().ok())
            .unwrap_or(1800),
    );
    let (tx, rx) = mpsc::channel::<Result<String, std::io::Error>>(256);
    let (initial, start_rv, mut events) = match since {
        Some(Err(_)) => return error(&ApiError::bad_request("resourceVersion must be an integer")),
        Some(Ok(rv)) => match st.api.store.watch(rv) {
            Ok((past, events)) => {
                let past: Vec<String> = past
                    .iter()
                    .filter(|e| e.resource == def.key())
                    .filter_map(|e| {
                        transition(e.kind, &e.object, e.old.as_ref(), &in_scope)
                            .map(|k| watch_event(k, &e.object, def, table, e.rv))
                    })
                    .collect();
                (past, rv.max(1), events)
            }
            Err(oldest) => {
                let status = ApiError::new(
                    410,
                    "Expired",
                    format!("too old resource version: {rv} ({oldest})"),
                )
                .status();
                let line = watch_event("ERROR", &status, def, false, 0);
                return (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    line,
                )
                    .into_response();
            }
        },
        None => {
            let (items, rv, events) = st.api.store.snapshot_watch(&def.key());
            let mut added: Vec<String> = items
                .iter()
                .filter(|o| in_scope(o))
                .map(|o| watch_event("ADDED", o, def, table, rv))
                .collect();
            if send_initial {
                let end = json!({"kind": def.kind, "apiVersion": def.api_version(),
                    "metadata": {"resourceVersion": rv.to_string(),
                        "annotations": {"k8s.io/initial-events-end": "true"}}});
                added.push(watch_event("BOOKMARK", &end, def, false, rv));
            }
            (added, rv, events)
        }
    };
    let def = def.clone();
    let interval = st.bookmark_interval;
    let mut last_rv = start_rv;
    tokio::spawn(async move {
        for line in initial {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = ticker.tick(), if bookmarks => {
                    let mark = json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": {"resourceVersion": last_rv.to_string()}});
                    if tx.send(Ok(watch_event("BOOKMARK", &mark, &def, false, last_rv))).await.is_err() { return; }
                }
                ev = events.recv() => {
                    let ev = match ev {
                        Ok(ev) => ev,
                        // A watcher that fell behind is closed; clients re-list.
                        Err(_) => return,
                    };
                    if ev.rv <= start_rv || ev.resource != def.key() { continue; }
                    last_rv = ev.rv;
                    if let Some(kind) = transition(ev.kind, &ev.object, ev.old.as_ref(), &in_scope)
                        && tx.send(Ok(watch_event(kind, &ev.object, &def, table, ev.rv))).await.is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The event a filtered watch sees: objects entering the selection are ADDED, leaving it DELETED.
fn transition(
    kind: EventType,
    new: &Value,
    old: Option<&Value>,
    in_scope: &impl Fn(&Value) -> bool,
) -> Option<&'static str> {
    let now = in_scope(new);
    let before = old.is_some_and(in_scope);
    match kind {
        EventType::Added if now => Some("ADDED"),
        EventType::Deleted if now => Some("DELETED"),
        EventType::Modified if now && before => Some("MODIFIED"),
        EventType::Modified if now => Some("ADDED"),
        EventType::Modified if before => Some("DELETED"),
        _ => None,
    }
}
