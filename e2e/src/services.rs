//! Services in the local cluster, as upstream does them. The API server allocates each
//! Service a ClusterIP (and NodePorts); this module is the rest:
//!
//! - **EndpointSlice controller** (kube-controller-manager's): one slice per Service with a
//!   selector, an endpoint per selected Pod that has an address, with upstream's
//!   conditions — `serving` is the Pod's readiness, `terminating` is its deletion, and
//!   `ready` is `serving and not terminating` — so a Pod being deleted (a migrate-on-delete
//!   source held by its finalizer) stays a `serving`, `terminating` endpoint while its
//!   readiness holds. Pods that ended (`Succeeded`, `Failed`) are left out.
//! - **Service proxy** (kube-proxy's iptables mode) for the host and every node: a `nat`
//!   chain DNATs each ClusterIP port (and, on nodes, each NodePort of the node's address,
//!   masqueraded as upstream does) to the ready endpoints, chosen at random; with none
//!   ready, to the serving terminating ones (upstream's fallback); with none of either, the
//!   `filter` chain rejects the port, so a client gets "connection refused" at once.
//!
//! Not modelled: `sessionAffinity`, `externalTrafficPolicy`/`internalTrafficPolicy`
//! (always `Cluster`), topology hints, UDP/SCTP, named `targetPort`s of different numbers
//! per Pod (the first selected Pod's container port is used), headless Services' DNS (no
//! cluster DNS), `LoadBalancer` beyond its NodePorts, hairpin traffic (a Pod reaching
//! itself through its Service), IPv6.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};

/// The label naming a slice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming who manages a slice (upstream's controller's value).
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

fn is_ready(p: &Pod) -> bool {
    crate::wait::is_ready(p)
}

fn selects(selector: &BTreeMap<String, String>, p: &Pod) -> bool {
    let labels = p.labels();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The container port a Service port's `targetPort` names on `p` (a number as it is).
fn target_port(port: &k8s_openapi::api::core::v1::ServicePort, p: Option<&Pod>) -> Option<i32> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => p?
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .map(|cp| cp.container_port),
    }
}

/// The EndpointSlice the controller keeps for Service `svc` given every Pod of its
/// namespace, as JSON for server-side apply; `None` for a Service without a selector.
pub fn endpoint_slice(svc: &Service, pods: &[Pod]) -> Option<Value> {
    let spec = svc.spec.as_ref()?;
    let selector = spec.selector.clone().filter(|s| !s.is_empty())?;
    let name = svc.name_any();
    let mut selected: Vec<&Pod> = pods
        .iter()
        .filter(|p| selects(&selector, p))
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .is_some_and(|ip| !ip.is_empty())
        })
        .collect();
    selected.sort_by_key(|p| p.name_any());
    let endpoints: Vec<Value> = selected
        .iter()
        .map(|p| {
            let terminating = p.metadata.deletion_timestamp.is_some();
            let serving = is_ready(p);
            json!({
                "addresses": [p.status.as_ref().and_then(|s| s.pod_ip.clone())],
                "conditions": {"ready": serving && !terminating, "serving": serving, "terminating": terminating},
                "nodeName": p.spec.as_ref().and_then(|s| s.node_name.clone()),
                "targetRef": {"kind": "Pod", "namespace": p.namespace(), "name": p.name_any(), "uid": p.uid()},
            })
        })
        .collect();
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|port| {
            let target = target_port(port, selected.first().copied())?;
            Some(json!({
                "name": port.name.clone().unwrap_or_default(),
                "port": target,
                "protocol": port.protocol.clone().unwrap_or_else(|| "TCP".into()),
            }))
        })
        .collect();
    Some(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": svc.namespace(),
            "labels": {SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name,
                                 "uid": svc.uid(), "controller": true, "blockOwnerDeletion": true}],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }))
}

/// Keeps every Service's EndpointSlice up to date: on every change of a Pod or Service
/// (watched), at the latest every second.
pub async fn run_endpoint_slices(client: kube::Client) {
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let _wakers = Wakers(vec![
        spawn_waker::<Pod>(client.clone(), wake.clone()),
        spawn_waker::<Service>(client.clone(), wake.clone()),
    ]);
    let mut last: BTreeMap<(String, String), Value> = BTreeMap::new();
    loop {
        if let Err(error) = sync_slices(&client, &mut last).await {
            tracing::debug!(%error, "endpoint slices");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
    }
}

async fn sync_slices(
    client: &kube::Client,
    last: &mut BTreeMap<(String, String), Value>,
) -> kube::Result<()> {
    let lp = ListParams::default();
    let services = Api::<Service>::all(client.clone()).list(&lp).await?.items;
    let pods = Api::<Pod>::all(client.clone()).list(&lp).await?.items;
    for svc in &services {
        let ns = svc.namespace().unwrap_or_default();
        let mine: Vec<Pod> = pods
            .iter()
            .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
            .cloned()
            .collect();
        let Some(slice) = endpoint_slice(svc, &mine) else {
            continue;
        };
        let key = (ns.clone(), svc.name_any());
        if last.get(&key) == Some(&slice) {
            continue;
        }
        Api::<EndpointSlice>::namespaced(client.clone(), &ns)
            .patch(
                &svc.name_any(),
                &PatchParams::apply("endpointslice-controller").force(),
                &Patch::Apply(&slice),
            )
            .await?;
        last.insert(key, slice);
    }
    Ok(())
}

/// Watch tasks that end with their owner (an aborted controller task drops them).
struct Wakers(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Wakers {
    fn drop(&mut self) {
        for w in &self.0 {
            w.abort();
        }
    }
}

/// Wakes `wake` on every event of a watch of all `K` (backing off while the API server
/// cannot be reached).
fn spawn_waker<K>(
    client: kube::Client,
    wake: std::sync::Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    tokio::spawn(async move {
        let mut events = kube::runtime::watcher(Api::<K>::all(client), Default::default())
            .default_backoff()
            .boxed();
        while let Some(e) = events.next().await {
            if e.is_ok() {
                wake.notify_one();
            }
        }
    })
}

/// One Service port as the proxy programs it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProxiedPort {
    /// The ClusterIP.
    pub cluster_ip: String,
    /// The Service port.
    pub port: i32,
    /// Its NodePort, if any.
    pub node_port: Option<i32>,
    /// Where it goes: `ip:port`, the ready endpoints or (none ready) the serving
    /// terminating ones; empty: nowhere (rejected).
    pub backends: Vec<String>,
}

/// What the proxy programs for Services and their slices: per TCP port, upstream's choice
/// of endpoints.
pub fn proxied_ports(services: &[Service], slices: &[EndpointSlice]) -> Vec<ProxiedPort> {
    let mut out = Vec::new();
    for svc in services {
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let Some(cip) = spec
            .cluster_ip
            .clone()
            .filter(|c| !c.is_empty() && c != "None")
        else {
            continue;
        };
        let mine: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|s| {
                s.namespace() == svc.namespace()
                    && s.labels().get(SERVICE_NAME_LABEL) == Some(&svc.name_any())
            })
            .collect();
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let name = port.name.clone().unwrap_or_default();
            let pick =
                |want: &dyn Fn(&k8s_openapi::api::discovery::v1::EndpointConditions) -> bool| {
                    let mut set = BTreeSet::new();
                    for s in &mine {
                        let Some(target) = s
                            .ports
                            .iter()
                            .flatten()
                            .find(|p| p.name.clone().unwrap_or_default() == name)
                            .and_then(|p| p.port)
                        else {
                            continue;
                        };
                        for e in &s.endpoints {
                            let cond = e.conditions.clone().unwrap_or_default();
                            if want(&cond) {
                                for a in &e.addresses {
                                    set.insert(format!("{a}:{target}"));
                                }
                            }
                        }
                    }
                    set.into_iter().collect::<Vec<_>>()
                };
            let ready = pick(&|c| c.ready.unwrap_or(false));
            let backends = if ready.is_empty() {
                pick(&|c| c.serving.unwrap_or(false) && c.terminating.unwrap_or(false))
            } else {
                ready
            };
            out.push(ProxiedPort {
                cluster_ip: cip.clone(),
                port: port.port,
                node_port: port.node_port,
                backends,
            });
        }
    }
    out.sort();
    out
}

/// The proxy's chains in one namespace (`node_ip`: a node's address, for its NodePorts;
/// `None` on the host), as `iptables-restore --noflush` input: `<chain>` in `nat` (DNAT),
/// `<chain>-MASQ` in `nat` (NodePort traffic masqueraded), `<chain>-REJ` in `filter`.
pub fn rules(chain: &str, ports: &[ProxiedPort], node_ip: Option<&str>) -> String {
    let mut nat = vec![
        format!(":{chain} - [0:0]"),
        format!(":{chain}-MASQ - [0:0]"),
    ];
    let mut filter = vec![format!(":{chain}-REJ - [0:0]")];
    let dnat = |out: &mut Vec<String>, matcher: &str, backends: &[String]| {
        let n = backends.len();
        for (i, b) in backends.iter().enumerate() {
            let left = n - i;
            let chance = if left > 1 {
                format!(
                    " -m statistic --mode random --probability {:.5}",
                    1.0 / left as f64
                )
            } else {
                String::new()
            };
            out.push(format!(
                "-A {chain} {matcher}{chance} -j DNAT --to-destination {b}"
            ));
        }
    };
    for p in ports {
        let cluster = format!("-d {}/32 -p tcp -m tcp --dport {}", p.cluster_ip, p.port);
        if p.backends.is_empty() {
            filter.push(format!(
                "-A {chain}-REJ {cluster} -j REJECT --reject-with tcp-reset"
            ));
            continue;
        }
        dnat(&mut nat, &cluster, &p.backends);
        if let (Some(np), Some(ip)) = (p.node_port, node_ip) {
            let node = format!("-d {ip}/32 -p tcp -m tcp --dport {np}");
            nat.push(format!(
                "-A {chain} {node} -j MARK --set-xmark 0x4000/0x4000"
            ));
            dnat(&mut nat, &node, &p.backends);
        }
    }
    nat.push(format!(
        "-A {chain}-MASQ -m mark --mark 0x4000/0x4000 -j MASQUERADE"
    ));
    format!(
        "*nat\n{}\nCOMMIT\n*filter\n{}\nCOMMIT\n",
        nat.join("\n"),
        filter.join("\n")
    )
}

/// The jumps from a namespace's built-in chains into the proxy's, as `iptables` arguments
/// with `op` (`-C`, `-I`, `-D`).
fn hooks(chain: &str, op: &str) -> Vec<Vec<String>> {
    [
        ("nat", "PREROUTING", chain.to_owned()),
        ("nat", "OUTPUT", chain.to_owned()),
        ("nat", "POSTROUTING", format!("{chain}-MASQ")),
        ("filter", "OUTPUT", format!("{chain}-REJ")),
        ("filter", "FORWARD", format!("{chain}-REJ")),
    ]
    .into_iter()
    .map(|(table, builtin, target)| {
        ["-w", "-t", table, op, builtin, "-j", target.as_str()]
            .map(str::to_owned)
            .to_vec()
    })
    .collect()
}

/// `program` in `netns` (the host's when `None`).
fn in_netns(netns: Option<&str>, program: &str) -> std::process::Command {
    match netns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => std::process::Command::new(program),
    }
}

fn apply(chain: &str, netns: Option<&str>, input: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = in_netns(netns, "iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "iptables-restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (check, insert) in hooks(chain, "-C").into_iter().zip(hooks(chain, "-I")) {
        if in_netns(netns, "iptables")
            .args(&check)
            .output()?
            .status
            .success()
        {
            continue;
        }
        let out = in_netns(netns, "iptables").args(&insert).output()?;
        anyhow::ensure!(
            out.status.success(),
            "iptables {}: {}",
            insert.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Removes the proxy's hooks and chains from `netns` (the host's when `None`).
pub fn remove(chain: &str, netns: Option<&str>) {
    for args in hooks(chain, "-D") {
        let _ = in_netns(netns, "iptables").args(&args).output();
    }
    for (table, c) in [
        ("nat", chain.to_owned()),
        ("nat", format!("{chain}-MASQ")),
        ("filter", format!("{chain}-REJ")),
    ] {
        for op in ["-F", "-X"] {
            let _ = in_netns(netns, "iptables")
                .args(["-w", "-t", table, op, &c])
                .output();
        }
    }
}

/// Where the proxy programs Services: the host (`None`) and each node (its namespace and
/// address).
#[derive(Debug, Clone)]
pub struct ProxyTarget {
    /// The network namespace (`None`: the host's).
    pub netns: Option<String>,
    /// The node's address, for NodePorts.
    pub node_ip: Option<String>,
}

/// Programs every target's rules on every change of a Service or EndpointSlice (watched).
pub async fn run_proxy(client: kube::Client, chain: String, targets: Vec<ProxyTarget>) {
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let _wakers = Wakers(vec![
        spawn_waker::<Service>(client.clone(), wake.clone()),
        spawn_waker::<EndpointSlice>(client.clone(), wake.clone()),
    ]);
    let mut last: Option<Vec<ProxiedPort>> = None;
    loop {
        let lp = ListParams::default();
        let listed: kube::Result<Vec<ProxiedPort>> = async {
            let services = Api::<Service>::all(client.clone()).list(&lp).await?.items;
            let slices = Api::<EndpointSlice>::all(client.clone())
                .list(&lp)
                .await?
                .items;
            Ok(proxied_ports(&services, &slices))
        }
        .await;
        match listed {
            Ok(ports) if last.as_ref() != Some(&ports) => {
                let mut ok = true;
                for t in &targets {
                    let input = rules(&chain, &ports, t.node_ip.as_deref());
                    let chain = chain.clone();
                    let netns = t.netns.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        apply(&chain, netns.as_deref(), &input)
                    })
                    .await;
                    if !matches!(r, Ok(Ok(()))) {
                        tracing::warn!(?r, netns = ?t.netns, "service proxy: cannot program");
                        ok = false;
                    }
                }
                if ok {
                    last = Some(ports);
                }
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "service proxy"),
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, ready: bool, deleting: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "uid": name, "labels": {"app": "a"},
                         "deletionTimestamp": if deleting { json!("2026-12-02T00:00:00Z") } else { Value::Null }},
            "spec": {"nodeName": "node-0", "containers": [{"name": "c", "image": "i", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .expect("pod")
    }

    fn service() -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "s", "namespace": "default", "uid": "u"},
            "spec": {"selector": {"app": "a"}, "clusterIP": "10.9.200.1",
                     "ports": [{"name": "web", "port": 80, "targetPort": "http", "nodePort": 30001}]},
        }))
        .expect("service")
    }

    #[test]
    fn a_pod_being_deleted_is_terminating_and_still_serving_while_ready() {
        let slice = endpoint_slice(
            &service(),
            &[
                pod("old", "10.0.1.2", true, true),
                pod("new", "10.0.2.2", false, false),
            ],
        )
        .expect("slice");
        let by_name = |n: &str| {
            slice["endpoints"]
                .as_array()
                .expect("endpoints")
                .iter()
                .find(|e| e["targetRef"]["name"] == n)
                .expect("endpoint")
                .clone()
        };
        assert_eq!(
            by_name("old")["conditions"],
            json!({"ready": false, "serving": true, "terminating": true})
        );
        assert_eq!(
            by_name("new")["conditions"],
            json!({"ready": false, "serving": false, "terminating": false})
        );
        assert_eq!(
            slice["ports"],
            json!([{"name": "web", "port": 8080, "protocol": "TCP"}])
        );
    }

    #[test]
    fn the_proxy_falls_back_to_serving_terminating_endpoints_only_when_none_is_ready() {
        let slices = |pods: &[Pod]| -> Vec<EndpointSlice> {
            vec![
                serde_json::from_value(endpoint_slice(&service(), pods).expect("slice"))
                    .expect("typed"),
            ]
        };
        let draining = slices(&[
            pod("old", "10.0.1.2", true, true),
            pod("new", "10.0.2.2", false, false),
        ]);
        let ports = proxied_ports(&[service()], &draining);
        assert_eq!(ports[0].backends, vec!["10.0.1.2:8080".to_owned()]);
        let moved = slices(&[
            pod("old", "10.0.1.2", true, true),
            pod("new", "10.0.2.2", true, false),
        ]);
        assert_eq!(
            proxied_ports(&[service()], &moved)[0].backends,
            vec!["10.0.2.2:8080".to_owned()]
        );
        let none = slices(&[pod("old", "10.0.1.2", false, true)]);
        let ports = proxied_ports(&[service()], &none);
        assert!(ports[0].backends.is_empty());
        let r = rules("PMSVC", &ports, Some("10.0.0.10"));
        assert!(
            r.contains("-A PMSVC-REJ -d 10.9.200.1/32 -p tcp -m tcp --dport 80 -j REJECT"),
            "{r}"
        );
    }

    #[test]
    fn rules_spread_over_backends_and_serve_node_ports_masqueraded() {
        let p = ProxiedPort {
            cluster_ip: "10.9.200.1".into(),
            port: 80,
            node_port: Some(30001),
            backends: vec!["10.0.1.2:8080".into(), "10.0.2.2:8080".into()],
        };
        let r = rules("PMSVC", std::slice::from_ref(&p), Some("10.0.0.10"));
        assert!(r.contains("-A PMSVC -d 10.9.200.1/32 -p tcp -m tcp --dport 80 -m statistic --mode random --probability 0.50000 -j DNAT --to-destination 10.0.1.2:8080"), "{r}");
        assert!(r.contains("-A PMSVC -d 10.9.200.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.2.2:8080"), "{r}");
        assert!(
            r.contains("-A PMSVC -d 10.0.0.10/32 -p tcp -m tcp --dport 30001 -j MARK"),
            "{r}"
        );
        assert!(
            r.contains("-A PMSVC-MASQ -m mark --mark 0x4000/0x4000 -j MASQUERADE"),
            "{r}"
        );
        let host = rules("PMSVC", &[p], None);
        assert!(!host.contains("30001"), "the host has no NodePorts: {host}");
    }
}
