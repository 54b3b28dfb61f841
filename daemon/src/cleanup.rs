//! What `helm uninstall` runs before and after the release goes. Undoing node preparation: Helm's `pre-delete` hook
//! creates a DaemonSet whose Pods run `podmig prepare-node --uninstall` on every node (an
//! init container; the main container idles) and a Job running `podmig await-daemonset`,
//! which waits until that DaemonSet's Pods are Ready on every node it schedules to — each
//! node then has been cleaned — so that Helm deletes the hook's resources and the release
//! only afterwards. Releasing finalizers (a `post-delete` hook, once the controller is
//! gone): Pods of MigratingPods and podmig's own objects lose `podmig.dev/…` finalizers, so
//! that deleting them later does not wait for a controller that will never come.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::Api;

/// Why waiting for the cleanup failed.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// The API server could not be asked.
    #[error("reading DaemonSet {namespace}/{name}: {source}")]
    Api {
        /// The DaemonSet's namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// Not every node was cleaned in time.
    #[error("DaemonSet {namespace}/{name} not done after {waited_s} s: {state}")]
    Timeout {
        /// The DaemonSet's namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// How long it was waited for.
        waited_s: u64,
        /// What its status said last.
        state: Rollout,
    },
}

/// Where a DaemonSet's rollout stands, from its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollout {
    /// Not yet looked at by the DaemonSet controller (or gone).
    Unobserved,
    /// Some scheduled Pods are not Ready yet.
    Progressing {
        /// Pods Ready.
        ready: i32,
        /// Pods wanted (one per matching node).
        desired: i32,
    },
    /// A Ready Pod on every node it schedules to.
    Done {
        /// Nodes.
        nodes: i32,
    },
}

impl std::fmt::Display for Rollout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rollout::Unobserved => write!(f, "not observed by the DaemonSet controller yet"),
            Rollout::Progressing { ready, desired } => {
                write!(f, "{ready} of {desired} node(s) done")
            }
            Rollout::Done { nodes } => write!(f, "done on {nodes} node(s)"),
        }
    }
}

/// The rollout state a DaemonSet's status shows.
pub fn rollout(ds: Option<&DaemonSet>) -> Rollout {
    let Some(ds) = ds else {
        return Rollout::Unobserved;
    };
    let generation = ds.metadata.generation.unwrap_or(0);
    let Some(st) = ds.status.as_ref() else {
        return Rollout::Unobserved;
    };
    if st.observed_generation.unwrap_or(0) < generation {
        return Rollout::Unobserved;
    }
    let desired = st.desired_number_scheduled;
    let ready = st.number_ready;
    let updated = st.updated_number_scheduled.unwrap_or(ready);
    if ready >= desired && updated >= desired {
        Rollout::Done { nodes: desired }
    } else {
        Rollout::Progressing { ready, desired }
    }
}

/// Waits until DaemonSet `namespace/name` has a Ready Pod on every node it schedules to.
pub async fn await_daemonset(
    client: kube::Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<String, CleanupError> {
    let api: Api<DaemonSet> = Api::namespaced(client, namespace);
    let started = Instant::now();
    loop {
        let ds = match api.get_opt(name).await {
            Ok(ds) => ds,
            // A hook Pod may start before the API answers it well (a busy server, RBAC
            // of the hook still arriving): asked again until the timeout.
            Err(source) if started.elapsed() < timeout => {
                tracing::warn!(daemonset = name, error = %source, "cannot read; asking again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(source) => {
                return Err(CleanupError::Api {
                    namespace: namespace.into(),
                    name: name.into(),
                    source,
                });
            }
        };
        let state = rollout(ds.as_ref());
        if let Rollout::Done { nodes } = state {
            return Ok(format!(
                "podmig await-daemonset: {namespace}/{name} done on {nodes} node(s) after {} ms",
                started.elapsed().as_millis()
            ));
        }
        if started.elapsed() >= timeout {
            return Err(CleanupError::Timeout {
                namespace: namespace.into(),
                name: name.into(),
                waited_s: timeout.as_secs(),
                state,
            });
        }
        tracing::info!(daemonset = name, %state, "waiting");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The finalizers left once podmig's own (`podmig.dev/…`) are taken off, or `None` when
/// there are none of podmig's.
pub fn without_podmig_finalizers(finalizers: &[String]) -> Option<Vec<String>> {
    let kept: Vec<String> = finalizers
        .iter()
        .filter(|f| !f.starts_with(podmig_api::ANNOTATION_PREFIX))
        .cloned()
        .collect();
    (kept.len() != finalizers.len()).then_some(kept)
}

/// [`release_finalizers`], tried again for up to `within` while the API server fails it
/// (a hook Pod may start before the API answers it well); the last error after that.
pub async fn release_finalizers_within(
    client: kube::Client,
    within: Duration,
) -> Result<String, kube::Error> {
    let started = Instant::now();
    loop {
        match release_finalizers(client.clone()).await {
            Err(error) if started.elapsed() < within => {
                tracing::warn!(%error, "cannot release finalizers yet; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            done => return done,
        }
    }
}

/// Takes podmig's finalizers off every MigratingPod's Pods, MigratingPod and Migration, so
/// that nothing waits for a controller that is gone (the chart's `post-delete` hook).
/// Returns what it released.
pub async fn release_finalizers(client: kube::Client) -> Result<String, kube::Error> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{ListParams, Patch, PatchParams};
    use podmig_api::v1alpha1::{MigratingPod, Migration};

    async fn release<K>(api: Api<K>, lp: &ListParams) -> Result<usize, kube::Error>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let mut released = 0;
        for obj in api.list(lp).await?.items {
            let meta = obj.meta();
            let Some(kept) = without_podmig_finalizers(meta.finalizers.as_deref().unwrap_or(&[]))
            else {
                continue;
            };
            let (Some(name), Some(ns)) = (meta.name.clone(), meta.namespace.clone()) else {
                continue;
            };
            let namespaced: Api<K> = Api::namespaced(api.clone().into_client(), &ns);
            let patch = Patch::Merge(serde_json::json!({"metadata": {"finalizers": kept}}));
            match namespaced
                .patch(&name, &PatchParams::default(), &patch)
                .await
            {
                Ok(_) => released += 1,
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(released)
    }

    let pods = release(
        Api::<Pod>::all(client.clone()),
        &ListParams::default().labels(podmig_api::LABEL_MIGRATING_POD),
    )
    .await?;
    let mpods = release(
        Api::<MigratingPod>::all(client.clone()),
        &ListParams::default(),
    )
    .await?;
    let migrations = release(Api::<Migration>::all(client), &ListParams::default()).await?;
    Ok(format!(
        "podmig release-finalizers: released {pods} Pod(s), {mpods} MigratingPod(s), {migrations} Migration(s)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ds(generation: i64, status: serde_json::Value) -> DaemonSet {
        serde_json::from_value(
            json!({"metadata": {"name": "c", "generation": generation}, "status": status}),
        )
        .expect("ds")
    }

    #[test]
    fn done_only_when_every_scheduled_pod_is_ready_for_the_current_generation() {
        assert_eq!(rollout(None), Rollout::Unobserved);
        let fresh = ds(
            1,
            json!({"currentNumberScheduled": 0, "desiredNumberScheduled": 0, "numberMisscheduled": 0, "numberReady": 0}),
        );
        assert_eq!(rollout(Some(&fresh)), Rollout::Unobserved, "not observed");
        let half = ds(
            1,
            json!({"observedGeneration": 1, "currentNumberScheduled": 2, "desiredNumberScheduled": 2, "numberMisscheduled": 0, "numberReady": 1, "updatedNumberScheduled": 2}),
        );
        assert_eq!(
            rollout(Some(&half)),
            Rollout::Progressing {
                ready: 1,
                desired: 2
            }
        );
        let done = ds(
            1,
            json!({"observedGeneration": 1, "currentNumberScheduled": 2, "desiredNumberScheduled": 2, "numberMisscheduled": 0, "numberReady": 2, "updatedNumberScheduled": 2}),
        );
        assert_eq!(rollout(Some(&done)), Rollout::Done { nodes: 2 });
        assert_eq!(
            Rollout::Progressing {
                ready: 1,
                desired: 2
            }
            .to_string(),
            "1 of 2 node(s) done"
        );
    }

    #[test]
    fn only_podmigs_finalizers_are_taken_off() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            without_podmig_finalizers(&f(&["podmig.dev/migrate", "example.com/keep"])),
            Some(f(&["example.com/keep"]))
        );
        assert_eq!(without_podmig_finalizers(&f(&["example.com/keep"])), None);
        assert_eq!(without_podmig_finalizers(&[]), None);
    }
}
