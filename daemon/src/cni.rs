//! `podmig-cni`: a chained CNI plugin that gives a migration target's sandbox the source
//! Pod's address, the way Calico's IPAM honours an IP reservation annotation.
//!
//! It runs after the interface plugin (`bridge`, …) and passes its result through, except
//! for a Pod annotated [`podmig_api::ANNOTATION_POD_IP`]: that Pod must be a target
//! podmig's controller made ([`crate::node::trust`]), its source must run on another node
//! with exactly that address, and then the sandbox's interface gets the address as a /32
//! (default route through the node's gateway) and the node routes it to the Pod's device
//! without announcing it: the node daemon announces it when it restores the Pod
//! ([`crate::keepip`]). On `DEL` it removes what it and the daemon set up for the sandbox.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::keepip::{self, KeepIpError};

/// The CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];

/// How long a target's record may take to appear (the controller writes it right after it
/// creates the Pod).
const RECORD_WAIT: Duration = Duration::from_secs(10);

/// Why the plugin failed (printed as a CNI error).
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The network configuration on stdin is not what the plugin needs.
    #[error("bad network configuration: {0}")]
    Config(String),
    /// The API server could not be asked.
    #[error("cannot ask the API server: {0}")]
    Api(String),
    /// The Pod asks for an address it may not have.
    #[error("Pod {namespace}/{pod} may not take address {ip}: {why}")]
    Refused {
        /// Namespace.
        namespace: String,
        /// The Pod.
        pod: String,
        /// The address asked for.
        ip: String,
        /// Why not.
        why: String,
    },
    /// Setting the address up failed.
    #[error(transparent)]
    Network(#[from] KeepIpError),
}

impl CniError {
    /// The CNI error code (`11`: try again later; `100`+: plugin-specific).
    pub fn code(&self) -> u32 {
        match self {
            CniError::Config(_) => 7,
            CniError::Api(_) => 11,
            CniError::Refused { .. } => 100,
            CniError::Network(_) => 101,
        }
    }
}

/// The plugin's part of the network configuration.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// CNI version of the configuration.
    pub cni_version: String,
    /// The node's credentials for reading Pods and MigratingPods.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The interface plugin's result.
    #[serde(default)]
    pub prev_result: Option<Value>,
}

/// What the runtime passes in the environment.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    /// `ADD`, `DEL`, `CHECK`, `VERSION`.
    pub command: String,
    /// The sandbox's id.
    pub container_id: String,
    /// The sandbox's network namespace.
    pub netns: String,
    /// Its interface.
    pub ifname: String,
    /// `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, …).
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    /// Reads the `CNI_*` variables.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: parse_args(&var("CNI_ARGS")),
        }
    }
}

/// `K=V;K=V` into a map.
pub fn parse_args(s: &str) -> BTreeMap<String, String> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Runs one invocation: the JSON to print on success (`None`: print nothing).
pub fn run(inv: &Invocation, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if inv.command == "VERSION" {
        return Ok(Some(json!({
            "cniVersion": "1.0.0",
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf: NetConf =
        serde_json::from_slice(stdin).map_err(|e| CniError::Config(e.to_string()))?;
    match inv.command.as_str() {
        "ADD" => add(inv, &conf).map(Some),
        "DEL" => del(inv, &conf).map(|()| None),
        "CHECK" => Ok(None),
        other => Err(CniError::Config(format!("unknown CNI_COMMAND {other:?}"))),
    }
}

/// The CNI error object for `e`.
pub fn error_json(version: &str, e: &CniError) -> Value {
    json!({"cniVersion": version, "code": e.code(), "msg": e.to_string()})
}

fn add(inv: &Invocation, conf: &NetConf) -> Result<Value, CniError> {
    let mut result = conf.prev_result.clone().ok_or_else(|| {
        CniError::Config("podmig-cni is chained after an interface plugin (no prevResult)".into())
    })?;
    let (Some(namespace), Some(pod)) = (
        inv.args.get("K8S_POD_NAMESPACE"),
        inv.args.get("K8S_POD_NAME"),
    ) else {
        return Ok(result);
    };
    let Some(kubeconfig) = &conf.kubeconfig else {
        return Ok(result);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::Api(e.to_string()))?;
    let Some(ip) = runtime.block_on(address_to_keep(kubeconfig, namespace, pod))? else {
        return Ok(result);
    };
    let ips = result["ips"].as_array().cloned().unwrap_or_default();
    let first = ips
        .iter()
        .find(|c| c["address"].as_str().is_some_and(|a| a.contains('.')))
        .ok_or_else(|| CniError::Config("the interface plugin gave no IPv4 address".into()))?;
    let gateway = first["gateway"]
        .as_str()
        .and_then(|g| g.parse::<Ipv4Addr>().ok())
        .ok_or_else(|| CniError::Config("the interface plugin gave no IPv4 gateway".into()))?;
    let device = keepip::device_holding(gateway)?.ok_or_else(|| {
        CniError::Config(format!(
            "no device of this node holds the gateway {gateway}"
        ))
    })?;
    take_address(inv, ip, gateway)?;
    // Routed here but not announced: the network sends the address here only once the
    // node daemon restored the Pod's sockets.
    keepip::route_here(ip, &device)?;
    let mut kept = first.clone();
    kept["address"] = json!(format!("{ip}/32"));
    result["ips"] = json!([kept]);
    result["routes"] = json!([{"dst": "0.0.0.0/0", "gw": gateway.to_string()}]);
    Ok(result)
}

/// Gives the sandbox's interface `ip`/32 instead of what the interface plugin assigned,
/// with the node's gateway on the link.
fn take_address(inv: &Invocation, ip: Ipv4Addr, gateway: Ipv4Addr) -> Result<(), CniError> {
    let net = format!("--net={}", inv.netns);
    let dev = inv.ifname.as_str();
    let gw = gateway.to_string();
    let steps: [&[&str]; 4] = [
        &["-4", "addr", "flush", "dev", dev],
        &["addr", "add", &format!("{ip}/32"), "dev", dev],
        &["route", "add", &gw, "dev", dev, "scope", "link"],
        &["route", "add", "default", "via", &gw, "dev", dev],
    ];
    for step in steps {
        let mut args = vec![net.as_str(), "ip"];
        args.extend(step);
        keepip::run("nsenter", &args)?;
    }
    Ok(())
}

/// The address Pod `namespace/pod` is to keep: `None` when it asks for none or its source
/// runs on this very node (two sandboxes of one node cannot share an address: it gets a
/// new one and the move closes its connections); an error when it may not have it.
async fn address_to_keep(
    kubeconfig: &std::path::Path,
    namespace: &str,
    pod: &str,
) -> Result<Option<Ipv4Addr>, CniError> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| CniError::Api(format!("{}: {e}", kubeconfig.display())))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| CniError::Api(e.to_string()))?;
    let client =
        crate::kubeclient::from_config(config).map_err(|e| CniError::Api(e.to_string()))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let me = pods
        .get_opt(pod)
        .await
        .map_err(|e| CniError::Api(e.to_string()))?
        .ok_or_else(|| CniError::Api(format!("Pod {namespace}/{pod} not found")))?;
    let Some(asked) = me.annotations().get(podmig_api::ANNOTATION_POD_IP).cloned() else {
        return Ok(None);
    };
    let refused = |why: String| CniError::Refused {
        namespace: namespace.into(),
        pod: pod.into(),
        ip: asked.clone(),
        why,
    };
    let ip = keepip::parse(&asked).map_err(|e| refused(e.to_string()))?;
    let verified = crate::node::trust::verify_within(&client, namespace, pod, RECORD_WAIT)
        .await
        .map_err(|e| refused(e.to_string()))?;
    let here = me.spec.as_ref().and_then(|s| s.node_name.clone());
    if verified.source_node.is_some() && verified.source_node == here {
        return Ok(None);
    }
    let source = pods
        .get_opt(&verified.source_pod)
        .await
        .map_err(|e| CniError::Api(e.to_string()))?
        .ok_or_else(|| refused(format!("its source {} is gone", verified.source_pod)))?;
    if source.uid().as_deref() != Some(verified.source_uid.as_str()) {
        return Err(refused(format!(
            "Pod {} is not the source the move records",
            verified.source_pod
        )));
    }
    let source_ip = source.status.as_ref().and_then(|s| s.pod_ip.clone());
    if source_ip.as_deref() != Some(asked.as_str()) {
        return Err(refused(format!(
            "its source {} has address {}",
            verified.source_pod,
            source_ip.unwrap_or_else(|| "none".into())
        )));
    }
    Ok(Some(ip))
}

fn del(inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    // The /32 this plugin gave the sandbox is routed to it; the hold rules it (or the
    // daemon, for a source) set carry the sandbox's id.
    let kept = conf
        .prev_result
        .as_ref()
        .and_then(|r| r["ips"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| c["address"].as_str().map(str::to_owned))
        .filter_map(|a| {
            a.strip_suffix("/32")
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        })
        .collect::<Vec<_>>();
    for ip in kept {
        keepip::unroute(ip)?;
    }
    if !inv.container_id.is_empty() {
        keepip::release(&inv.container_id)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_are_read() {
        let a = parse_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=app-1");
        assert_eq!(a.get("K8S_POD_NAME").map(String::as_str), Some("app-1"));
        assert_eq!(
            a.get("K8S_POD_NAMESPACE").map(String::as_str),
            Some("default")
        );
    }

    #[test]
    fn a_pod_without_the_annotation_keeps_the_interface_plugins_result() {
        let prev = json!({"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.1.2.7/24", "gateway": "10.1.2.1", "interface": 2}]});
        let conf = serde_json::to_vec(
            &json!({"cniVersion": "0.4.0", "name": "n", "type": "podmig-cni", "prevResult": prev}),
        )
        .expect("json");
        let inv = Invocation {
            command: "ADD".into(),
            ..Default::default()
        };
        assert_eq!(run(&inv, &conf).expect("passes through"), Some(prev));
    }

    #[test]
    fn add_without_a_previous_result_is_a_configuration_error() {
        let conf = br#"{"cniVersion": "0.4.0", "name": "n", "type": "podmig-cni"}"#;
        let inv = Invocation {
            command: "ADD".into(),
            ..Default::default()
        };
        let e = run(&inv, conf).expect_err("refused");
        assert_eq!(e.code(), 7);
        assert!(e.to_string().contains("chained"), "{e}");
    }
}
