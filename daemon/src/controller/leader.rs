//! Leader election on a `coordination.k8s.io/v1` Lease, so that two controller replicas
//! never act at once: acquire (or take over an expired lease), then renew; a replica
//! that cannot renew stops acting.
//!
//! Why not a crate: kube-runtime 5 (the version this workspace uses) has no leader
//! election, and `kube-lease-manager` would add a dependency (and its own timing of
//! renewals) for what is ~100 lines here whose behaviour the e2e tests pin (one leader
//! acts, a dead leader's lease is taken over after [`LEASE_SECONDS`]). Switch when
//! kube-runtime ships one.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::Lease, apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};

/// Lease duration: a dead leader's lease is taken over after this.
pub const LEASE_SECONDS: i32 = 15;
/// How often the leader renews.
pub const RENEW_INTERVAL: Duration = Duration::from_secs(5);
/// A leader that could not renew for this long stops acting: before its lease can expire
/// for the others (client-go's RenewDeadline), so two never act at once.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often a standby replica tries to take the lease.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// Why a leader stopped leading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// Another replica holds the lease.
    TakenOver,
    /// Renewals failed for longer than [`RENEW_DEADLINE`].
    RenewalFailed(String),
}

impl Lost {
    /// Short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Lost::TakenOver => "taken_over",
            Lost::RenewalFailed(_) => "renewal_failed",
        }
    }
}

/// True when a leader whose last successful renewal was `since_ok` ago must stop acting.
pub fn renewal_expired(since_ok: Duration) -> bool {
    since_ok >= RENEW_DEADLINE
}

/// The decision for one attempt: take or renew the lease, or leave it to its holder.
pub fn may_hold(lease: &Lease, me: &str, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else { return true };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() || holder == me {
        return true;
    }
    let renewed = spec.renew_time.as_ref().map(|t| t.0);
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
    renewed.is_none_or(|r| (now - r).get_seconds() > duration)
}

/// Tries once to take or renew the lease; true when this replica leads.
pub async fn try_acquire(api: &Api<Lease>, name: &str, me: &str) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let mut lease = match api.get_opt(name).await? {
        Some(l) => l,
        None => {
            let l: Lease = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))
                .unwrap_or_default();
            match api.create(&PostParams::default(), &l).await {
                Ok(l) => l,
                Err(kube::Error::Api(e)) if e.code == 409 => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    };
    if !may_hold(&lease, me, now) {
        return Ok(false);
    }
    let spec = lease.spec.get_or_insert_default();
    if spec.holder_identity.as_deref() != Some(me) {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(me.into());
    spec.lease_duration_seconds = Some(LEASE_SECONDS);
    spec.renew_time = Some(MicroTime(now));
    // Replace with the read resourceVersion: a concurrent taker gets 409 and loses.
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// How long a leader told to stop lets its controllers finish their reconciles.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

async fn release_logged(api: &Api<Lease>, name: &str, me: &str) {
    match release(api, name, me).await {
        Ok(true) => tracing::info!(identity = me, lease = name, "lease released"),
        Ok(false) => {}
        Err(error) => tracing::warn!(%error, "cannot release the lease; it expires"),
    }
}

/// Gives the lease up if this replica holds it (an empty holder), so that a standby takes
/// over at its next attempt instead of waiting for the lease to expire — what client-go's
/// `ReleaseOnCancel` does when a leader shuts down.
pub async fn release(api: &Api<Lease>, name: &str, me: &str) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(false);
    };
    if spec.holder_identity.as_deref() != Some(me) {
        return Ok(false);
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until this replica leads, runs `while_leading()` while it keeps renewing, stops
/// it when leadership is lost (reporting why to `on_lost`) and goes back to standby. Returns
/// when `while_leading()` ends (the controllers shut down on SIGTERM), releasing the lease,
/// or when `shutdown` completes while standing by.
pub async fn lead<F, Fut>(
    client: Client,
    namespace: &str,
    name: &str,
    me: &str,
    mut while_leading: F,
    on_lost: impl Fn(&Lost),
    shutdown: impl std::future::Future<Output = ()>,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let acquire = async {
            loop {
                match try_acquire(&api, name, me).await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(error) => tracing::warn!(%error, "lease acquisition failed"),
                }
                tokio::time::sleep(RETRY_PERIOD).await;
            }
        };
        tokio::select! {
            _ = acquire => {}
            _ = &mut shutdown => {
                tracing::info!(identity = me, "standby shutting down");
                return;
            }
        }
        tracing::info!(identity = me, lease = name, "leading");
        let renew = async {
            let mut last_ok = std::time::Instant::now();
            loop {
                tokio::time::sleep(RENEW_INTERVAL).await;
                match try_acquire(&api, name, me).await {
                    Ok(true) => last_ok = std::time::Instant::now(),
                    Ok(false) => return Lost::TakenOver,
                    Err(error) => {
                        tracing::warn!(%error, "lease renewal failed");
                        if renewal_expired(last_ok.elapsed()) {
                            return Lost::RenewalFailed(error.to_string());
                        }
                    }
                }
            }
        };
        let mut leading = std::pin::pin!(while_leading());
        let lost = tokio::select! {
            lost = renew => lost,
            _ = &mut leading => {
                release_logged(&api, name, me).await;
                return;
            }
            _ = &mut shutdown => {
                // The controllers see the same signal and finish their reconciles; one
                // that came before they listened would never end them.
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, &mut leading).await;
                release_logged(&api, name, me).await;
                return;
            }
        };
        tracing::error!(identity = me, lease = name, reason = ?lost, "stopped leading; standing by");
        on_lost(&lost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lease(holder: &str, renewed: &str) -> Lease {
        serde_json::from_value(json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": holder, "renewTime": renewed, "leaseDurationSeconds": 15}})).expect("lease")
    }

    #[test]
    fn a_leader_stops_before_its_lease_can_expire_for_others() {
        assert!(!renewal_expired(RENEW_INTERVAL));
        assert!(renewal_expired(RENEW_DEADLINE));
        assert!(RENEW_DEADLINE < Duration::from_secs(LEASE_SECONDS as u64));
        assert_eq!(Lost::RenewalFailed("x".into()).label(), "renewal_failed");
    }

    #[test]
    fn only_free_own_or_expired_leases_are_taken() {
        let now: Timestamp = "2026-11-22T01:00:00Z".parse().expect("now");
        assert!(may_hold(
            &lease("", "2026-11-22T00:59:59.000000Z"),
            "a",
            now
        ));
        assert!(may_hold(
            &lease("a", "2026-11-22T00:59:59.000000Z"),
            "a",
            now
        ));
        assert!(!may_hold(
            &lease("b", "2026-11-22T00:59:59.000000Z"),
            "a",
            now
        ));
        assert!(
            may_hold(&lease("b", "2026-11-22T00:59:00.000000Z"), "a", now),
            "expired"
        );
    }
}
