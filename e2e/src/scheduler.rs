//! A trivial scheduler: binds unscheduled Pods to a Ready, schedulable Node that matches
//! their nodeSelector, the one running the fewest Pods.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, api::ListParams};

/// Picks a node for `pod` among `nodes`, given how many Pods each runs. Plain function so
/// the rules are unit-tested.
pub fn pick(pod: &Pod, nodes: &[Node], load: &BTreeMap<String, usize>) -> Option<String> {
    let selector = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_selector.clone())
        .unwrap_or_default();
    nodes
        .iter()
        .filter(|n| n.spec.as_ref().and_then(|s| s.unschedulable) != Some(true))
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter(|n| {
            let labels = n.metadata.labels.clone().unwrap_or_default();
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .filter_map(|n| n.metadata.name.clone())
        .min_by_key(|name| (load.get(name).copied().unwrap_or(0), name.clone()))
}

/// kube-scheduler's explanation when no node fits `pod` ("0/2 nodes are available: …").
pub fn unschedulable_message(pod: &Pod, nodes: &[Node]) -> String {
    let selector = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_selector.clone())
        .unwrap_or_default();
    let (mut cordoned, mut not_ready, mut mismatch) = (0, 0, 0);
    for n in nodes {
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let labels = n.metadata.labels.clone().unwrap_or_default();
        if n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
            cordoned += 1;
        } else if !ready {
            not_ready += 1;
        } else if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
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

/// Binds Pods until the task is dropped (polls every 100 ms: simple and fast enough).
pub async fn run(client: kube::Client) {
    let pods: Api<Pod> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    loop {
        if let (Ok(pl), Ok(nl)) = (
            pods.list(&ListParams::default()).await,
            nodes.list(&ListParams::default()).await,
        ) {
            let mut load: BTreeMap<String, usize> = BTreeMap::new();
            for p in &pl.items {
                if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
                    *load.entry(n).or_default() += 1;
                }
            }
            for p in pl.items.iter().filter(|p| to_schedule(p)) {
                match pick(p, &nl.items, &load) {
                    Some(node) => {
                        let ns = p.metadata.namespace.clone().unwrap_or_default();
                        let name = p.metadata.name.clone().unwrap_or_default();
                        match post_binding(&client, &ns, &name, &node).await {
                            Ok(()) => *load.entry(node).or_default() += 1,
                            Err(error) => tracing::warn!(pod = %name, %error, "binding failed"),
                        }
                    }
                    None => {
                        mark_unschedulable(&pods, p, &unschedulable_message(p, &nl.items)).await;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
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
}
