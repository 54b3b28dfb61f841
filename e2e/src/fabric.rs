//! The local cluster's fabric: the root namespace routes each node's Pod subnet to it, like
//! a top-of-rack router. A node announces a Pod address it took over from another node by
//! a /32 route to the Pod with podmig's `proto` ([`podmig_api::KEPT_IP_ROUTE_PROTO`]),
//! as Calico's BIRD exports a borrowed /32; the fabric learns it, like a BGP route
//! reflector, into the root namespace and every other node, and forgets it when the route
//! goes. One `ip monitor route` per node, tracked by pid.

use std::{
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
};

use crate::{cluster::Network, process::Proc};

/// A node's route change that matters to the fabric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announcement {
    /// The node routes this /32 to one of its Pods.
    Added(Ipv4Addr),
    /// It no longer does.
    Withdrawn(Ipv4Addr),
}

/// Reads one line of `ip -o monitor route`: announcements only (a bare address — a /32 —
/// with podmig's proto, not through a gateway).
pub fn announcement(line: &str) -> Option<Announcement> {
    let (deleted, rest) = match line.trim().strip_prefix("Deleted ") {
        Some(rest) => (true, rest),
        None => (false, line.trim()),
    };
    let words: Vec<&str> = rest.split_whitespace().collect();
    let ip: Ipv4Addr = words.first()?.parse().ok()?;
    let proto = words
        .windows(2)
        .any(|w| w[0] == "proto" && w[1] == podmig_api::KEPT_IP_ROUTE_PROTO);
    if !proto || words.contains(&"via") {
        return None;
    }
    Some(if deleted {
        Announcement::Withdrawn(ip)
    } else {
        Announcement::Added(ip)
    })
}

/// The route reflector: stops its monitors when dropped.
pub struct Fabric {
    _monitors: Vec<Proc>,
}

impl Fabric {
    /// Starts watching every node's routes; pids recorded in `dir`'s state.
    pub fn start(network: &Network, nodes: usize, dir: &Path) -> anyhow::Result<Self> {
        let mut monitors = Vec::new();
        for i in 0..nodes {
            let mut cmd = Command::new("ip");
            cmd.args(["-n", &network.netns(i), "-o", "monitor", "route"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let mut proc = Proc::spawn("ip monitor", cmd)?;
            crate::cluster::track_pid_in(dir, proc.pid())?;
            let out = proc
                .take_stdout()
                .ok_or_else(|| anyhow::anyhow!("ip monitor has no stdout"))?;
            let network = network.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(a) = announcement(&line) {
                        learn(&network, nodes, i, a);
                    }
                }
            });
            monitors.push(proc);
        }
        Ok(Self {
            _monitors: monitors,
        })
    }
}

/// Routes (or stops routing) an address announced by node `from` to it, everywhere else.
fn learn(network: &Network, nodes: usize, from: usize, a: Announcement) {
    let (verb, ip) = match a {
        Announcement::Added(ip) => ("replace", ip),
        Announcement::Withdrawn(ip) => ("del", ip),
    };
    let host = format!("{ip}/32");
    let via = network.node_ip(from);
    let args = ["route", verb, host.as_str(), "via", via.as_str()];
    let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
    for j in (0..nodes).filter(|j| *j != from) {
        let ns = network.netns(j);
        let _ = Command::new("ip")
            .args(["-n", ns.as_str()])
            .args(args)
            .stderr(Stdio::null())
            .status();
    }
    tracing::info!(%ip, node = from, ?a, "fabric learned a route");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_announced_host_routes_count() {
        let ip = Ipv4Addr::new(10, 150, 1, 5);
        assert_eq!(
            announcement("10.150.1.5 dev cni0 proto 211 scope link "),
            Some(Announcement::Added(ip))
        );
        assert_eq!(
            announcement("Deleted 10.150.1.5 dev cni0 proto 211 scope link "),
            Some(Announcement::Withdrawn(ip))
        );
        assert_eq!(announcement("10.150.1.5 dev cni0 scope link "), None);
        assert_eq!(announcement("10.150.1.0/24 dev cni0 proto 211"), None);
        assert_eq!(
            announcement("10.150.1.5 via 10.150.0.12 dev eth0 proto 211"),
            None
        );
    }
}
