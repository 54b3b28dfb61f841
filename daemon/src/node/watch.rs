//! The watch of the Pods bound to this node (`spec.nodeName=<node>`), like kubelet's
//! config source: every change becomes a `Sync` update of the Pod's worker and the cache
//! the HTTP API validates requests against.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use podmig_cri_ext::engine::CheckpointEngine;

use super::{
    podsync::PodUpdate,
    shared::{Node, lock},
};

/// Watches this node's Pods until the task is dropped.
pub async fn run<E: CheckpointEngine>(node: Arc<Node<E>>) {
    let Some(client) = node.kube.clone() else {
        return;
    };
    let api: kube::Api<Pod> = kube::Api::all(client);
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={}", node.settings.node_name));
    let mut stream = watcher(api, config).boxed();
    let mut seen_in_init = std::collections::HashSet::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => seen_in_init.clear(),
            Ok(watcher::Event::InitApply(p)) => {
                if let Some(uid) = p.metadata.uid.clone() {
                    seen_in_init.insert(uid);
                }
                apply(&node, p);
            }
            Ok(watcher::Event::InitDone) => {
                // Pods that vanished while the watch was down.
                let gone: Vec<String> = lock(&node.pods)
                    .keys()
                    .filter(|u| !seen_in_init.contains(*u))
                    .cloned()
                    .collect();
                for uid in gone {
                    lock(&node.pods).remove(&uid);
                    node.dispatch(&uid, PodUpdate::Gone);
                }
                node.journal
                    .forget_moved_away(|uid| !seen_in_init.contains(uid));
            }
            Ok(watcher::Event::Apply(p)) => apply(&node, p),
            Ok(watcher::Event::Delete(p)) => {
                if let Some(uid) = p.metadata.uid.clone() {
                    lock(&node.pods).remove(&uid);
                    node.dispatch(&uid, PodUpdate::Gone);
                    node.journal.forget_moved_away(|u| u == uid);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "pod watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

fn apply<E: CheckpointEngine>(node: &Arc<Node<E>>, pod: Pod) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    lock(&node.pods).insert(uid.clone(), pod.clone());
    node.dispatch(&uid, PodUpdate::Sync(Box::new(pod)));
}
