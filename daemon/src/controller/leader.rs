//! Leader election on a `coordination.k8s.io/v1` Lease, so that two controller replicas
//! never act at once: acquire (or take over an expired lease), then renew; a replica
//! that cannot renew stops acting.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::Lease, apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};

/// Lease duration: a dead leader's lease is taken over after this.
pub const LEASE_SECONDS: i32 = 15;

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

/// Waits until this replica leads, then keeps renewing; resolves when leadership is lost.
pub async fn lead(
    client: Client,
    namespace: &str,
    name: &str,
    me: &str,
    while_leading: impl std::future::Future<Output = ()>,
) {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    loop {
        match try_acquire(&api, name, me).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "lease acquisition failed"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    tracing::info!(identity = me, lease = name, "leading");
    let renew = async {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            match try_acquire(&api, name, me).await {
                Ok(true) => {}
                Ok(false) => return tracing::error!("lease lost to another replica"),
                Err(error) => tracing::warn!(%error, "lease renewal failed"),
            }
        }
    };
    tokio::select! {
        _ = renew => {}
        _ = while_leading => {}
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
