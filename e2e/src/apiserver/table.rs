//! Server-side printing (`meta.k8s.io/v1 Table`), which `kubectl get` asks for.

use serde_json::{Value, json};

use super::{resources::ResourceDef, selectors::field};

/// A duration in kubectl's short form (`45s`, `3m12s`, `5h`, `2d`).
pub fn age(created: &str) -> String {
    let Some(s) = crate::clock::seconds_since(created) else {
        return "<unknown>".into();
    };
    let s = s.max(0);
    match s {
        0..120 => format!("{s}s"),
        120..600 => format!("{}m{}s", s / 60, s % 60),
        600..10_800 => format!("{}m", s / 60),
        10_800..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn col(name: &str, type_: &str, priority: i64) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": type_, "format": format, "description": "", "priority": priority})
}

fn pod_cells(p: &Value) -> Vec<Value> {
    let statuses = p["status"]["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let total = p["spec"]["containers"].as_array().map_or(0, Vec::len);
    let ready = statuses
        .iter()
        .filter(|s| s["ready"].as_bool() == Some(true))
        .count();
    let restarts: i64 = statuses
        .iter()
        .map(|s| s["restartCount"].as_i64().unwrap_or(0))
        .sum();
    let mut status = p["status"]["phase"]
        .as_str()
        .unwrap_or("Pending")
        .to_owned();
    for s in &statuses {
        if let Some(r) = s["state"]["waiting"]["reason"]
            .as_str()
            .or(s["state"]["terminated"]["reason"].as_str())
        {
            status = r.to_owned();
        }
    }
    if !p["metadata"]["deletionTimestamp"].is_null() {
        status = "Terminating".into();
    }
    let or_none = |v: &Value| json!(v.as_str().unwrap_or("<none>"));
    vec![
        json!(p["metadata"]["name"]),
        json!(format!("{ready}/{total}")),
        json!(status),
        json!(restarts),
        json!(age(p["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap_or_default())),
        or_none(&p["status"]["podIP"]),
        or_none(&p["spec"]["nodeName"]),
        json!("<none>"),
        json!("<none>"),
    ]
}

fn node_cells(n: &Value) -> Vec<Value> {
    let ready = n["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .map(|c| {
            if c["status"] == "True" {
                "Ready"
            } else {
                "NotReady"
            }
        })
        .unwrap_or("Unknown");
    let mut status = ready.to_owned();
    if n["spec"]["unschedulable"].as_bool() == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    vec![
        json!(n["metadata"]["name"]),
        json!(status),
        json!("<none>"),
        json!(age(n["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap_or_default())),
        json!(
            n["status"]["nodeInfo"]["kubeletVersion"]
                .as_str()
                .unwrap_or("")
        ),
        json!(node_address(n, "InternalIP")),
        json!(node_address(n, "ExternalIP")),
        json!(node_info(n, "osImage")),
        json!(node_info(n, "kernelVersion")),
        json!(node_info(n, "containerRuntimeVersion")),
    ]
}

/// A Node's address of `kind`, `<none>` when it has none (as kubectl prints it).
fn node_address(n: &Value, kind: &str) -> String {
    n["status"]["addresses"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["type"] == kind))
        .and_then(|a| a["address"].as_str())
        .unwrap_or("<none>")
        .to_owned()
}

/// A field of a Node's `status.nodeInfo`, `<unknown>` when empty.
fn node_info(n: &Value, field: &str) -> String {
    match n["status"]["nodeInfo"][field].as_str() {
        Some(v) if !v.is_empty() => v.to_owned(),
        _ => "<unknown>".to_owned(),
    }
}

fn event_cells(e: &Value) -> Vec<Value> {
    let last = e["lastTimestamp"]
        .as_str()
        .or(e["eventTime"].as_str())
        .or(e["metadata"]["creationTimestamp"].as_str())
        .unwrap_or_default();
    let o = &e["involvedObject"];
    vec![
        json!(age(last)),
        json!(e["type"]),
        json!(e["reason"]),
        json!(format!(
            "{}/{}",
            o["kind"].as_str().unwrap_or_default().to_lowercase(),
            o["name"].as_str().unwrap_or_default()
        )),
        json!(e["message"]),
    ]
}

/// Columns a real API server prints for the built-in kinds podmig's users list besides
/// Pods, Nodes and Events: (group, plural) → (column, JSON path).
type BuiltinColumns = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

const BUILTIN_COLUMNS: &[BuiltinColumns] = &[
    ("node.k8s.io", "runtimeclasses", &[("Handler", ".handler")]),
    (
        "coordination.k8s.io",
        "leases",
        &[("Holder", ".spec.holderIdentity")],
    ),
    (
        "apps",
        "deployments",
        &[
            ("Ready", ".status.readyReplicas"),
            ("Up-to-date", ".status.updatedReplicas"),
            ("Available", ".status.availableReplicas"),
        ],
    ),
    (
        "apps",
        "daemonsets",
        &[
            ("Desired", ".status.desiredNumberScheduled"),
            ("Current", ".status.currentNumberScheduled"),
            ("Ready", ".status.numberReady"),
        ],
    ),
    (
        "apps",
        "replicasets",
        &[
            ("Desired", ".spec.replicas"),
            ("Current", ".status.replicas"),
            ("Ready", ".status.readyReplicas"),
        ],
    ),
    (
        "",
        "services",
        &[("Type", ".spec.type"), ("Cluster-IP", ".spec.clusterIP")],
    ),
    ("", "serviceaccounts", &[]),
    ("", "configmaps", &[]),
    (
        "",
        "persistentvolumes",
        &[
            ("Capacity", ".spec.capacity.storage"),
            ("Status", ".status.phase"),
            ("Claim", ".spec.claimRef.name"),
        ],
    ),
    (
        "",
        "persistentvolumeclaims",
        &[("Status", ".status.phase"), ("Volume", ".spec.volumeName")],
    ),
];

/// `kubectl get services` as upstream prints it: `80/TCP`, `80:30001/TCP` with a NodePort.
fn service_cells(o: &Value) -> Vec<Value> {
    let spec = &o["spec"];
    let ports: Vec<String> = spec["ports"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let proto = p["protocol"].as_str().unwrap_or("TCP");
                    match p["nodePort"].as_u64() {
                        Some(np) => format!("{}:{np}/{proto}", p["port"]),
                        None => format!("{}/{proto}", p["port"]),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let selector: Vec<String> = spec["selector"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let or_none = |s: String| if s.is_empty() { "<none>".to_owned() } else { s };
    vec![
        json!(o["metadata"]["name"]),
        json!(spec["type"].as_str().unwrap_or("ClusterIP")),
        json!(or_none(
            spec["clusterIP"].as_str().unwrap_or_default().to_owned()
        )),
        json!("<none>"),
        json!(or_none(ports.join(","))),
        json!(age(o["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap_or_default())),
        json!(or_none(selector.join(","))),
    ]
}

/// `kubectl get endpointslices` as upstream prints it: ports joined, the first three
/// addresses and `+ N more...`.
fn endpoint_slice_cells(o: &Value) -> Vec<Value> {
    let ports: Vec<String> = o["ports"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(|p| p["port"].as_u64().map(|n| n.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let addresses: Vec<String> = o["endpoints"]
        .as_array()
        .map(|e| {
            e.iter()
                .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut shown = addresses
        .iter()
        .take(3)
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    if addresses.len() > 3 {
        shown.push_str(&format!(" + {} more...", addresses.len() - 3));
    }
    let or_none = |s: String| {
        if s.is_empty() {
            "<unset>".to_owned()
        } else {
            s
        }
    };
    vec![
        json!(o["metadata"]["name"]),
        json!(o["addressType"]),
        json!(or_none(ports.join(","))),
        json!(or_none(shown)),
        json!(age(o["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap_or_default())),
    ]
}

/// Renders one object into the cells of its row.
type Cells = Box<dyn Fn(&Value) -> Vec<Value>>;

/// Column definitions and a function from object to cells for a resource.
fn layout(def: &ResourceDef) -> (Vec<Value>, Cells) {
    if def.is_pod() {
        let cols = vec![
            col("Name", "string", 0),
            col("Ready", "string", 0),
            col("Status", "string", 0),
            col("Restarts", "string", 0),
            col("Age", "string", 0),
            col("IP", "string", 1),
            col("Node", "string", 1),
            col("Nominated Node", "string", 1),
            col("Readiness Gates", "string", 1),
        ];
        return (cols, Box::new(pod_cells));
    }
    if def.group.is_empty() && def.plural == "nodes" {
        let cols = vec![
            col("Name", "string", 0),
            col("Status", "string", 0),
            col("Roles", "string", 0),
            col("Age", "string", 0),
            col("Version", "string", 0),
            col("Internal-IP", "string", 1),
            col("External-IP", "string", 1),
            col("OS-Image", "string", 1),
            col("Kernel-Version", "string", 1),
            col("Container-Runtime", "string", 1),
        ];
        return (cols, Box::new(node_cells));
    }
    if def.group.is_empty() && def.plural == "services" {
        let cols = vec![
            col("Name", "string", 0),
            col("Type", "string", 0),
            col("Cluster-IP", "string", 0),
            col("External-IP", "string", 0),
            col("Port(s)", "string", 0),
            col("Age", "string", 0),
            col("Selector", "string", 1),
        ];
        return (cols, Box::new(service_cells));
    }
    if def.group == "discovery.k8s.io" && def.plural == "endpointslices" {
        let cols = vec![
            col("Name", "string", 0),
            col("AddressType", "string", 0),
            col("Ports", "string", 0),
            col("Endpoints", "string", 0),
            col("Age", "string", 0),
        ];
        return (cols, Box::new(endpoint_slice_cells));
    }
    if def.group.is_empty() && def.plural == "events" {
        let cols = vec![
            col("Last Seen", "string", 0),
            col("Type", "string", 0),
            col("Reason", "string", 0),
            col("Object", "string", 0),
            col("Message", "string", 0),
        ];
        return (cols, Box::new(event_cells));
    }
    if let Some((_, _, extra)) = BUILTIN_COLUMNS
        .iter()
        .find(|(g, p, _)| *g == def.group && *p == def.plural)
        .filter(|(_, _, extra)| !extra.is_empty())
    {
        let extra: Vec<(String, String)> = extra
            .iter()
            .map(|(n, p)| ((*n).to_owned(), (*p).to_owned()))
            .collect();
        let mut cols = vec![col("Name", "string", 0)];
        cols.extend(extra.iter().map(|(n, _)| col(n, "string", 0)));
        cols.push(col("Age", "string", 0));
        return (
            cols,
            Box::new(move |o: &Value| {
                let mut cells = vec![json!(o["metadata"]["name"])];
                for (_, path) in &extra {
                    let v = field(o, path);
                    cells.push(json!(if v.is_empty() { "<none>".to_owned() } else { v }));
                }
                cells.push(json!(age(o["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or_default())));
                cells
            }),
        );
    }
    if !def.columns.is_empty() {
        let columns = def.columns.clone();
        let mut cols = vec![col("Name", "string", 0)];
        cols.extend(columns.iter().map(|c| col(&c.name, &c.type_, c.priority)));
        return (
            cols,
            Box::new(move |o: &Value| {
                let mut cells = vec![json!(o["metadata"]["name"])];
                for c in &columns {
                    let v = field(o, &c.json_path);
                    cells.push(if c.type_ == "date" && !v.is_empty() {
                        json!(age(&v))
                    } else {
                        json!(v)
                    });
                }
                cells
            }),
        );
    }
    let cols = vec![col("Name", "string", 0), col("Age", "string", 0)];
    (
        cols,
        Box::new(|o: &Value| {
            vec![
                json!(o["metadata"]["name"]),
                json!(age(o["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or_default())),
            ]
        }),
    )
}

/// A Table of `items`.
pub fn table(def: &ResourceDef, items: &[Value], rv: u64) -> Value {
    let (cols, cells) = layout(def);
    let rows: Vec<Value> = items
        .iter()
        .map(|o| json!({"cells": cells(o), "object": o}))
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()},
           "columnDefinitions": cols, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtimeclasses_and_leases_print_like_a_real_api_server() {
        let def = |group: &str, plural: &str| ResourceDef {
            group: group.into(),
            plural: plural.into(),
            ..ResourceDef::default()
        };
        let rc = json!({"metadata": {"name": "podmig", "creationTimestamp": "2026-01-01T00:00:00Z"}, "handler": "podmig"});
        let t = table(&def("node.k8s.io", "runtimeclasses"), &[rc], 1);
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .expect("cols")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(names, ["Name", "Handler", "Age"]);
        assert_eq!(t["rows"][0]["cells"][1], "podmig");
        let ev = json!({"type": "Normal", "reason": "MigrationSucceeded", "message": "moved",
            "involvedObject": {"kind": "Migration", "name": "m"}, "lastTimestamp": "2026-01-01T00:00:00Z"});
        let t = table(&def("", "events"), &[ev], 1);
        assert_eq!(t["rows"][0]["cells"][3], "migration/m");
        let lease = json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}});
        let t = table(&def("coordination.k8s.io", "leases"), &[lease], 1);
        assert_eq!(t["rows"][0]["cells"][1], "a");
        // `kubectl get nodes -o wide`: addresses, OS, kernel and the container runtime.
        let node = json!({"metadata": {"name": "node-1"}, "status": {
            "addresses": [{"type": "InternalIP", "address": "10.1.0.11"}],
            "nodeInfo": {"kubeletVersion": "v1.32.0", "osImage": "Debian GNU/Linux 12",
                         "kernelVersion": "", "containerRuntimeVersion": "containerd://2.1.9"}}});
        let t = table(&def("", "nodes"), &[node], 1);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[5], "10.1.0.11");
        assert_eq!(cells[6], "<none>");
        assert_eq!(cells[8], "<unknown>");
        assert_eq!(cells[9], "containerd://2.1.9");
        let wide = t["columnDefinitions"]
            .as_array()
            .expect("cols")
            .iter()
            .filter(|c| c["priority"] == 1)
            .count();
        assert_eq!(wide, 5);
    }
}
