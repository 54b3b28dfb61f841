//! Deployment, ReplicaSet, DaemonSet and Job controllers for the local cluster, standing in
//! for kube-controller-manager's (a Job runs one Pod to completion, retried up to its
//! `backoffLimit`): a Deployment owns one ReplicaSet per Pod template (named
//! by the template's hash, older ones scaled to zero), a ReplicaSet keeps its number of
//! Pods (the scheduler places them), a DaemonSet one Pod per Ready node that matches its
//! node selector (cordoned nodes included, as upstream), replaced when its template
//! changes. Their status carries what `kubectl rollout status` and `helm --wait` read.
//! Deleting an owner removes its Pods through the API server's owner-reference cascade.
//! Every namespace gets the `default` ServiceAccount and the `kube-root-ca.crt` ConfigMap
//! (the service-account and root-CA publisher controllers), which Pods' projected
//! `kube-api-access` volumes read.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{Hash, Hasher},
    time::Duration,
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, ReplicaSet},
        batch::v1::Job,
        core::v1::{ConfigMap, Namespace, Node, Pod, PodTemplateSpec, ServiceAccount},
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::kubelet::now;

/// Label with the hash of the Pod template a Pod or ReplicaSet was made from.
pub const TEMPLATE_HASH: &str = "pod-template-hash";
/// A DaemonSet's Pods' template hash label (upstream's name).
pub const REVISION_HASH: &str = "controller-revision-hash";

/// A short stable hash of a Pod template.
pub fn template_hash(t: &PodTemplateSpec) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(t).unwrap_or_default().hash(&mut h);
    format!("{:010x}", h.finish() & 0xff_ffff_ffff)
}

fn ready(p: &Pod) -> bool {
    crate::wait::is_ready(p)
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The nodes a DaemonSet with this Pod template runs on: Ready ones matching its node
/// selector (cordoned nodes too: DaemonSet Pods tolerate `unschedulable`).
pub fn daemon_nodes(t: &PodTemplateSpec, nodes: &[Node]) -> Vec<String> {
    let selector = t
        .spec
        .as_ref()
        .and_then(|s| s.node_selector.clone())
        .unwrap_or_default();
    let mut out: Vec<String> = nodes
        .iter()
        .filter(|n| node_ready(n))
        .filter(|n| {
            let labels = n.metadata.labels.clone().unwrap_or_default();
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .map(ResourceExt::name_any)
        .collect();
    out.sort();
    out
}

fn owner<K: Resource<DynamicType = ()>>(o: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into(),
        kind: K::kind(&()).into(),
        name: o.name_any(),
        uid: o.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn owned_by(p: &impl ResourceExt, uid: &str) -> bool {
    p.owner_references()
        .iter()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// Five characters from upstream's alphabet for generated names, unique per call.
fn suffix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        std::time::SystemTime::now(),
    )
        .hash(&mut h);
    let n = h.finish();
    let alphabet = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|i| alphabet[((n >> (i * 8)) % alphabet.len() as u64) as usize] as char)
        .collect()
}

/// A Pod from `t`, owned by `owner`, with `labels` added (and a node, for DaemonSets).
fn pod_from(
    t: &PodTemplateSpec,
    name: String,
    owner: OwnerReference,
    labels: &BTreeMap<String, String>,
    node: Option<&str>,
) -> Pod {
    let mut meta = t.metadata.clone().unwrap_or_default();
    meta.name = Some(name);
    meta.labels.get_or_insert_default().extend(labels.clone());
    meta.owner_references = Some(vec![owner]);
    let mut spec = t.spec.clone().unwrap_or_default();
    if let Some(n) = node {
        spec.node_name = Some(n.into());
    }
    Pod {
        metadata: meta,
        spec: Some(spec),
        status: None,
    }
}

async fn patch_status<K>(api: &Api<K>, name: &str, status: serde_json::Value)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let p = Patch::Merge(json!({ "status": status }));
    if let Err(error) = api.patch_status(name, &PatchParams::default(), &p).await {
        tracing::debug!(%name, %error, "status update failed");
    }
}

async fn daemonsets(client: &kube::Client, nodes: &[Node], pods: &[Pod]) -> kube::Result<()> {
    for ds in Api::<DaemonSet>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
    {
        let ns = ds.namespace().unwrap_or_default();
        let (dss, api): (Api<DaemonSet>, Api<Pod>) = (
            Api::namespaced(client.clone(), &ns),
            Api::namespaced(client.clone(), &ns),
        );
        if ds.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let spec = ds.spec.clone().unwrap_or_default();
        let hash = template_hash(&spec.template);
        let uid = ds.uid().unwrap_or_default();
        let mine: Vec<&Pod> = pods
            .iter()
            .filter(|p| owned_by(*p, &uid) && p.metadata.deletion_timestamp.is_none())
            .collect();
        let wanted = daemon_nodes(&spec.template, nodes);
        let mut on_node: HashMap<String, &Pod> = HashMap::new();
        for p in &mine {
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            let phase = p
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            let stale = p.labels().get(REVISION_HASH) != Some(&hash);
            if !wanted.contains(&node) || phase == "Failed" || phase == "Succeeded" || stale {
                let _ = api.delete(&p.name_any(), &DeleteParams::default()).await;
            } else {
                on_node.insert(node, *p);
            }
        }
        for node in wanted.iter().filter(|n| !on_node.contains_key(*n)) {
            let labels = BTreeMap::from([(REVISION_HASH.to_owned(), hash.clone())]);
            let pod = pod_from(
                &spec.template,
                format!("{}-{}", ds.name_any(), suffix()),
                owner(&ds),
                &labels,
                Some(node),
            );
            if let Err(error) = api.create(&PostParams::default(), &pod).await {
                tracing::warn!(daemonset = %ds.name_any(), %node, %error, "cannot create its Pod");
            }
        }
        let ready_n = on_node.values().filter(|p| ready(p)).count();
        patch_status(
            &dss,
            &ds.name_any(),
            json!({
                "observedGeneration": ds.metadata.generation,
                "desiredNumberScheduled": wanted.len(),
                "currentNumberScheduled": on_node.len(),
                "updatedNumberScheduled": on_node.len(),
                "numberReady": ready_n,
                "numberAvailable": ready_n,
                "numberUnavailable": wanted.len().saturating_sub(ready_n),
                "numberMisscheduled": 0,
            }),
        )
        .await;
    }
    Ok(())
}

async fn deployments(client: &kube::Client, sets: &[ReplicaSet]) -> kube::Result<()> {
    for d in Api::<Deployment>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
    {
        if d.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let ns = d.namespace().unwrap_or_default();
        let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
        let spec = d.spec.clone().unwrap_or_default();
        let replicas = spec.replicas.unwrap_or(1);
        let hash = template_hash(&spec.template);
        let uid = d.uid().unwrap_or_default();
        let name = format!("{}-{hash}", d.name_any());
        let mine: Vec<&ReplicaSet> = sets.iter().filter(|r| owned_by(*r, &uid)).collect();
        let current = mine.iter().find(|r| r.name_any() == name);
        match current {
            None => {
                let mut template = spec.template.clone();
                template
                    .metadata
                    .get_or_insert_default()
                    .labels
                    .get_or_insert_default()
                    .insert(TEMPLATE_HASH.into(), hash.clone());
                let mut selector = spec.selector.clone();
                selector
                    .match_labels
                    .get_or_insert_default()
                    .insert(TEMPLATE_HASH.into(), hash.clone());
                let rs = ReplicaSet {
                    metadata: kube::api::ObjectMeta {
                        name: Some(name.clone()),
                        labels: template.metadata.as_ref().and_then(|m| m.labels.clone()),
                        owner_references: Some(vec![owner(&d)]),
                        ..Default::default()
                    },
                    spec: Some(k8s_openapi::api::apps::v1::ReplicaSetSpec {
                        replicas: Some(replicas),
                        selector,
                        template: Some(template),
                        min_ready_seconds: None,
                    }),
                    status: None,
                };
                if let Err(error) = rss.create(&PostParams::default(), &rs).await {
                    tracing::warn!(deployment = %d.name_any(), %error, "cannot create its ReplicaSet");
                }
            }
            Some(rs) if rs.spec.as_ref().and_then(|s| s.replicas) != Some(replicas) => {
                let p = Patch::Merge(json!({"spec": {"replicas": replicas}}));
                let _ = rss.patch(&name, &PatchParams::default(), &p).await;
            }
            Some(_) => {}
        }
        for old in mine.iter().filter(|r| r.name_any() != name) {
            if old.spec.as_ref().and_then(|s| s.replicas) != Some(0) {
                let p = Patch::Merge(json!({"spec": {"replicas": 0}}));
                let _ = rss
                    .patch(&old.name_any(), &PatchParams::default(), &p)
                    .await;
            }
        }
        let count = |f: fn(&k8s_openapi::api::apps::v1::ReplicaSetStatus) -> Option<i32>,
                     only_current: bool| {
            mine.iter()
                .filter(|r| !only_current || r.name_any() == name)
                .filter_map(|r| r.status.as_ref().and_then(f))
                .sum::<i32>()
        };
        let total = count(|s| Some(s.replicas), false);
        let updated = count(|s| Some(s.replicas), true);
        let ready_n = count(|s| s.ready_replicas, false);
        let available = count(|s| s.available_replicas, false);
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        patch_status(
            &deploys,
            &d.name_any(),
            json!({
                "observedGeneration": d.metadata.generation,
                "replicas": total,
                "updatedReplicas": updated,
                "readyReplicas": ready_n,
                "availableReplicas": available,
                "unavailableReplicas": (replicas - available).max(0),
                "conditions": [
                    {"type": "Available", "status": if available >= replicas { "True" } else { "False" },
                     "reason": if available >= replicas { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
                     "lastUpdateTime": now, "lastTransitionTime": now},
                    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                     "message": format!("ReplicaSet \"{name}\" is progressing."),
                     "lastUpdateTime": now, "lastTransitionTime": now}
                ],
            }),
        )
        .await;
    }
    Ok(())
}

async fn replicasets(client: &kube::Client, sets: &[ReplicaSet], pods: &[Pod]) {
    for rs in sets
        .iter()
        .filter(|r| r.metadata.deletion_timestamp.is_none())
    {
        let ns = rs.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let spec = rs.spec.clone().unwrap_or_default();
        let want = spec.replicas.unwrap_or(1).max(0) as usize;
        let uid = rs.uid().unwrap_or_default();
        let mut mine: Vec<&Pod> = pods
            .iter()
            .filter(|p| owned_by(*p, &uid) && p.metadata.deletion_timestamp.is_none())
            .filter(|p| {
                let phase = p.status.as_ref().and_then(|s| s.phase.clone());
                !matches!(phase.as_deref(), Some("Failed" | "Succeeded"))
            })
            .collect();
        // Not-ready Pods go first when scaling down, as upstream prefers.
        mine.sort_by_key(|p| ready(p));
        if mine.len() > want {
            for p in &mine[..mine.len() - want] {
                let _ = api.delete(&p.name_any(), &DeleteParams::default()).await;
            }
            mine.drain(..mine.len() - want);
        }
        if let Some(t) = &spec.template {
            for _ in mine.len()..want {
                let pod = pod_from(
                    t,
                    format!("{}-{}", rs.name_any(), suffix()),
                    owner(rs),
                    &BTreeMap::new(),
                    None,
                );
                if let Err(error) = api.create(&PostParams::default(), &pod).await {
                    tracing::warn!(replicaset = %rs.name_any(), %error, "cannot create its Pod");
                }
            }
        }
        let ready_n = mine.iter().filter(|p| ready(p)).count();
        let rsa: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
        patch_status(
            &rsa,
            &rs.name_any(),
            json!({
                "observedGeneration": rs.metadata.generation,
                "replicas": mine.len(),
                "fullyLabeledReplicas": mine.len(),
                "readyReplicas": ready_n,
                "availableReplicas": ready_n,
            }),
        )
        .await;
    }
}

/// What the Job controller does next for a Job, from its Pods' phases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStep {
    /// Already finished (a `Complete` or `Failed` condition): nothing.
    Finished,
    /// A Pod succeeded: the Job is complete.
    Complete,
    /// More Pods failed than `backoffLimit` allows: the Job failed.
    BackoffLimitExceeded,
    /// No Pod runs: start one.
    Start,
    /// A Pod runs: wait.
    Wait,
}

/// Pods of a Job by phase: (active, succeeded, failed).
fn job_counts(uid: &str, pods: &[Pod]) -> (usize, usize, usize) {
    let phases: Vec<String> = pods
        .iter()
        .filter(|p| owned_by(*p, uid))
        .map(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default()
        })
        .collect();
    let count = |x: &str| phases.iter().filter(|p| *p == x).count();
    let (succeeded, failed) = (count("Succeeded"), count("Failed"));
    (phases.len() - succeeded - failed, succeeded, failed)
}

/// The Job controller's decision (one completion, parallelism 1, as Helm's hooks use).
pub fn job_step(job: &Job, pods: &[Pod]) -> JobStep {
    let finished = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        });
    if finished {
        return JobStep::Finished;
    }
    let (active, succeeded, failed) = job_counts(&job.uid().unwrap_or_default(), pods);
    let limit = job.spec.as_ref().and_then(|s| s.backoff_limit).unwrap_or(6);
    if succeeded > 0 {
        JobStep::Complete
    } else if failed as i32 > limit {
        JobStep::BackoffLimitExceeded
    } else if active == 0 {
        JobStep::Start
    } else {
        JobStep::Wait
    }
}

/// Runs each Job's Pod to completion, retrying failed ones up to `backoffLimit`; the status
/// carries the `Complete`/`Failed` condition Helm's hooks and `kubectl wait` read.
async fn jobs(client: &kube::Client, pods: &[Pod]) -> kube::Result<()> {
    for job in Api::<Job>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|j| j.metadata.deletion_timestamp.is_none())
    {
        let ns = job.namespace().unwrap_or_default();
        let api: Api<Job> = Api::namespaced(client.clone(), &ns);
        let uid = job.uid().unwrap_or_default();
        let (active, succeeded, failed) = job_counts(&uid, pods);
        let start = job
            .status
            .as_ref()
            .and_then(|s| s.start_time.clone())
            .map_or_else(|| json!(now()), |t| json!(t));
        let condition = |kind: &str, reason: &str| {
            json!([{"type": kind, "status": "True", "reason": reason,
                "lastProbeTime": now(), "lastTransitionTime": now()}])
        };
        match job_step(&job, pods) {
            JobStep::Finished => continue,
            JobStep::Complete => {
                patch_status(
                    &api,
                    &job.name_any(),
                    json!({"active": 0, "succeeded": succeeded, "failed": failed,
                    "startTime": start, "completionTime": now(),
                    "conditions": condition("Complete", "CompletionsReached")}),
                )
                .await;
                continue;
            }
            JobStep::BackoffLimitExceeded => {
                patch_status(
                    &api,
                    &job.name_any(),
                    json!({"active": 0, "succeeded": 0, "failed": failed,
                    "startTime": start, "conditions": condition("Failed", "BackoffLimitExceeded")}),
                )
                .await;
                continue;
            }
            JobStep::Start => {
                if let Some(t) = job.spec.as_ref().map(|s| s.template.clone()) {
                    let labels = BTreeMap::from([
                        ("batch.kubernetes.io/job-name".to_owned(), job.name_any()),
                        ("job-name".to_owned(), job.name_any()),
                        ("batch.kubernetes.io/controller-uid".to_owned(), uid.clone()),
                    ]);
                    let pod = pod_from(
                        &t,
                        format!("{}-{}", job.name_any(), suffix()),
                        owner(&job),
                        &labels,
                        None,
                    );
                    if let Err(error) = Api::<Pod>::namespaced(client.clone(), &ns)
                        .create(&PostParams::default(), &pod)
                        .await
                    {
                        tracing::warn!(job = %job.name_any(), %error, "cannot create its Pod");
                    }
                }
            }
            JobStep::Wait => {}
        }
        patch_status(
            &api,
            &job.name_any(),
            json!({"active": active.max(1), "failed": failed, "startTime": start}),
        )
        .await;
    }
    Ok(())
}

/// Runs the controllers until the task is dropped.
pub async fn run(client: kube::Client, ca_pem: String) {
    loop {
        if let Err(error) = namespaces(&client, &ca_pem).await {
            tracing::debug!(%error, "namespaces");
        }
        let pods = Api::<Pod>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map(|l| l.items);
        let nodes = Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map(|l| l.items);
        let sets = Api::<ReplicaSet>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map(|l| l.items);
        if let (Ok(pods), Ok(nodes), Ok(sets)) = (pods, nodes, sets) {
            if let Err(error) = daemonsets(&client, &nodes, &pods).await {
                tracing::debug!(%error, "daemonsets");
            }
            if let Err(error) = deployments(&client, &sets).await {
                tracing::debug!(%error, "deployments");
            }
            replicasets(&client, &sets, &pods).await;
            if let Err(error) = jobs(&client, &pods).await {
                tracing::debug!(%error, "jobs");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Creates each namespace's `default` ServiceAccount and `kube-root-ca.crt` ConfigMap
/// where they are missing.
async fn namespaces(client: &kube::Client, ca_pem: &str) -> kube::Result<()> {
    let lp = ListParams::default();
    let names: Vec<String> = Api::<Namespace>::all(client.clone())
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .map(|n| n.name_any())
        .collect();
    let key = |m: &kube::api::ObjectMeta| {
        (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    };
    let sas: std::collections::HashSet<(String, String)> =
        Api::<ServiceAccount>::all(client.clone())
            .list(&lp)
            .await?
            .items
            .iter()
            .map(|s| key(&s.metadata))
            .collect();
    let cms: std::collections::HashSet<(String, String)> = Api::<ConfigMap>::all(client.clone())
        .list(&lp.clone().fields("metadata.name=kube-root-ca.crt"))
        .await?
        .items
        .iter()
        .map(|c| key(&c.metadata))
        .collect();
    for ns in names {
        if !sas.contains(&(ns.clone(), "default".to_owned())) {
            let sa = ServiceAccount {
                metadata: kube::api::ObjectMeta {
                    name: Some("default".into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            let _ = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
                .create(&PostParams::default(), &sa)
                .await;
        }
        if !cms.contains(&(ns.clone(), "kube-root-ca.crt".to_owned())) {
            let cm = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some("kube-root-ca.crt".into()),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([("ca.crt".to_owned(), ca_pem.to_owned())])),
                ..Default::default()
            };
            let _ = Api::<ConfigMap>::namespaced(client.clone(), &ns)
                .create(&PostParams::default(), &cm)
                .await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_pod(uid: &str, phase: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p", "ownerReferences": [
            {"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": uid, "controller": true}]},
            "status": {"phase": phase}}))
        .expect("pod")
    }

    #[test]
    fn a_job_starts_one_pod_completes_on_success_and_fails_past_its_backoff_limit() {
        let job: Job = serde_json::from_value(json!({"metadata": {"name": "j", "uid": "u"},
            "spec": {"backoffLimit": 1, "template": {}}}))
        .expect("job");
        assert_eq!(job_step(&job, &[]), JobStep::Start);
        assert_eq!(job_step(&job, &[job_pod("u", "Running")]), JobStep::Wait);
        assert_eq!(
            job_step(&job, &[job_pod("other", "Running")]),
            JobStep::Start
        );
        assert_eq!(
            job_step(&job, &[job_pod("u", "Failed")]),
            JobStep::Start,
            "retried"
        );
        assert_eq!(
            job_step(&job, &[job_pod("u", "Failed"), job_pod("u", "Failed")]),
            JobStep::BackoffLimitExceeded
        );
        assert_eq!(
            job_step(&job, &[job_pod("u", "Failed"), job_pod("u", "Succeeded")]),
            JobStep::Complete
        );
        let mut done = job.clone();
        done.status =
            serde_json::from_value(json!({"conditions": [{"type": "Complete", "status": "True"}]}))
                .ok();
        assert_eq!(job_step(&done, &[]), JobStep::Finished);
    }

    fn node(name: &str, ready: bool, labels: serde_json::Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels},
            "spec": {"unschedulable": true},
            "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}}))
        .expect("node")
    }

    #[test]
    fn daemon_pods_go_to_ready_matching_nodes_cordoned_included() {
        let nodes = [
            node("a", true, json!({"disk": "ssd"})),
            node("b", true, json!({})),
            node("c", false, json!({"disk": "ssd"})),
        ];
        let any: PodTemplateSpec =
            serde_json::from_value(json!({"spec": {"containers": []}})).expect("t");
        assert_eq!(daemon_nodes(&any, &nodes), ["a", "b"]);
        let ssd: PodTemplateSpec = serde_json::from_value(
            json!({"spec": {"containers": [], "nodeSelector": {"disk": "ssd"}}}),
        )
        .expect("t");
        assert_eq!(daemon_nodes(&ssd, &nodes), ["a"]);
    }

    #[test]
    fn a_template_change_changes_the_hash() {
        let a: PodTemplateSpec = serde_json::from_value(
            json!({"spec": {"containers": [{"name": "x", "image": "i:1"}]}}),
        )
        .expect("t");
        let b: PodTemplateSpec = serde_json::from_value(
            json!({"spec": {"containers": [{"name": "x", "image": "i:2"}]}}),
        )
        .expect("t");
        assert_eq!(template_hash(&a), template_hash(&a.clone()));
        assert_ne!(template_hash(&a), template_hash(&b));
        assert_eq!(template_hash(&a).len(), 10);
    }
}
