//! What the kubelet stand-in reads from a Pod spec besides its containers' images and
//! volumes, as kubelet reads it: the host namespaces (`hostNetwork`, `hostPID`,
//! `hostIPC`), `privileged` and the user a container runs as, and its readiness and
//! liveness probes (`httpGet` over HTTP or HTTPS, `tcpSocket`, `exec`), with their
//! delays, periods and thresholds.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_cri::v1 as cri;
use k8s_openapi::{
    api::core::v1::{Container, PodSpec, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};

/// The namespaces of a Pod's sandbox and containers: kubelet's defaults (Pod network and
/// IPC, a PID namespace per container) or the node's where the spec asks for it.
pub fn namespaces(spec: &PodSpec) -> cri::NamespaceOption {
    let node = cri::NamespaceMode::Node as i32;
    let mut ns = crate::cri::kubelet_namespaces();
    if spec.host_network == Some(true) {
        ns.network = node;
    }
    if spec.host_pid == Some(true) {
        ns.pid = node;
    } else if spec.share_process_namespace == Some(true) {
        ns.pid = cri::NamespaceMode::Pod as i32;
    }
    if spec.host_ipc == Some(true) {
        ns.ipc = node;
    }
    ns
}

/// The size of the user-namespace range each Pod gets: 65536 ids, container ids 0–65535,
/// as kubelet maps a `hostUsers: false` Pod.
pub const USERNS_LENGTH: u32 = 65536;

/// The node's user-namespace ranges, by Pod uid: kubelet's allocator of `hostUsers: false`
/// Pods. Range `n` (from 1) maps container ids 0–65535 to host ids `n × 65536` onwards;
/// a Pod keeps its range until its sandbox is gone.
#[derive(Debug, Clone, Default)]
pub struct UserNamespaces(
    std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, u32>>>,
);

impl UserNamespaces {
    /// The first host id of Pod `uid`'s range (the one it holds, or the lowest free one).
    pub fn allocate(&self, uid: &str) -> u32 {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = held.get(uid) {
            return slot * USERNS_LENGTH;
        }
        let used: std::collections::BTreeSet<u32> = held.values().copied().collect();
        let slot = (1..).find(|s| !used.contains(s)).unwrap_or(1);
        held.insert(uid.to_owned(), slot);
        slot * USERNS_LENGTH
    }

    /// Gives Pod `uid`'s range back.
    pub fn release(&self, uid: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }
}

/// The CRI user-namespace option of a Pod whose range starts at host id `host_id`: one
/// Pod-wide namespace mapping container ids 0–65535 (uids and gids alike).
pub fn user_namespace(host_id: u32) -> cri::UserNamespace {
    let map = vec![cri::IdMapping {
        host_id,
        container_id: 0,
        length: USERNS_LENGTH,
    }];
    cri::UserNamespace {
        mode: cri::NamespaceMode::Pod as i32,
        uids: map.clone(),
        gids: map,
    }
}

/// Whether any container of the Pod is privileged (its sandbox must be too).
pub fn any_privileged(spec: &PodSpec) -> bool {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .any(|c| c.security_context.as_ref().and_then(|s| s.privileged) == Some(true))
}

/// A container's CRI security context: namespaces, `privileged`, user and group (the
/// container's settings over the Pod's).
/// `userns` is the Pod's user namespace (a `hostUsers: false` Pod's), the same as its
/// sandbox's.
pub fn security_context(
    spec: &PodSpec,
    c: &Container,
    userns: Option<cri::UserNamespace>,
) -> cri::LinuxContainerSecurityContext {
    let sc = c.security_context.clone().unwrap_or_default();
    let psc = spec.security_context.clone().unwrap_or_default();
    cri::LinuxContainerSecurityContext {
        namespace_options: Some(cri::NamespaceOption {
            userns_options: userns,
            ..namespaces(spec)
        }),
        privileged: sc.privileged == Some(true),
        run_as_user: sc
            .run_as_user
            .or(psc.run_as_user)
            .map(|value| cri::Int64Value { value }),
        run_as_group: sc
            .run_as_group
            .or(psc.run_as_group)
            .map(|value| cri::Int64Value { value }),
        readonly_rootfs: sc.read_only_root_filesystem == Some(true),
        no_new_privs: sc.allow_privilege_escalation == Some(false),
        capabilities: sc.capabilities.map(|caps| cri::Capability {
            add_capabilities: caps.add.unwrap_or_default(),
            drop_capabilities: caps.drop.unwrap_or_default(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The port a probe names, resolved against the container's named ports.
fn port(c: &Container, p: &IntOrString) -> Option<i32> {
    match p {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name))
            .map(|cp| cp.container_port),
    }
}

/// How one probe is carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// `GET url`: success for a status in 200..400 (TLS not verified, as kubelet).
    Http(String),
    /// A TCP connection to `host:port`.
    Tcp(String),
    /// A command in the container; success for exit 0.
    Exec(Vec<String>),
}

/// The check of `probe` of container `c`, reached at `ip`.
pub fn check(probe: &Probe, c: &Container, ip: &str) -> Option<Check> {
    if let Some(h) = &probe.http_get {
        let scheme = h.scheme.as_deref().unwrap_or("HTTP").to_lowercase();
        let host = h.host.clone().unwrap_or_else(|| ip.to_owned());
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        return Some(Check::Http(format!(
            "{scheme}://{host}:{}{path}",
            port(c, &h.port)?
        )));
    }
    if let Some(t) = &probe.tcp_socket {
        let host = t.host.clone().unwrap_or_else(|| ip.to_owned());
        return Some(Check::Tcp(format!("{host}:{}", port(c, &t.port)?)));
    }
    probe
        .exec
        .as_ref()
        .and_then(|e| e.command.clone())
        .map(Check::Exec)
}

/// One probe's progress: consecutive results and when it last ran.
#[derive(Debug, Clone, Default)]
pub struct ProbeState {
    last: Option<Instant>,
    successes: i32,
    failures: i32,
    /// The probe's verdict so far (readiness starts false, liveness true).
    pub ok: bool,
}

impl ProbeState {
    /// Whether the probe is due at `now` for a container started at `started`.
    pub fn due(&self, probe: &Probe, started: Instant, now: Instant) -> bool {
        let delay = Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).max(0) as u64);
        let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
        now >= started + delay && self.last.is_none_or(|t| now >= t + period)
    }

    /// Records a result; the verdict flips after `successThreshold` successes or
    /// `failureThreshold` failures in a row.
    pub fn record(&mut self, probe: &Probe, success: bool, now: Instant) {
        self.last = Some(now);
        if success {
            self.successes += 1;
            self.failures = 0;
            if self.successes >= probe.success_threshold.unwrap_or(1).max(1) {
                self.ok = true;
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.failures >= probe.failure_threshold.unwrap_or(3).max(1) {
                self.ok = false;
            }
        }
    }
}

/// Runs `check` once (`exec` through the runtime, in container `container_id`).
pub async fn run_check(
    check: &Check,
    cri: &mut crate::cri::Cri,
    container_id: &str,
    timeout: Duration,
) -> bool {
    match check {
        Check::Http(url) => {
            let out = tokio::process::Command::new("curl")
                .args([
                    "--noproxy",
                    "*",
                    "-sk",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                ])
                .arg(format!("{}", timeout.as_secs_f64()))
                .arg(url)
                .output()
                .await;
            out.ok()
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .trim()
                        .parse::<u16>()
                        .ok()
                })
                .is_some_and(|code| (200..400).contains(&code))
        }
        Check::Tcp(addr) => tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
            .await
            .is_ok_and(|r| r.is_ok()),
        Check::Exec(cmd) => cri
            .runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: container_id.into(),
                cmd: cmd.clone(),
                timeout: timeout.as_secs().max(1) as i64,
            })
            .await
            .is_ok_and(|r| r.into_inner().exit_code == 0),
    }
}

/// Runs `probe` if it is due and records the result; returns its verdict.
async fn run_due(
    probe: &Probe,
    state: &mut ProbeState,
    c: &Container,
    container_id: &str,
    started: Instant,
    ip: &str,
    cri: &mut crate::cri::Cri,
) -> bool {
    if state.due(probe, started, Instant::now())
        && let Some(ch) = check(probe, c, ip)
    {
        let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
        let ok = run_check(&ch, cri, container_id, timeout).await;
        state.record(probe, ok, Instant::now());
    }
    state.ok
}

/// The probes of one Pod's containers, by container name.
#[derive(Debug, Default)]
pub struct Probes {
    readiness: HashMap<String, ProbeState>,
    liveness: HashMap<String, ProbeState>,
}

impl Probes {
    /// Runs the due probes of `c` (running as `container_id` since `started`, reachable at
    /// `ip`); returns (ready, alive).
    pub async fn probe(
        &mut self,
        c: &Container,
        container_id: &str,
        started: Instant,
        ip: &str,
        cri: &mut crate::cri::Cri,
    ) -> (bool, bool) {
        let ready = match &c.readiness_probe {
            None => true,
            Some(p) => {
                let state = self.readiness.entry(c.name.clone()).or_default();
                run_due(p, state, c, container_id, started, ip, cri).await
            }
        };
        let alive = match &c.liveness_probe {
            None => true,
            Some(p) => {
                let state = self.liveness.entry(c.name.clone()).or_insert(ProbeState {
                    ok: true,
                    ..Default::default()
                });
                run_due(p, state, c, container_id, started, ip, cri).await
            }
        };
        (ready, alive)
    }

    /// Forgets container `name`'s probes (it restarted: they begin again).
    pub fn reset(&mut self, name: &str) {
        self.readiness.remove(name);
        self.liveness.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn probe(v: serde_json::Value) -> Probe {
        serde_json::from_value(v).expect("probe")
    }

    #[test]
    fn checks_are_built_from_the_probe_and_named_ports() {
        let c: Container = serde_json::from_value(json!({"name": "app",
            "ports": [{"name": "api", "containerPort": 10443}]}))
        .expect("c");
        let p = probe(json!({"httpGet": {"path": "/readyz", "port": "api", "scheme": "HTTPS"}}));
        assert_eq!(
            check(&p, &c, "10.0.0.2"),
            Some(Check::Http("https://10.0.0.2:10443/readyz".into()))
        );
        let p = probe(json!({"tcpSocket": {"port": 8080}}));
        assert_eq!(
            check(&p, &c, "10.0.0.2"),
            Some(Check::Tcp("10.0.0.2:8080".into()))
        );
        let p = probe(json!({"httpGet": {"port": "nope"}}));
        assert_eq!(check(&p, &c, "10.0.0.2"), None);
    }

    #[test]
    fn verdicts_follow_delays_periods_and_thresholds() {
        let p = probe(
            json!({"tcpSocket": {"port": 1}, "initialDelaySeconds": 2, "periodSeconds": 5, "failureThreshold": 2}),
        );
        let t0 = Instant::now();
        let mut s = ProbeState::default();
        assert!(!s.due(&p, t0, t0), "initial delay");
        assert!(s.due(&p, t0, t0 + Duration::from_secs(2)));
        s.record(&p, true, t0 + Duration::from_secs(2));
        assert!(s.ok);
        assert!(!s.due(&p, t0, t0 + Duration::from_secs(3)), "period");
        s.record(&p, false, t0 + Duration::from_secs(7));
        assert!(s.ok, "one failure is below the threshold");
        s.record(&p, false, t0 + Duration::from_secs(12));
        assert!(!s.ok);
    }

    #[test]
    fn host_namespaces_and_privileges_come_from_the_spec() {
        let spec: PodSpec = serde_json::from_value(json!({"hostNetwork": true, "hostPID": true,
            "securityContext": {"runAsUser": 1000},
            "containers": [{"name": "a", "securityContext": {"privileged": true}}, {"name": "b"}]}))
        .expect("spec");
        let ns = namespaces(&spec);
        assert_eq!(ns.network, cri::NamespaceMode::Node as i32);
        assert_eq!(ns.pid, cri::NamespaceMode::Node as i32);
        assert_eq!(ns.ipc, cri::NamespaceMode::Pod as i32);
        assert!(any_privileged(&spec));
        let a = security_context(&spec, &spec.containers[0], None);
        assert!(a.privileged);
        assert_eq!(a.run_as_user.map(|u| u.value), Some(1000));
        assert!(!security_context(&spec, &spec.containers[1], None).privileged);
    }
}
