//! `podmig extender`: a kube-scheduler HTTP extender (the `extenders:` of a
//! `KubeSchedulerConfiguration`; JSON as `k8s.io/kube-scheduler/extender/v1`). On
//! `preempt` it keeps a scheduler from killing Pods it can move: of the candidate nodes it
//! picks the one whose victims it can best move away, asks the victims' node daemons to move
//! them (`POST /migrate/{uid}`, authenticated like any caller with `create pods/migrate`)
//! to nodes where they fit, and answers with only the victims it could not move — the
//! preemptor gets its room once the moves end, the victims keep running. On `prioritize` it
//! scores nodes marked for draining (`podmig.dev/draining` label) 0, others 10; `filter`
//! lets every node through.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, Client, ResourceExt, api::ListParams};
use serde::{Deserialize, Serialize};

use crate::node::peer::PeerClient;

/// A node label marking nodes about to be drained: `prioritize` steers Pods away.
pub const LABEL_DRAINING: &str = "podmig.dev/draining";

/// `ExtenderArgs`: the Pod and the nodes (full, or names when `nodeCacheCapable`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderArgs {
    /// The Pod being scheduled.
    pub pod: Pod,
    /// The nodes (when the extender is not node-cache capable).
    #[serde(default)]
    pub nodes: Option<NodeList>,
    /// The node names (when it is).
    #[serde(default)]
    pub node_names: Option<Vec<String>>,
}

/// A `v1.NodeList`, as far as read here.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct NodeList {
    /// The nodes.
    #[serde(default)]
    pub items: Vec<Node>,
}

/// `ExtenderFilterResult`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderFilterResult {
    /// Nodes that fit (when sent as nodes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeList>,
    /// Node names that fit (when sent as names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_names: Option<Vec<String>>,
    /// Nodes that do not fit, with why.
    pub failed_nodes: BTreeMap<String, String>,
    /// Of those, the ones preemption cannot help.
    pub failed_and_unresolvable_nodes: BTreeMap<String, String>,
    /// An error of the extender itself.
    pub error: String,
}

/// One `HostPriority` of a `HostPriorityList`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct HostPriority {
    /// The node.
    pub host: String,
    /// 0..=10.
    pub score: i64,
}

/// `Victims`: the Pods preemption would remove from a node.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Victims {
    /// The Pods.
    #[serde(default)]
    pub pods: Vec<Pod>,
    /// PodDisruptionBudgets they would violate.
    #[serde(default, rename = "NumPDBViolations")]
    pub num_pdb_violations: i64,
}

/// `MetaPod`: a victim by uid.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct MetaPod {
    /// Its uid.
    #[serde(rename = "UID")]
    pub uid: String,
}

/// `MetaVictims`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct MetaVictims {
    /// The Pods, by uid.
    #[serde(default)]
    pub pods: Vec<MetaPod>,
    /// PodDisruptionBudgets they would violate.
    #[serde(default, rename = "NumPDBViolations")]
    pub num_pdb_violations: i64,
}

/// `ExtenderPreemptionArgs`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderPreemptionArgs {
    /// The preemptor.
    pub pod: Pod,
    /// Candidates with their victims (not node-cache capable).
    #[serde(default)]
    pub node_name_to_victims: Option<BTreeMap<String, Victims>>,
    /// Candidates with their victims by uid (node-cache capable).
    #[serde(default)]
    pub node_name_to_meta_victims: Option<BTreeMap<String, MetaVictims>>,
}

/// `ExtenderPreemptionResult`: the candidates kept, with the victims that remain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderPreemptionResult {
    /// Node → victims still to be removed.
    pub node_name_to_meta_victims: BTreeMap<String, MetaVictims>,
}

/// CPU (millicores) and memory (bytes) a Pod asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Requests {
    /// Millicores.
    pub cpu_milli: f64,
    /// Bytes.
    pub memory: f64,
}

/// What `pod` requests (its containers' requests summed, as the scheduler counts them).
pub fn requests(pod: &Pod) -> Requests {
    let mut r = Requests::default();
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        if let Some(req) = c.resources.as_ref().and_then(|r| r.requests.as_ref()) {
            if let Some(q) = req.get("cpu") {
                r.cpu_milli += crate::controller::pod::quantity(q, true);
            }
            if let Some(q) = req.get("memory") {
                r.memory += crate::controller::pod::quantity(q, false);
            }
        }
    }
    r
}

/// What `node` can hold (`status.allocatable`; unset: unlimited).
pub fn allocatable(node: &Node) -> Requests {
    let a = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
    let get = |k: &str, cpu: bool| {
        a.and_then(|a| a.get(k))
            .map_or(f64::INFINITY, |q| crate::controller::pod::quantity(q, cpu))
    };
    Requests {
        cpu_milli: get("cpu", true),
        memory: get("memory", false),
    }
}

/// True for a Pod that still takes room on its node.
fn occupies(p: &Pod) -> bool {
    !matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Room left on every node: allocatable minus the requests of the Pods bound there.
pub fn free_room(nodes: &[Node], pods: &[Pod]) -> BTreeMap<String, Requests> {
    let mut free: BTreeMap<String, Requests> = nodes
        .iter()
        .map(|n| (n.name_any(), allocatable(n)))
        .collect();
    for p in pods.iter().filter(|p| occupies(p)) {
        if let Some(f) = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .and_then(|n| free.get_mut(n))
        {
            let r = requests(p);
            f.cpu_milli -= r.cpu_milli;
            f.memory -= r.memory;
        }
    }
    free
}

fn fits(free: &Requests, r: &Requests) -> bool {
    r.cpu_milli <= free.cpu_milli && r.memory <= free.memory
}

/// A victim podmig can move: a MigratingPod's Pod, Ready.
pub fn movable(p: &Pod) -> bool {
    matches!(
        crate::controller::eviction::owner_of(p),
        crate::controller::eviction::Owner::MigratingPod(_)
    ) && crate::controller::pod::is_ready(p)
}

/// The plan for one preemption: the node chosen, the moves (victim uid → target node) and
/// the victims that remain to be removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The candidate node kept.
    pub node: String,
    /// Victims moved: (uid, namespace/name, source node, target node).
    pub moves: Vec<(String, String, String, String)>,
    /// Victims left to the scheduler (uids).
    pub remaining: Vec<String>,
}

/// Chooses among the candidates (node → victims): for each, the movable victims that
/// fit somewhere else (not on a candidate being freed, first fit by most room), the rest
/// remain; the candidate with the fewest remaining victims (then the fewest moves, then
/// name) wins. `None` without candidates.
pub fn plan(candidates: &BTreeMap<String, Vec<Pod>>, nodes: &[Node], pods: &[Pod]) -> Option<Plan> {
    let free = free_room(nodes, pods);
    let mut best: Option<Plan> = None;
    for (node, victims) in candidates {
        let mut room = free.clone();
        let mut moves = Vec::new();
        let mut remaining = Vec::new();
        for v in victims {
            let uid = v.uid().unwrap_or_default();
            let r = requests(v);
            let target = movable(v)
                .then(|| {
                    nodes
                        .iter()
                        .filter(|n| {
                            n.name_any() != *node && crate::controller::eviction::schedulable(n)
                        })
                        .filter(|n| room.get(&n.name_any()).is_some_and(|f| fits(f, &r)))
                        .max_by(|a, b| {
                            let fa = room.get(&a.name_any()).map_or(0.0, |f| f.memory);
                            let fb = room.get(&b.name_any()).map_or(0.0, |f| f.memory);
                            fa.total_cmp(&fb)
                                .then_with(|| b.name_any().cmp(&a.name_any()))
                        })
                        .map(|n| n.name_any())
                })
                .flatten();
            match target {
                Some(t) => {
                    if let Some(f) = room.get_mut(&t) {
                        f.cpu_milli -= r.cpu_milli;
                        f.memory -= r.memory;
                    }
                    moves.push((
                        uid,
                        format!("{}/{}", v.namespace().unwrap_or_default(), v.name_any()),
                        node.clone(),
                        t,
                    ));
                }
                None => remaining.push(uid),
            }
        }
        let p = Plan {
            node: node.clone(),
            moves,
            remaining,
        };
        let better = best.as_ref().is_none_or(|b| {
            (p.remaining.len(), p.moves.len(), &p.node)
                < (b.remaining.len(), b.moves.len(), &b.node)
        });
        if better {
            best = Some(p);
        }
    }
    best
}

/// Scores for `prioritize`: 0 for a node marked for draining, 10 otherwise.
pub fn priorities(nodes: &[Node]) -> Vec<HostPriority> {
    nodes
        .iter()
        .map(|n| HostPriority {
            host: n.name_any(),
            score: if n.labels().get(LABEL_DRAINING).is_some_and(|v| v == "true") {
                0
            } else {
                10
            },
        })
        .collect()
}

/// What the extender's handlers share.
pub struct Extender {
    client: Client,
    peers: PeerClient,
}

/// Errors of the extender.
#[derive(Debug, thiserror::Error)]
pub enum ExtenderError {
    /// The listener cannot be bound or served.
    #[error("extender listener {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl Extender {
    /// An extender reading the cluster with `client` and calling the node daemons with
    /// `peers` (the daemons' CA, a token with `create pods/migrate`).
    pub fn new(client: Client, peers: PeerClient) -> Self {
        Self { client, peers }
    }
}

/// Serves `filter`, `prioritize` and `preempt` on `addr` (plain HTTP: run it where only
/// the scheduler reaches it, e.g. a ClusterIP Service or the scheduler's Pod) until the
/// future is dropped.
pub async fn serve(ext: Arc<Extender>, addr: SocketAddr) -> Result<(), ExtenderError> {
    let app = Router::new()
        .route("/filter", axum::routing::post(filter))
        .route("/prioritize", axum::routing::post(prioritize))
        .route("/preempt", axum::routing::post(preempt))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(ext);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ExtenderError::Listen { addr, source })?;
    tracing::info!(%addr, "scheduler extender listening");
    axum::serve(listener, app)
        .await
        .map_err(|source| ExtenderError::Listen { addr, source })
}

fn bad_request(e: impl std::fmt::Display) -> axum::response::Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({"error": "BadRequest", "message": e.to_string()})),
    )
        .into_response()
}

async fn filter(body: axum::body::Bytes) -> axum::response::Response {
    match serde_json::from_slice::<ExtenderArgs>(&body) {
        Ok(args) => Json(ExtenderFilterResult {
            nodes: args.nodes,
            node_names: args.node_names,
            ..Default::default()
        })
        .into_response(),
        Err(e) => bad_request(format!("not ExtenderArgs: {e}")),
    }
}

async fn prioritize(
    State(ext): State<Arc<Extender>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let args: ExtenderArgs = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return bad_request(format!("not ExtenderArgs: {e}")),
    };
    let nodes = match (args.nodes, args.node_names) {
        (Some(l), _) => l.items,
        (None, Some(names)) => match Api::<Node>::all(ext.client.clone())
            .list(&ListParams::default())
            .await
        {
            Ok(l) => l
                .items
                .into_iter()
                .filter(|n| names.contains(&n.name_any()))
                .collect(),
            Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
        },
        (None, None) => vec![],
    };
    Json(priorities(&nodes)).into_response()
}

async fn preempt(
    State(ext): State<Arc<Extender>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let args: ExtenderPreemptionArgs = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return bad_request(format!("not ExtenderPreemptionArgs: {e}")),
    };
    match preempt_with(&ext, args).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "preemption not served");
            (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response()
        }
    }
}

async fn preempt_with(
    ext: &Extender,
    args: ExtenderPreemptionArgs,
) -> Result<ExtenderPreemptionResult, kube::Error> {
    let pods = Api::<Pod>::all(ext.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let nodes = Api::<Node>::all(ext.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let by_uid: BTreeMap<String, &Pod> = pods.iter().filter_map(|p| Some((p.uid()?, p))).collect();
    let candidates: BTreeMap<String, Vec<Pod>> =
        match (args.node_name_to_victims, args.node_name_to_meta_victims) {
            (Some(v), _) => v.into_iter().map(|(n, v)| (n, v.pods)).collect(),
            (None, Some(m)) => m
                .into_iter()
                .map(|(n, v)| {
                    let pods = v
                        .pods
                        .iter()
                        .filter_map(|p| by_uid.get(&p.uid).map(|p| (*p).clone()))
                        .collect();
                    (n, pods)
                })
                .collect(),
            (None, None) => BTreeMap::new(),
        };
    let Some(plan) = plan(&candidates, &nodes, &pods) else {
        return Ok(ExtenderPreemptionResult::default());
    };
    let preemptor = args.pod.name_any();
    let mut remaining = plan.remaining.clone();
    for (uid, name, source, target) in &plan.moves {
        let host = nodes
            .iter()
            .find(|n| n.name_any() == *source)
            .and_then(|n| {
                n.status
                    .as_ref()?
                    .addresses
                    .as_ref()?
                    .iter()
                    .find(|a| a.type_ == "InternalIP")
                    .map(|a| a.address.clone())
            })
            .unwrap_or_default();
        let req = podmig_api::nodeapi::MigrateRequest {
            target_node: Some(target.clone()),
            ..Default::default()
        };
        match ext.peers.request_move(&host, uid, &req).await {
            // Started now, or already moving (the scheduler asks again while it waits).
            Ok((202 | 200 | 409, _)) => {
                tracing::info!(victim = %name, from = %source, to = %target, %preemptor,
                    "preemption victim moved instead of deleted");
            }
            Ok((status, body)) => {
                tracing::warn!(victim = %name, status, body = %String::from_utf8_lossy(&body),
                    "the victim's daemon refused the move: left to the scheduler");
                remaining.push(uid.clone());
            }
            Err(error) => {
                tracing::warn!(victim = %name, %error, "cannot ask for the move: left to the scheduler");
                remaining.push(uid.clone());
            }
        }
    }
    Ok(ExtenderPreemptionResult {
        node_name_to_meta_victims: BTreeMap::from([(
            plan.node,
            MetaVictims {
                pods: remaining.into_iter().map(|uid| MetaPod { uid }).collect(),
                num_pdb_violations: 0,
            },
        )]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, mem: &str, draining: bool) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": if draining { json!({LABEL_DRAINING: "true"}) } else { json!({}) }},
            "status": {"allocatable": {"cpu": "2", "memory": mem},
                "conditions": [{"type": "Ready", "status": "True"}]}}))
        .expect("node")
    }

    fn pod(name: &str, node: &str, mem: &str, mpod: bool) -> Pod {
        let owners = if mpod {
            json!([{"apiVersion": "podmig.dev/v1alpha1", "kind": "MigratingPod", "name": "m", "uid": "u", "controller": true}])
        } else {
            json!([])
        };
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "ownerReferences": owners},
            "spec": {"nodeName": node, "containers": [{"name": "a", "resources": {"requests": {"memory": mem, "cpu": "100m"}}}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}))
        .expect("pod")
    }

    #[test]
    fn the_wire_format_is_upstreams() {
        let args: ExtenderPreemptionArgs = serde_json::from_value(json!({
            "Pod": {"metadata": {"name": "p"}},
            "NodeNameToMetaVictims": {"n0": {"Pods": [{"UID": "u1"}], "NumPDBViolations": 1}}}))
        .expect("args");
        assert_eq!(
            args.node_name_to_meta_victims.expect("meta")["n0"].pods,
            [MetaPod { uid: "u1".into() }]
        );
        let out = serde_json::to_value(ExtenderPreemptionResult {
            node_name_to_meta_victims: BTreeMap::from([("n0".into(), MetaVictims::default())]),
        })
        .expect("json");
        assert_eq!(
            out,
            json!({"NodeNameToMetaVictims": {"n0": {"Pods": [], "NumPDBViolations": 0}}})
        );
        assert_eq!(
            serde_json::to_value(priorities(&[
                node("a", "1Gi", true),
                node("b", "1Gi", false)
            ]))
            .expect("json"),
            json!([{"Host": "a", "Score": 0}, {"Host": "b", "Score": 10}])
        );
    }

    #[test]
    fn movable_victims_go_where_they_fit_and_the_best_candidate_is_kept() {
        let nodes = [
            node("n0", "4Gi", false),
            node("n1", "4Gi", false),
            node("n2", "1Gi", false),
        ];
        let mover = pod("mover", "n0", "3Gi", true);
        let plain = pod("plain", "n1", "3Gi", false);
        let pods = [mover.clone(), plain.clone()];
        let candidates = BTreeMap::from([
            ("n0".to_owned(), vec![mover.clone()]),
            ("n1".to_owned(), vec![plain.clone()]),
        ]);
        let p = plan(&candidates, &nodes, &pods).expect("a plan");
        // n1's victim cannot move: n0 wins, its victim moves — but not to n1 (full) or n2
        // (too small): nowhere. So both candidates keep one victim; n0 needs no move then.
        assert_eq!(p.remaining.len(), 1);
        // With room on n2 the MigratingPod's Pod moves there and n0 is freed for nothing.
        let roomy = [
            node("n0", "4Gi", false),
            node("n1", "4Gi", false),
            node("n2", "8Gi", false),
        ];
        let p = plan(&candidates, &roomy, &pods).expect("a plan");
        assert_eq!(p.node, "n0");
        assert!(p.remaining.is_empty());
        assert_eq!(
            p.moves,
            [(
                "uid-mover".to_owned(),
                "default/mover".to_owned(),
                "n0".to_owned(),
                "n2".to_owned()
            )]
        );
        // A node marked unschedulable takes no victim.
        let mut cordoned = roomy.clone();
        cordoned[2].spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        let p = plan(&candidates, &cordoned, &pods).expect("a plan");
        assert!(p.moves.is_empty());
    }

    #[test]
    fn requests_and_room_are_counted_as_the_scheduler_counts_them() {
        let p = pod("a", "n0", "512Mi", true);
        assert_eq!(
            requests(&p),
            Requests {
                cpu_milli: 100.0,
                memory: 512.0 * 1024.0 * 1024.0
            }
        );
        let free = free_room(&[node("n0", "1Gi", false)], &[p]);
        assert_eq!(free["n0"].memory, 512.0 * 1024.0 * 1024.0);
        assert_eq!(free["n0"].cpu_milli, 1900.0);
    }
}
