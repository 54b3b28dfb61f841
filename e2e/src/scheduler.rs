//! The local cluster's scheduler: binds unscheduled Pods to a Ready, schedulable Node that
//! matches their nodeSelector and has room for their requests (`status.allocatable` minus
//! the requests of the Pods bound there), the one running the fewest Pods. As
//! kube-scheduler it preempts: a Pod that fits nowhere evicts lower-priority Pods
//! (`spec.priority`) from the node where the fewest must go, after asking the configured
//! extenders (`preemptVerb`); it nominates the node (`status.nominatedNodeName`) and
//! binds there once room is free. Extenders come from a `KubeSchedulerConfiguration` file
//! (`extenders:` with `urlPrefix`, `filterVerb`, `prioritizeVerb`, `preemptVerb`,
//! `weight`, `ignorable`, `nodeCacheCapable`), called over HTTP with upstream's JSON; the
//! file is re-read on every pass (kube-scheduler reads it at start).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, ResourceExt, api::ListParams};
use serde_json::{Value, json};

/// Nodes `pod` may run on apart from room: Ready, schedulable, matching its selector and
/// its required node affinity.
fn eligible<'a>(pod: &Pod, nodes: &'a [Node]) -> Vec<&'a Node> {
    nodes
        .iter()
        .filter(|n| n.spec.as_ref().and_then(|s| s.unschedulable) != Some(true))
        .filter(|n| is_ready(n))
        .filter(|n| matches_pod(pod, n))
        .collect()
}

fn is_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `pod`'s `nodeSelector` and required node affinity (terms ORed, requirements ANDed;
/// `matchExpressions` on labels, `matchFields` on `metadata.name`) accept node `n`.
fn matches_pod(pod: &Pod, n: &Node) -> bool {
    use k8s_openapi::api::core::v1::NodeSelectorRequirement;
    let labels = n.metadata.labels.clone().unwrap_or_default();
    let name = n.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let selector = spec
        .and_then(|s| s.node_selector.clone())
        .unwrap_or_default();
    if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
        return false;
    }
    let holds = |r: &NodeSelectorRequirement, value: Option<&String>| {
        let values = r.values.as_deref().unwrap_or_default();
        match r.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    };
    let Some(required) = spec
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
    else {
        return true;
    };
    required.node_selector_terms.iter().any(|t| {
        t.match_expressions
            .iter()
            .flatten()
            .all(|r| holds(r, labels.get(&r.key)))
            && t.match_fields
                .iter()
                .flatten()
                .all(|r| r.key == "metadata.name" && holds(r, Some(&name)))
    })
}

/// CPU (millicores) and memory (bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Room {
    /// Millicores.
    pub cpu: f64,
    /// Bytes.
    pub memory: f64,
}

impl Room {
    fn fits(&self, r: &Room) -> bool {
        r.cpu <= self.cpu && r.memory <= self.memory
    }
    fn take(&mut self, r: &Room) {
        self.cpu -= r.cpu;
        self.memory -= r.memory;
    }
    fn give(&mut self, r: &Room) {
        self.cpu += r.cpu;
        self.memory += r.memory;
    }
}

/// What `pod` requests (its containers' requests summed).
pub fn requests(pod: &Pod) -> Room {
    let mut r = Room::default();
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        if let Some(req) = c.resources.as_ref().and_then(|r| r.requests.as_ref()) {
            r.cpu += req
                .get("cpu")
                .map_or(0.0, |q| podmig_api::quantity(q, true));
            r.memory += req
                .get("memory")
                .map_or(0.0, |q| podmig_api::quantity(q, false));
        }
    }
    r
}

/// Bound and not finished: it takes room on its node.
fn occupies(p: &Pod) -> bool {
    p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()
        && !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// Room left on every node: `status.allocatable` (unset: unlimited) minus the requests of
/// the Pods bound there.
pub fn free_room(nodes: &[Node], pods: &[Pod]) -> BTreeMap<String, Room> {
    let mut free: BTreeMap<String, Room> = nodes
        .iter()
        .map(|n| {
            let a = n.status.as_ref().and_then(|s| s.allocatable.as_ref());
            let get = |k: &str, cpu: bool| {
                a.and_then(|a| a.get(k))
                    .map_or(f64::INFINITY, |q| podmig_api::quantity(q, cpu))
            };
            (
                n.name_any(),
                Room {
                    cpu: get("cpu", true),
                    memory: get("memory", false),
                },
            )
        })
        .collect();
    for p in pods.iter().filter(|p| occupies(p)) {
        if let Some(f) = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .and_then(|n| free.get_mut(n))
        {
            f.take(&requests(p));
        }
    }
    free
}

/// The nodes `pod` fits on now.
pub fn feasible(pod: &Pod, nodes: &[Node], free: &BTreeMap<String, Room>) -> Vec<String> {
    let want = requests(pod);
    eligible(pod, nodes)
        .into_iter()
        .map(|n| n.name_any())
        .filter(|n| free.get(n).is_some_and(|f| f.fits(&want)))
        .collect()
}

/// Picks a node for `pod` among `nodes`, given how many Pods each runs. Plain function so
/// the rules are unit-tested.
pub fn pick(pod: &Pod, nodes: &[Node], load: &BTreeMap<String, usize>) -> Option<String> {
    eligible(pod, nodes)
        .into_iter()
        .filter_map(|n| n.metadata.name.clone())
        .min_by_key(|name| (load.get(name).copied().unwrap_or(0), name.clone()))
}

/// The Pod's priority (`spec.priority`, set by the API server from its PriorityClass).
pub fn priority(p: &Pod) -> i32 {
    p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)
}

/// Preemption's candidates: for each node `pod` could run on, the fewest lower-priority
/// Pods whose removal makes room (all lower ones are taken off, then as many as still
/// leave room are given back, highest priority first, as kube-scheduler reprieves them).
pub fn preemption_candidates(
    pod: &Pod,
    nodes: &[Node],
    pods: &[Pod],
) -> BTreeMap<String, Vec<Pod>> {
    let free = free_room(nodes, pods);
    let want = requests(pod);
    let mine = priority(pod);
    let mut out = BTreeMap::new();
    for n in eligible(pod, nodes) {
        let name = n.name_any();
        let Some(mut room) = free.get(&name).copied() else {
            continue;
        };
        let mut lower: Vec<&Pod> = pods
            .iter()
            .filter(|p| {
                occupies(p)
                    && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
            })
            .filter(|p| p.metadata.deletion_timestamp.is_none() && priority(p) < mine)
            .collect();
        for p in &lower {
            room.give(&requests(p));
        }
        if !room.fits(&want) {
            continue;
        }
        room.take(&want);
        lower.sort_by_key(|p| std::cmp::Reverse(priority(p)));
        let mut victims = Vec::new();
        for p in lower {
            let r = requests(p);
            if room.fits(&r) {
                room.take(&r);
            } else {
                victims.push(p.clone());
            }
        }
        out.insert(name, victims);
    }
    out
}

/// One scheduler extender, as `KubeSchedulerConfiguration.extenders[]` configures it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtenderConfig {
    /// `http://host:port/prefix`.
    pub url_prefix: String,
    /// Verb of the filter call.
    #[serde(default)]
    pub filter_verb: Option<String>,
    /// Verb of the prioritize call.
    #[serde(default)]
    pub prioritize_verb: Option<String>,
    /// Verb of the preempt call.
    #[serde(default)]
    pub preempt_verb: Option<String>,
    /// Multiplier of its scores.
    #[serde(default = "one")]
    pub weight: i64,
    /// An extender that fails is skipped instead of failing the scheduling.
    #[serde(default)]
    pub ignorable: bool,
    /// It keeps its own node cache: it gets node names, not nodes.
    #[serde(default)]
    pub node_cache_capable: bool,
    /// HTTPS (not supported here: the local extenders speak HTTP).
    #[serde(default, rename = "enableHTTPS")]
    pub enable_https: bool,
}

fn one() -> i64 {
    1
}

#[derive(Debug, serde::Deserialize)]
struct SchedulerConfiguration {
    kind: String,
    #[serde(default)]
    extenders: Vec<ExtenderConfig>,
}

/// The extenders of the `KubeSchedulerConfiguration` in `path` (none when it is absent).
pub fn read_extenders(path: &Path) -> anyhow::Result<Vec<ExtenderConfig>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e.into()),
    };
    let cfg: SchedulerConfiguration = serde_saphyr::from_str(&text)?;
    anyhow::ensure!(
        cfg.kind == "KubeSchedulerConfiguration",
        "{}: kind {} is not KubeSchedulerConfiguration",
        path.display(),
        cfg.kind
    );
    anyhow::ensure!(
        cfg.extenders.iter().all(|e| !e.enable_https),
        "{}: enableHTTPS extenders are not supported by the local scheduler",
        path.display()
    );
    Ok(cfg.extenders)
}

/// POSTs `body` to an extender's `verb`: its JSON answer.
async fn call_extender(e: &ExtenderConfig, verb: &str, body: &Value) -> anyhow::Result<Value> {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<axum::body::Bytes>>();
    let url = format!("{}/{verb}", e.url_prefix.trim_end_matches('/'));
    let request = axum::http::Request::post(&url)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(axum::body::Bytes::from(
            body.to_string(),
        )))?;
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer within 30s"))??;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "{url}: {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    Ok(serde_json::from_slice(&bytes)?)
}

/// `ExtenderArgs` for `pod` and `names` of `nodes`.
fn extender_args(e: &ExtenderConfig, pod: &Pod, nodes: &[Node], names: &[String]) -> Value {
    if e.node_cache_capable {
        json!({"Pod": pod, "NodeNames": names})
    } else {
        let items: Vec<&Node> = nodes
            .iter()
            .filter(|n| names.contains(&n.name_any()))
            .collect();
        json!({"Pod": pod, "Nodes": {"items": items}})
    }
}

/// The extenders' filter: the names they all let through (an ignorable one that fails is
/// skipped; another that fails fails the attempt).
async fn extenders_filter(
    extenders: &[ExtenderConfig],
    pod: &Pod,
    nodes: &[Node],
    mut names: Vec<String>,
) -> anyhow::Result<Vec<String>> {
    for e in extenders {
        let Some(verb) = &e.filter_verb else { continue };
        match call_extender(e, verb, &extender_args(e, pod, nodes, &names)).await {
            Ok(r) => {
                if let Some(err) = r["Error"].as_str().filter(|s| !s.is_empty()) {
                    anyhow::bail!("extender {}: {err}", e.url_prefix);
                }
                let kept: Vec<String> = if let Some(n) = r["NodeNames"].as_array() {
                    n.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                } else {
                    r["Nodes"]["items"]
                        .as_array()
                        .map(|l| {
                            l.iter()
                                .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                names.retain(|n| kept.contains(n));
            }
            Err(error) if e.ignorable => {
                tracing::warn!(%error, "ignorable extender failed its filter");
            }
            Err(error) => return Err(error),
        }
    }
    Ok(names)
}

/// The extenders' scores per node (weight × score), added up.
async fn extenders_scores(
    extenders: &[ExtenderConfig],
    pod: &Pod,
    nodes: &[Node],
    names: &[String],
) -> BTreeMap<String, i64> {
    let mut scores = BTreeMap::new();
    for e in extenders {
        let Some(verb) = &e.prioritize_verb else {
            continue;
        };
        match call_extender(e, verb, &extender_args(e, pod, nodes, names)).await {
            Ok(r) => {
                for h in r.as_array().into_iter().flatten() {
                    if let (Some(host), Some(score)) = (h["Host"].as_str(), h["Score"].as_i64()) {
                        *scores.entry(host.to_owned()).or_default() += e.weight * score;
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "extender failed its prioritize"),
        }
    }
    scores
}

/// The extenders' say on preemption's candidates: the candidates each keeps, with the
/// victims that remain (`NodeNameToMetaVictims`, by uid).
async fn extenders_preempt(
    extenders: &[ExtenderConfig],
    pod: &Pod,
    mut candidates: BTreeMap<String, Vec<Pod>>,
    pods: &[Pod],
) -> BTreeMap<String, Vec<Pod>> {
    for e in extenders {
        let Some(verb) = &e.preempt_verb else {
            continue;
        };
        let args = if e.node_cache_capable {
            let meta: BTreeMap<&String, Value> = candidates
                .iter()
                .map(|(n, v)| {
                    let uids: Vec<Value> = v.iter().map(|p| json!({"UID": p.uid()})).collect();
                    (n, json!({"Pods": uids, "NumPDBViolations": 0}))
                })
                .collect();
            json!({"Pod": pod, "NodeNameToMetaVictims": meta})
        } else {
            let full: BTreeMap<&String, Value> = candidates
                .iter()
                .map(|(n, v)| (n, json!({"Pods": v, "NumPDBViolations": 0})))
                .collect();
            json!({"Pod": pod, "NodeNameToVictims": full})
        };
        match call_extender(e, verb, &args).await {
            Ok(r) => {
                let kept = r["NodeNameToMetaVictims"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                candidates = kept
                    .into_iter()
                    .filter(|(n, _)| candidates.contains_key(n))
                    .map(|(n, v)| {
                        let victims = v["Pods"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|m| m["UID"].as_str())
                            .filter_map(|uid| {
                                pods.iter()
                                    .find(|p| p.uid().as_deref() == Some(uid))
                                    .cloned()
                            })
                            .collect();
                        (n, victims)
                    })
                    .collect();
            }
            Err(error) if e.ignorable => {
                tracing::warn!(%error, "ignorable extender failed its preempt");
            }
            Err(error) => {
                tracing::warn!(%error, "extender failed its preempt: no preemption");
                return BTreeMap::new();
            }
        }
    }
    candidates
}

/// kube-scheduler's explanation when no node fits `pod` ("0/2 nodes are available: …").
pub fn unschedulable_message(pod: &Pod, nodes: &[Node]) -> String {
    let (mut cordoned, mut not_ready, mut mismatch) = (0, 0, 0);
    for n in nodes {
        if n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
            cordoned += 1;
        } else if !is_ready(n) {
            not_ready += 1;
        } else if !matches_pod(pod, n) {
            mismatch += 1;
        }
    }
    let mut why = Vec::new();
    if mismatch > 0 {
        why.push(format!(
            "{mismatch} node(s) didn't match Pod's node affinity/selector"
        ));
    }
    if not_ready > 0 {
        why.push(format!(
            "{not_ready} node(s) had untolerated taint {{node.kubernetes.io/not-ready: }}"
        ));
    }
    if cordoned > 0 {
        why.push(format!("{cordoned} node(s) were unschedulable"));
    }
    format!("0/{} nodes are available: {}.", nodes.len(), why.join(", "))
}

/// Records on `pod` why it cannot be scheduled (`PodScheduled=False`, `Unschedulable`),
/// as kube-scheduler does; once per distinct message.
async fn mark_unschedulable(pods: &Api<Pod>, pod: &Pod, message: &str) {
    let current = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    if current
        .iter()
        .any(|c| c.type_ == "PodScheduled" && c.message.as_deref() == Some(message))
    {
        return;
    }
    let mut conditions: Vec<serde_json::Value> = current
        .iter()
        .filter(|c| c.type_ != "PodScheduled")
        .filter_map(|c| serde_json::to_value(c).ok())
        .collect();
    conditions.push(
        serde_json::json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": message, "lastTransitionTime": crate::clock::now()}),
    );
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(pods.clone().into_client(), &ns);
    let patch = serde_json::json!({"status": {"conditions": conditions}});
    if let Err(error) = api
        .patch_status(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(patch),
        )
        .await
    {
        tracing::warn!(pod = %name, %error, "cannot record the Pod as unschedulable");
    }
}

/// Whether the scheduler binds `p` now: unbound, not being deleted, and — as
/// kube-scheduler — without scheduling gates (a gated Pod waits until they are removed).
fn to_schedule(p: &Pod) -> bool {
    p.spec.as_ref().is_some_and(|s| {
        s.node_name.is_none() && s.scheduling_gates.as_ref().is_none_or(Vec::is_empty)
    }) && p.metadata.deletion_timestamp.is_none()
}

/// Binds Pods until the task is dropped (polls every 100 ms: simple and fast enough);
/// extenders from the `KubeSchedulerConfiguration` at `config`, if any.
pub async fn run(client: kube::Client, config: Option<PathBuf>) {
    let pods: Api<Pod> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let mut preempted_at: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        let extenders = match config.as_deref().map(read_extenders) {
            Some(Ok(e)) => e,
            Some(Err(error)) => {
                tracing::warn!(%error, "scheduler configuration unreadable: no extenders");
                vec![]
            }
            None => vec![],
        };
        if let (Ok(pl), Ok(nl)) = (
            pods.list(&ListParams::default()).await,
            nodes.list(&ListParams::default()).await,
        ) {
            let mut all = pl.items.clone();
            let mut load: BTreeMap<String, usize> = BTreeMap::new();
            for p in &pl.items {
                if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
                    *load.entry(n).or_default() += 1;
                }
            }
            let mut queue: Vec<&Pod> = pl.items.iter().filter(|p| to_schedule(p)).collect();
            // Higher priority first, as kube-scheduler's queue orders them.
            queue.sort_by_key(|p| std::cmp::Reverse(priority(p)));
            for p in queue {
                let free = free_room(&nl.items, &all);
                let fit = feasible(p, &nl.items, &free);
                let fit = match extenders_filter(&extenders, p, &nl.items, fit).await {
                    Ok(f) => f,
                    Err(error) => {
                        mark_unschedulable(&pods, p, &format!("extender: {error}")).await;
                        continue;
                    }
                };
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                let name = p.metadata.name.clone().unwrap_or_default();
                if fit.is_empty() {
                    let key = format!("{ns}/{name}");
                    let due = preempted_at
                        .get(&key)
                        .is_none_or(|t| t.elapsed() > Duration::from_secs(2));
                    if due
                        && p.spec.as_ref().and_then(|s| s.preemption_policy.as_deref())
                            != Some("Never")
                    {
                        preempted_at.insert(key, Instant::now());
                        preempt(&client, &extenders, p, &nl.items, &all).await;
                    }
                    mark_unschedulable(&pods, p, &unschedulable_message(p, &nl.items)).await;
                    continue;
                }
                let nominated = p
                    .status
                    .as_ref()
                    .and_then(|s| s.nominated_node_name.clone());
                let scores = extenders_scores(&extenders, p, &nl.items, &fit).await;
                let Some(node) = fit
                    .iter()
                    .max_by_key(|n| {
                        (
                            nominated.as_deref() == Some(n.as_str()),
                            scores.get(*n).copied().unwrap_or(0),
                            std::cmp::Reverse(load.get(*n).copied().unwrap_or(0)),
                            std::cmp::Reverse((*n).clone()),
                        )
                    })
                    .cloned()
                else {
                    continue;
                };
                match post_binding(&client, &ns, &name, &node).await {
                    Ok(()) => {
                        *load.entry(node.clone()).or_default() += 1;
                        let mut bound = p.clone();
                        if let Some(s) = bound.spec.as_mut() {
                            s.node_name = Some(node);
                        }
                        all.push(bound);
                    }
                    Err(error) => tracing::warn!(pod = %name, %error, "binding failed"),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Preemption for `pod`: candidates, the extenders' say, then on the node with the fewest
/// victims (then by name) the preemptor is nominated and the victims are deleted, each
/// with an Event `Preempted`.
async fn preempt(
    client: &kube::Client,
    extenders: &[ExtenderConfig],
    pod: &Pod,
    nodes: &[Node],
    pods: &[Pod],
) {
    let candidates = preemption_candidates(pod, nodes, pods);
    if candidates.is_empty() {
        return;
    }
    let candidates = extenders_preempt(extenders, pod, candidates, pods).await;
    let Some((node, victims)) = candidates
        .into_iter()
        .min_by_key(|(n, v)| (v.len(), n.clone()))
    else {
        return;
    };
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.name_any();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let patch = json!({"status": {"nominatedNodeName": node}});
    if let Err(error) = api
        .patch_status(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(patch),
        )
        .await
    {
        tracing::warn!(pod = %name, %error, "cannot nominate the preemptor's node");
        return;
    }
    tracing::info!(pod = %name, %node, victims = victims.len(), "preemption");
    for v in victims {
        let vns = v.metadata.namespace.clone().unwrap_or_default();
        let victims: Api<Pod> = Api::namespaced(client.clone(), &vns);
        let _ = victims
            .delete(&v.name_any(), &kube::api::DeleteParams::default())
            .await;
        let event = json!({"apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": format!("{}.", v.name_any()), "namespace": vns},
            "involvedObject": {"kind": "Pod", "namespace": vns, "name": v.name_any(), "uid": v.uid()},
            "reason": "Preempted", "type": "Normal", "source": {"component": "default-scheduler"},
            "message": format!("Preempted by pod {} on node {node}", pod.uid().unwrap_or_default()),
            "firstTimestamp": crate::clock::now(), "lastTimestamp": crate::clock::now(), "count": 1});
        if let Ok(ev) = serde_json::from_value::<k8s_openapi::api::core::v1::Event>(event) {
            let events: Api<k8s_openapi::api::core::v1::Event> =
                Api::namespaced(client.clone(), &vns);
            let _ = events.create(&kube::api::PostParams::default(), &ev).await;
        }
    }
}

/// Binds Pod `ns/pod` to `node` through the `binding` subresource (what a scheduler does).
pub async fn post_binding(
    client: &kube::Client,
    ns: &str,
    pod: &str,
    node: &str,
) -> anyhow::Result<()> {
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client.clone(), ns);
    let binding = serde_json::json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod}, "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
    pods.create_subresource::<serde_json::Value, serde_json::Value>(
        "binding",
        pod,
        &kube::api::PostParams::default(),
        &binding,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, ready: bool, unschedulable: bool, zone: &str) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {"zone": zone}}, "spec": {"unschedulable": unschedulable},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})).expect("node")
    }

    #[test]
    fn a_gated_pod_waits_until_its_gates_are_removed() {
        let pod = |spec: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).expect("pod")
        };
        assert!(to_schedule(&pod(json!({"containers": []}))));
        assert!(!to_schedule(&pod(
            json!({"containers": [], "schedulingGates": [{"name": "x"}]})
        )));
        assert!(to_schedule(&pod(
            json!({"containers": [], "schedulingGates": []})
        )));
        assert!(!to_schedule(&pod(
            json!({"containers": [], "nodeName": "a"})
        )));
    }

    #[test]
    fn picks_ready_schedulable_matching_least_loaded() {
        let nodes = vec![
            node("a", true, false, "x"),
            node("b", true, false, "y"),
            node("c", false, false, "x"),
            node("d", true, true, "x"),
        ];
        let pod: Pod =
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": []}}))
                .expect("pod");
        let load = BTreeMap::from([("a".to_owned(), 3)]);
        assert_eq!(pick(&pod, &nodes, &load).as_deref(), Some("b"));
        let pinned: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [], "nodeSelector": {"zone": "x"}}})).expect("pod");
        assert_eq!(
            pick(&pinned, &nodes, &load).as_deref(),
            Some("a"),
            "c is not ready, d is cordoned"
        );
        let nowhere: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [], "nodeSelector": {"zone": "z"}}})).expect("pod");
        assert_eq!(pick(&nowhere, &nodes, &load), None);
        assert_eq!(
            unschedulable_message(&nowhere, &nodes),
            "0/4 nodes are available: 2 node(s) didn't match Pod's node affinity/selector, 1 node(s) had untolerated taint {node.kubernetes.io/not-ready: }, 1 node(s) were unschedulable."
        );
    }

    #[test]
    fn required_node_affinity_is_obeyed_by_name_and_by_label() {
        let nodes = vec![
            node("a", true, false, "x"),
            node("b", true, false, "y"),
            node("c", true, false, "x"),
        ];
        let load = BTreeMap::new();
        let with = |terms: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}}}))
            .expect("pod")
        };
        let not_ab = with(json!([{"matchFields": [
            {"key": "metadata.name", "operator": "NotIn", "values": ["a", "b"]}]}]));
        assert_eq!(pick(&not_ab, &nodes, &load).as_deref(), Some("c"));
        let nowhere = with(json!([{"matchFields": [
            {"key": "metadata.name", "operator": "NotIn", "values": ["a", "b", "c"]}]}]));
        assert_eq!(pick(&nowhere, &nodes, &load), None);
        assert_eq!(
            unschedulable_message(&nowhere, &nodes),
            "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."
        );
        // Terms are ORed, expressions ANDed.
        let y_or_c = with(json!([
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["y"]}]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["c"]}],
             "matchExpressions": [{"key": "zone", "operator": "Exists"}]}]));
        let fits: Vec<_> = eligible(&y_or_c, &nodes)
            .iter()
            .map(|n| n.name_any())
            .collect();
        assert_eq!(fits, ["b", "c"]);
    }

    fn sized(name: &str, node: Option<&str>, mem: &str, prio: i32) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name, "uid": name},
            "spec": {"nodeName": node, "priority": prio,
                "containers": [{"name": "a", "resources": {"requests": {"memory": mem}}}]}}))
        .expect("pod")
    }

    #[test]
    fn room_is_counted_and_preemption_takes_the_fewest_lower_priority_pods() {
        let mut nodes = vec![node("a", true, false, "x"), node("b", true, false, "x")];
        for n in &mut nodes {
            n.status.as_mut().expect("status").allocatable = Some(BTreeMap::from([(
                "memory".to_owned(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("10Gi".into()),
            )]));
        }
        let pods = vec![
            sized("a-small", Some("a"), "2Gi", 0),
            sized("a-big", Some("a"), "6Gi", 0),
            sized("b-high", Some("b"), "6Gi", 2000),
            sized("b-low", Some("b"), "3Gi", 0),
        ];
        let free = free_room(&nodes, &pods);
        assert_eq!(free["a"].memory, 2.0 * 1024f64.powi(3));
        let want = sized("new", None, "7Gi", 1000);
        assert!(feasible(&want, &nodes, &free).is_empty());
        let c = preemption_candidates(&want, &nodes, &pods);
        // On a: taking a-big alone leaves 8Gi: a-small is reprieved. On b: even without
        // b-low only 4Gi: b-high outranks the preemptor, so b is no candidate.
        assert_eq!(c.len(), 1);
        assert_eq!(
            c["a"].iter().map(|p| p.name_any()).collect::<Vec<_>>(),
            ["a-big"]
        );
        assert!(preemption_candidates(&sized("low", None, "7Gi", 0), &nodes, &pods).is_empty());
    }

    #[test]
    fn extenders_are_read_from_a_kube_scheduler_configuration() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("c.yaml");
        assert!(read_extenders(&path).expect("absent").is_empty());
        std::fs::write(&path, "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\nextenders:\n- urlPrefix: http://127.0.0.1:1/x\n  preemptVerb: preempt\n  nodeCacheCapable: true\n").expect("write");
        let e = read_extenders(&path).expect("read");
        assert_eq!(e[0].preempt_verb.as_deref(), Some("preempt"));
        assert!(e[0].node_cache_capable && !e[0].ignorable && e[0].weight == 1);
        std::fs::write(&path, "kind: KubeSchedulerConfiguration\nextenders:\n- {urlPrefix: 'https://x', enableHTTPS: true}\n").expect("write");
        assert!(read_extenders(&path).is_err());
    }
}
