//! A Pod's IP address kept across a move, in the node's network namespace: the pieces the
//! CNI plugin ([`crate::cni`]) and the node daemon share.
//!
//! - **Hold**: while a move is under way the address's traffic is dropped where it enters
//!   or leaves the Pod's host-side device (`FORWARD` rules, tagged with the sandbox that
//!   owns them), and new connections are refused. On the source it starts with the freeze,
//!   so the frozen copy never ACKs, resets or closes a connection the target will carry on;
//!   on the target only the resets are held, during the restore, so no packet that comes
//!   before its socket is answered by one. A client sees only lost packets and
//!   retransmits: TCP goes on.
//! - **Announce**: the target's node marks its /32 route to the Pod with
//!   [`ROUTE_PROTO`], as Calico's BIRD exports a borrowed /32 and Cilium its endpoint
//!   routes; whatever carries routes between nodes (the local cluster's fabric, BGP)
//!   picks it up. Withdrawing is deleting the route.

use std::net::Ipv4Addr;
use std::process::Command;

/// The `proto` of an announced /32 route.
pub use podmig_api::KEPT_IP_ROUTE_PROTO as ROUTE_PROTO;

/// Tag of a hold rule's comment: `podmig-hold:<ip>:<owner sandbox>`.
const HOLD_TAG: &str = "podmig-hold";

/// What went wrong keeping an address.
#[derive(Debug, thiserror::Error)]
pub enum KeepIpError {
    /// A command failed.
    #[error("{command}: {reason}")]
    Command {
        /// The command line.
        command: String,
        /// Its error output or why it could not run.
        reason: String,
    },
    /// The value is not an IPv4 address.
    #[error("{0:?} is not an IPv4 address (podmig keeps IPv4 addresses only)")]
    BadAddress(String),
}

/// Parses an address to keep.
pub fn parse(ip: &str) -> Result<Ipv4Addr, KeepIpError> {
    ip.trim()
        .parse()
        .map_err(|_| KeepIpError::BadAddress(ip.to_owned()))
}

/// Runs `program args…`, returning its output.
pub fn run(program: &str, args: &[&str]) -> Result<String, KeepIpError> {
    let command = || format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| KeepIpError::Command {
            command: command(),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(KeepIpError::Command {
            command: command(),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The device of the `dev` word in one line of `ip -o` output.
fn dev_of(line: &str) -> Option<&str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == "dev")?;
    words.next()
}

/// The device this node reaches `ip` through without a gateway (the address lives here),
/// or `None` when it is routed elsewhere.
pub fn local_device(ip: Ipv4Addr) -> Result<Option<String>, KeepIpError> {
    let out = run("ip", &["-o", "-4", "route", "get", &ip.to_string()])?;
    Ok(device_of_route(&out))
}

/// [`local_device`]'s reading of `ip route get`: the device unless a gateway is on the way
/// or the address is this namespace's own.
pub fn device_of_route(route_get: &str) -> Option<String> {
    let line = route_get.lines().next()?;
    if line.split_whitespace().any(|w| w == "via") || line.starts_with("local ") {
        return None;
    }
    dev_of(line).map(str::to_owned)
}

/// The device holding address `ip` in this namespace (the bridge that is a Pod's gateway).
pub fn device_holding(ip: Ipv4Addr) -> Result<Option<String>, KeepIpError> {
    let out = run(
        "ip",
        &["-o", "-4", "addr", "show", "to", &format!("{ip}/32")],
    )?;
    Ok(out
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .map(|d| d.trim_end_matches(':').to_owned()))
}

fn hold_rules(ip: Ipv4Addr, dev: &str, owner: &str) -> [Vec<String>; 2] {
    let comment = format!("{HOLD_TAG}:{ip}:{owner}");
    let host = format!("{ip}/32");
    let rule = |dir: &str, addr_flag: &str| -> Vec<String> {
        [
            "FORWARD",
            dir,
            dev,
            addr_flag,
            &host,
            "-m",
            "comment",
            "--comment",
            &comment,
            "-j",
            "DROP",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    [rule("-o", "-d"), rule("-i", "-s")]
}

/// `rule` (ending in `-j DROP`) for TCP segments matching `tcp` only, ending in `target`.
fn narrowed(mut rule: Vec<String>, tcp: &[&str], target: &[&str]) -> Vec<String> {
    rule.truncate(rule.len() - 2);
    rule.extend(["-p", "tcp"].iter().chain(tcp).map(|s| (*s).to_owned()));
    rule.push("-j".into());
    rule.extend(target.iter().map(|s| (*s).to_owned()));
    rule
}

/// New connections to `ip` through `dev` are refused (a reset, sent by the node): a client
/// that opens one while the Pod is frozen tries again at once instead of waiting out its
/// SYN retransmission (1 s, then 3 s).
pub fn refuse_new(ip: Ipv4Addr, dev: &str, owner: &str) -> Result<(), KeepIpError> {
    add_rules([refuse_new_rule(ip, dev, owner)])
}

fn refuse_new_rule(ip: Ipv4Addr, dev: &str, owner: &str) -> Vec<String> {
    let [inbound, _] = hold_rules(ip, dev, owner);
    narrowed(
        inbound,
        &["--syn"],
        &["REJECT", "--reject-with", "tcp-reset"],
    )
}

/// Drops `ip`'s traffic to and from `dev` (the Pod's side of this node), tagged as
/// `owner`'s (its sandbox id), near the top of the chain (above any rule that accepts
/// established traffic) but right below a [`refuse_new`] rule set before, so new
/// connections are still refused, not dropped. Idempotent.
pub fn hold(ip: Ipv4Addr, dev: &str, owner: &str) -> Result<(), KeepIpError> {
    let listed = run("iptables", &["-w", "-S", "FORWARD"])?;
    let at = refusal_position(&listed, &format!("{HOLD_TAG}:{ip}:{owner}")).map_or(1, |p| p + 1);
    insert_rules(hold_rules(ip, dev, owner), at)
}

/// The position (1-based, as `iptables -I` counts) of the refusal tagged `tag` in an
/// `iptables -S` listing of one chain. NB: `-S` prints `--syn` as `--tcp-flags
/// FIN,SYN,RST,ACK SYN`; the refusal is the tagged rule that REJECTs.
fn refusal_position(listed: &str, tag: &str) -> Option<usize> {
    listed
        .lines()
        .filter(|l| l.starts_with("-A "))
        .position(|l| l.contains("REJECT") && l.contains(tag))
        .map(|i| i + 1)
}

/// Drops only the resets `ip` sends from `dev`, and refuses new connections: while a
/// target restores, a packet that comes before its socket is answered by a reset the
/// client must never see (it retransmits instead); everything else flows, so nothing waits
/// for a retransmission timeout.
pub fn hold_resets(ip: Ipv4Addr, dev: &str, owner: &str) -> Result<(), KeepIpError> {
    let [_, outbound] = hold_rules(ip, dev, owner);
    let resets = narrowed(outbound, &["--tcp-flags", "RST", "RST"], &["DROP"]);
    add_rules([resets, refuse_new_rule(ip, dev, owner)])
}

/// Inserts each of `rules` on top of its chain unless it is there already.
fn add_rules<const N: usize>(rules: [Vec<String>; N]) -> Result<(), KeepIpError> {
    insert_rules(rules, 1)
}

/// Inserts each of `rules` at position `at` of its chain unless it is there already.
fn insert_rules<const N: usize>(rules: [Vec<String>; N], at: usize) -> Result<(), KeepIpError> {
    let at = at.to_string();
    for rule in rules {
        let args: Vec<&str> = rule.iter().map(String::as_str).collect();
        let mut check = vec!["-w", "-C"];
        check.extend(&args);
        if run("iptables", &check).is_ok() {
            continue;
        }
        let mut insert = vec!["-w", "-I", args[0], at.as_str()];
        insert.extend(&args[1..]);
        run("iptables", &insert)?;
    }
    Ok(())
}

/// The rules of an `iptables -S FORWARD` listing that `owner` set: each with its address
/// and its specification (without `-A`, the comment unquoted — our tags have no spaces).
fn owned_rules<'a>(listed: &'a str, owner: &str) -> Vec<(Option<Ipv4Addr>, Vec<&'a str>)> {
    let suffix = format!(":{owner}");
    listed
        .lines()
        .filter_map(|l| l.strip_prefix("-A "))
        .filter_map(|rest| {
            let words: Vec<&str> = rest
                .split_whitespace()
                .map(|w| w.trim_matches('"'))
                .collect();
            let tag = words.iter().find_map(|w| {
                w.strip_prefix(&format!("{HOLD_TAG}:"))?
                    .strip_suffix(&suffix)
            })?;
            Some((tag.parse().ok(), words))
        })
        .collect()
}

/// The addresses `owner`'s hold rules are for.
pub fn held_addresses(owner: &str) -> Result<Vec<Ipv4Addr>, KeepIpError> {
    let listed = run("iptables", &["-w", "-S", "FORWARD"])?;
    let mut out: Vec<Ipv4Addr> = owned_rules(&listed, owner)
        .into_iter()
        .filter_map(|(ip, _)| ip)
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// The addresses `owner`'s hold rules are for, each with the device they hold it on.
fn held_on(listed: &str, owner: &str) -> Vec<(Ipv4Addr, String)> {
    let mut out: Vec<(Ipv4Addr, String)> = owned_rules(listed, owner)
        .into_iter()
        .filter_map(|(ip, words)| {
            let dev = words
                .windows(2)
                .find(|w| w[0] == "-o" || w[0] == "-i")
                .map(|w| w[1].to_owned())?;
            Some((ip?, dev))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A source that runs on after a move of its address failed: its hold rules go, and an
/// address the node no longer routes to the Pod (the target's announcement replaced this
/// node's own, then was withdrawn) is announced again from here — else the address's
/// traffic would go to the node its address block belongs to. Returns the addresses
/// announced again.
pub fn release_and_reclaim(owner: &str) -> Result<Vec<Ipv4Addr>, KeepIpError> {
    let listed = run("iptables", &["-w", "-S", "FORWARD"])?;
    let held = held_on(&listed, owner);
    release(owner)?;
    let mut announced = Vec::new();
    for (ip, dev) in held {
        if local_device(ip)?.as_deref() != Some(dev.as_str()) {
            announce(ip, &dev)?;
            announced.push(ip);
        }
    }
    Ok(announced)
}

/// Removes every hold rule `owner` set; returns how many went.
pub fn release(owner: &str) -> Result<usize, KeepIpError> {
    let listed = run("iptables", &["-w", "-S", "FORWARD"])?;
    let owned = owned_rules(&listed, owner);
    for (_, words) in &owned {
        let mut args = vec!["-w", "-D"];
        args.extend(words);
        run("iptables", &args)?;
    }
    Ok(owned.len())
}

/// The rules of an `iptables -S FORWARD` listing that hold `ip` for an owner other than
/// `owner`, each as its specification (without `-A`, the comment unquoted).
fn others_holds<'a>(listed: &'a str, ip: Ipv4Addr, owner: &str) -> Vec<Vec<&'a str>> {
    let prefix = format!("{HOLD_TAG}:{ip}:");
    listed
        .lines()
        .filter_map(|l| l.strip_prefix("-A "))
        .map(|rest| {
            rest.split_whitespace()
                .map(|w| w.trim_matches('"'))
                .collect::<Vec<&str>>()
        })
        .filter(|words| {
            words.iter().any(|w| {
                w.strip_prefix(&prefix)
                    .is_some_and(|other| !other.is_empty() && other != owner)
            })
        })
        .collect()
}

/// A target takes `ip` on this node: holds of the same address that another sandbox of
/// this node set when the address left it (a move that committed; its copy is gone or
/// going) would drop the new Pod's traffic on the same bridge until that sandbox's
/// removal released them. They go now. Returns how many rules went.
pub fn release_others(ip: Ipv4Addr, owner: &str) -> Result<usize, KeepIpError> {
    let listed = run("iptables", &["-w", "-S", "FORWARD"])?;
    let stale = others_holds(&listed, ip, owner);
    for words in &stale {
        let mut args = vec!["-w", "-D"];
        args.extend(words);
        run("iptables", &args)?;
    }
    Ok(stale.len())
}

/// Forgets this node's neighbour entry of `ip` on `dev`: an address that comes back to a
/// node it left may still be cached there with the link-layer address of the Pod that had
/// it before (its sandbox gone or going), and frames to it would be lost until the entry
/// aged out (tens of seconds); the next packet resolves the address afresh.
pub fn forget_neighbour(ip: Ipv4Addr, dev: &str) -> Result<(), KeepIpError> {
    run(
        "ip",
        &["neigh", "flush", "to", &format!("{ip}/32"), "dev", dev],
    )
    .map(drop)
}

/// Routes `ip` to `dev` on this node without announcing it (the target before its restore).
pub fn route_here(ip: Ipv4Addr, dev: &str) -> Result<(), KeepIpError> {
    run("ip", &["route", "replace", &format!("{ip}/32"), "dev", dev]).map(drop)
}

/// Marks `ip`'s route to `dev` as announced: the rest of the network sends it here.
pub fn announce(ip: Ipv4Addr, dev: &str) -> Result<(), KeepIpError> {
    run(
        "ip",
        &[
            "route",
            "replace",
            &format!("{ip}/32"),
            "dev",
            dev,
            "proto",
            ROUTE_PROTO,
        ],
    )
    .map(drop)
}

/// Deletes this node's /32 route of `ip` to a local device (announced or not); routes
/// learned from other nodes (`via`) stay.
pub fn unroute(ip: Ipv4Addr) -> Result<(), KeepIpError> {
    let listed = run("ip", &["-o", "-4", "route", "show", &format!("{ip}/32")])?;
    for line in listed.lines() {
        if line.split_whitespace().any(|w| w == "via") {
            continue;
        }
        if let Some(dev) = dev_of(line) {
            run("ip", &["route", "del", &format!("{ip}/32"), "dev", dev])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_through_a_gateway_is_not_local() {
        assert_eq!(
            device_of_route("10.1.1.5 via 10.1.0.1 dev eth0 src 10.1.0.11 uid 0 \\    cache"),
            None
        );
        assert_eq!(
            device_of_route("10.1.1.5 dev cni0 src 10.1.2.1 uid 0 \\    cache"),
            Some("cni0".into())
        );
        assert_eq!(
            device_of_route("local 10.1.2.1 dev lo src 10.1.2.1 uid 0"),
            None
        );
    }

    #[test]
    fn another_sandboxs_holds_of_the_address_are_found_and_no_others() {
        let listed = "-P FORWARD ACCEPT\n-A FORWARD -d 10.1.1.5/32 -o cni0 -m comment --comment \"podmig-hold:10.1.1.5:old\" -j DROP\n-A FORWARD -s 10.1.1.5/32 -i cni0 -m comment --comment podmig-hold:10.1.1.5:old -j DROP\n-A FORWARD -d 10.1.1.5/32 -o cni0 -m comment --comment podmig-hold:10.1.1.5:new -j DROP\n-A FORWARD -d 10.1.1.50/32 -o cni0 -m comment --comment podmig-hold:10.1.1.50:old -j DROP\n";
        let stale = others_holds(listed, Ipv4Addr::new(10, 1, 1, 5), "new");
        assert_eq!(stale.len(), 2, "{stale:?}");
        assert!(
            stale
                .iter()
                .all(|w| w.contains(&"podmig-hold:10.1.1.5:old"))
        );
        assert!(others_holds(listed, Ipv4Addr::new(10, 1, 1, 6), "new").is_empty());
    }

    #[test]
    fn only_the_owners_rules_are_found() {
        let listed = "-P FORWARD ACCEPT\n-A FORWARD -d 10.1.1.5/32 -o cni0 -m comment --comment \"podmig-hold:10.1.1.5:abc\" -j DROP\n-A FORWARD -d 10.1.1.6/32 -o cni0 -m comment --comment podmig-hold:10.1.1.6:xyz -j DROP\n";
        let mine = owned_rules(listed, "abc");
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].0, Some(Ipv4Addr::new(10, 1, 1, 5)));
        assert!(
            mine[0].1.contains(&"podmig-hold:10.1.1.5:abc"),
            "{:?}",
            mine[0].1
        );
        assert!(owned_rules(listed, "ab").is_empty());
        // With the device each is held on, once per address.
        let both = format!(
            "{listed}-A FORWARD -s 10.1.1.5/32 -i cni0 -m comment --comment podmig-hold:10.1.1.5:abc -j DROP\n"
        );
        assert_eq!(
            held_on(&both, "abc"),
            [("10.1.1.5".parse().expect("ip"), "cni0".to_owned())]
        );
    }

    #[test]
    fn the_drop_goes_right_below_the_refusal() {
        let listed = "-P FORWARD ACCEPT\n-A FORWARD -j PMSVC-REJ\n-A FORWARD -d 10.1.1.5/32 -o cni0 -p tcp -m comment --comment podmig-hold:10.1.1.5:abc -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REJECT --reject-with tcp-reset\n";
        assert_eq!(
            refusal_position(listed, "podmig-hold:10.1.1.5:abc"),
            Some(2)
        );
        assert_eq!(refusal_position(listed, "podmig-hold:10.1.1.5:other"), None);
    }

    #[test]
    fn hold_rules_carry_their_owner() {
        let [inbound, outbound] = hold_rules(Ipv4Addr::new(10, 1, 1, 5), "cni0", "abc");
        assert_eq!(
            inbound.join(" "),
            "FORWARD -o cni0 -d 10.1.1.5/32 -m comment --comment podmig-hold:10.1.1.5:abc -j DROP"
        );
        assert!(outbound.join(" ").contains("-i cni0 -s 10.1.1.5/32"));
        assert_eq!(
            refuse_new_rule(Ipv4Addr::new(10, 1, 1, 5), "cni0", "abc").join(" "),
            "FORWARD -o cni0 -d 10.1.1.5/32 -m comment --comment podmig-hold:10.1.1.5:abc -p tcp --syn -j REJECT --reject-with tcp-reset"
        );
        assert!(parse("10.1.1.5").is_ok());
        assert!(parse("fe80::1").is_err());
    }
}
