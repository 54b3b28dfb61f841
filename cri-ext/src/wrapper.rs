//! The logic of `podmig-runc`, the OCI runtime wrapper that containerd runs instead of
//! runc for the `podmig` runtime handler. Every runc invocation passes through unchanged
//! (same arguments, stdio, pid via `exec`, exit code) except:
//! - `create` of a migration target → `runc restore` of the checkpoint the daemon names;
//! - `start` after such a restore → no-op (the process already runs);
//! - `kill` of a Pod under migration → held until the daemon has taken the checkpoint;
//! - `delete` of a container that is already gone → success.
//!
//! Sandbox containers and containers outside a Pod never cost a socket round-trip; every
//! other intercepted command costs at most one.

use std::{
    ffi::{OsStr, OsString},
    io::Write,
    os::unix::process::{CommandExt, ExitStatusExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    Error, Result,
    engine::{create_private_dir, log_tail},
    hook::HookClient,
    identity::Annotations,
    proto::hook::v1::{
        ContainerIdentity, Event, HookRequest, RestoreFrom, RestoreResult,
        hook_response::Decision as Answer,
    },
};

/// Default socket of the node daemon's runtime hook.
pub const DEFAULT_HOOK_SOCKET: &str = "/run/podmig/hook.sock";

/// How the wrapper is configured (read once from the environment by the binary).
#[derive(Debug, Clone)]
pub struct Config {
    /// The real runc.
    pub runc: PathBuf,
    /// The node daemon's hook socket.
    pub hook_socket: PathBuf,
    /// Bound on one hook round-trip.
    pub hook_timeout: Duration,
    /// The CRIU runc restores with (`--criu`); `None`: runc's own choice (`criu` in PATH).
    pub criu: Option<PathBuf>,
}

/// Where `podmig prepare-node` installs CRIU on a node.
pub const NODE_CRIU: &str = "/opt/podmig/bin/criu";

/// runc's global flags that take a value (`runc --help`, 1.1).
const GLOBAL_VALUE_FLAGS: &[&str] = &["--root", "--log", "--log-format", "--criu", "--rootless"];

/// A runc command line split into global flags, subcommand and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// Global flags exactly as given (forwarded to every runc call the wrapper makes).
    pub globals: Vec<OsString>,
    /// The subcommand (`create`, `start`, …); empty when none was given.
    pub command: String,
    /// Arguments after the subcommand.
    pub args: Vec<OsString>,
}

fn flag_value(args: &[OsString], names: &[&str]) -> Option<OsString> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        for n in names {
            if s == *n {
                return it.next().cloned();
            }
            if let Some(v) = s.strip_prefix(&format!("{n}=")) {
                return Some(v.into());
            }
        }
    }
    None
}

impl Invocation {
    /// Splits `args` (without argv\[0\]).
    pub fn parse(args: &[OsString]) -> Self {
        let mut i = 0;
        while i < args.len() {
            let s = args[i].to_string_lossy();
            if !s.starts_with('-') {
                break;
            }
            let takes_value = GLOBAL_VALUE_FLAGS.contains(&s.as_ref());
            i += if takes_value { 2 } else { 1 };
        }
        let i = i.min(args.len());
        Self {
            globals: args[..i].to_vec(),
            command: args
                .get(i)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default(),
            args: args.get(i + 1..).map(<[_]>::to_vec).unwrap_or_default(),
        }
    }

    /// runc's `--root`, with runc's own default.
    pub fn root(&self) -> PathBuf {
        flag_value(&self.globals, &["--root"])
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/runc"))
    }

    /// The `--log` file the shim reads runc's errors from.
    pub fn log_file(&self) -> Option<PathBuf> {
        flag_value(&self.globals, &["--log"]).map(PathBuf::from)
    }

    fn log_json(&self) -> bool {
        flag_value(&self.globals, &["--log-format"]).is_some_and(|f| f == "json")
    }

    /// The last positional argument: the container id of create/start/kill/delete.
    /// For `kill ID [SIGNAL]` use [`Invocation::kill_target`].
    fn positionals(&self, value_flags: &[&str]) -> Vec<OsString> {
        let mut out = Vec::new();
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            let s = a.to_string_lossy();
            if s.starts_with('-') {
                if value_flags.contains(&s.as_ref()) {
                    it.next();
                }
            } else {
                out.push(a.clone());
            }
        }
        out
    }

    /// The container id and signal of `kill [--all] ID [SIGNAL]`.
    pub fn kill_target(&self) -> Option<(String, String)> {
        let pos = self.positionals(&[]);
        let id = pos.first()?.to_string_lossy().into_owned();
        let sig = pos
            .get(1)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "SIGTERM".into());
        Some((id, sig))
    }

    /// The container id of `start|delete [flags] ID`.
    pub fn single_id(&self) -> Option<String> {
        self.positionals(&[])
            .last()
            .map(|s| s.to_string_lossy().into_owned())
    }
}

/// The parts of `runc create` the wrapper needs to turn it into `runc restore`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateArgs {
    /// Container id.
    pub id: String,
    /// OCI bundle.
    pub bundle: PathBuf,
    /// Where runc writes the container's pid.
    pub pid_file: Option<OsString>,
    /// Console socket for terminals.
    pub console_socket: Option<OsString>,
    /// `--no-pivot`.
    pub no_pivot: bool,
    /// `--no-new-keyring`.
    pub no_new_keyring: bool,
}

const CREATE_VALUE_FLAGS: &[&str] = &[
    "--bundle",
    "-b",
    "--pid-file",
    "--console-socket",
    "--preserve-fds",
];

impl CreateArgs {
    /// Parses the arguments of `runc create`.
    pub fn parse(args: &[OsString]) -> Result<Self> {
        let inv = Invocation {
            globals: vec![],
            command: "create".into(),
            args: args.to_vec(),
        };
        let id = inv
            .positionals(CREATE_VALUE_FLAGS)
            .last()
            .map(|s| s.to_string_lossy().into_owned())
            .ok_or_else(|| Error::Usage("create without a container id".into()))?;
        let has = |f: &str| args.iter().any(|a| a == f);
        Ok(Self {
            id,
            // runc's default bundle is the working directory.
            bundle: flag_value(args, &["--bundle", "-b"])
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(".")),
            pid_file: flag_value(args, &["--pid-file"]),
            console_socket: flag_value(args, &["--console-socket"]),
            no_pivot: has("--no-pivot"),
            no_new_keyring: has("--no-new-keyring"),
        })
    }

    /// The `runc restore` command line that replaces this create.
    pub fn restore_args(
        &self,
        globals: &[OsString],
        from: &RestoreFrom,
        work: &Path,
    ) -> Vec<OsString> {
        let mut a: Vec<OsString> = globals.to_vec();
        a.push("restore".into());
        a.push("--detach".into());
        a.push("--bundle".into());
        a.push(self.bundle.clone().into());
        a.push("--image-path".into());
        a.push(from.image_path.clone().into());
        a.push("--work-path".into());
        a.push(work.into());
        if let Some(p) = &self.pid_file {
            a.push("--pid-file".into());
            a.push(p.clone());
        }
        if let Some(s) = &self.console_socket {
            a.push("--console-socket".into());
            a.push(s.clone());
        }
        if self.no_pivot {
            a.push("--no-pivot".into());
        }
        if from.tcp_established {
            a.push("--tcp-established".into());
        }
        if from.lazy_pages {
            a.push("--lazy-pages".into());
        }
        a.push(self.id.clone().into());
        a
    }
}

/// The node's CRIU settings for runc (`/etc/criu/runc.conf`).
pub const RUNC_CRIU_CONF: &str = "/etc/criu/runc.conf";

/// runc's annotation naming the CRIU configuration file of one container's restore.
const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";

/// CRIU settings for one restore: the node's own (`runc.conf`), with established TCP
/// connections restored (`keep`: the container kept its address, they go on) or closed
/// (`tcp-close`: a new address; the clients reconnect). podmig's dumps never close them,
/// so the restore can choose — unless the node's own settings say `tcp-close` (a
/// `runc.conf` podmig did not write): its dumps carry no connection state, and the restore
/// must close them too.
pub fn restore_conf(node_conf: &str, keep: bool) -> String {
    let keep = keep && !node_conf.lines().any(|l| l.trim() == "tcp-close");
    let mut out: String = node_conf
        .lines()
        .filter(|l| !matches!(l.trim(), "tcp-close" | "tcp-established"))
        .flat_map(|l| [l, "\n"])
        .collect();
    out.push_str("tcp-established\n");
    if !keep {
        out.push_str("tcp-close\n");
    }
    out
}

/// The CRIU settings file of a restored container (beside its marker): runc reads it for
/// the restore and, as the container's `org.criu.config`, for every later checkpoint of
/// it, so after the restore it holds the node's settings.
pub fn criu_conf_of(marker: &Path) -> PathBuf {
    marker.with_extension("criu.conf")
}

/// Points this container's restore at its CRIU settings ([`restore_conf`]) in `conf`,
/// named by runc's `org.criu.config` annotation in the bundle, which runc reads instead of
/// the node's `runc.conf`.
fn connections_conf(bundle: &Path, conf: &Path, node_conf: &str, keep: bool) -> Result<()> {
    std::fs::write(conf, restore_conf(node_conf, keep)).map_err(|e| Error::io("write", conf, e))?;
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
    let mut spec: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::RestoreFailed(format!("{}: {e}", path.display())))?;
    let Some(obj) = spec.as_object_mut() else {
        return Err(Error::RestoreFailed(format!(
            "{} is not a JSON object",
            path.display()
        )));
    };
    let annotations = obj
        .entry("annotations")
        .or_insert_with(|| serde_json::json!({}));
    if let Some(a) = annotations.as_object_mut() {
        a.insert(
            CRIU_CONFIG_ANNOTATION.into(),
            conf.display().to_string().into(),
        );
    }
    let out = serde_json::to_vec(&spec)
        .map_err(|e| Error::RestoreFailed(format!("{}: {e}", path.display())))?;
    std::fs::write(&path, out).map_err(|e| Error::io("write", &path, e))
}

/// Marker left by a restore so the following `start` becomes a no-op; lives beside
/// runc's state root (not inside it: `runc list` reads every entry there).
pub fn restored_marker(root: &Path, id: &str) -> PathBuf {
    let mut dir = root.as_os_str().to_owned();
    dir.push(".podmig");
    PathBuf::from(dir).join(id)
}

/// Runs the wrapper for one invocation; returns the exit code when it does not `exec` runc.
pub fn run(cfg: &Config, args: Vec<OsString>) -> i32 {
    let inv = Invocation::parse(&args);
    let outcome = match inv.command.as_str() {
        "create" => create(cfg, &inv),
        "start" => start(&inv),
        "kill" => kill(cfg, &inv),
        "delete" => return delete(cfg, &inv, &args),
        _ => Ok(Step::Exec),
    };
    match outcome {
        Ok(Step::Exec) => exec_runc(cfg, &inv, &args),
        Ok(Step::Exit(code)) => code,
        Err(e) => {
            log(&inv, "error", &e.to_string());
            1
        }
    }
}

/// What the wrapper does after its own part.
enum Step {
    /// Replace this process by runc with the original arguments.
    Exec,
    /// Exit with this code.
    Exit(i32),
}

fn exec_runc(cfg: &Config, inv: &Invocation, args: &[OsString]) -> i32 {
    let err = Command::new(&cfg.runc).args(args).exec();
    log(
        inv,
        "error",
        &format!("cannot exec {}: {err}", cfg.runc.display()),
    );
    127
}

fn hook_call(cfg: &Config, req: &HookRequest) -> Result<(HookClient, Answer)> {
    let mut client = HookClient::connect(&cfg.hook_socket, cfg.hook_timeout)?;
    let resp = client.call(req, cfg.hook_timeout)?;
    let answer = resp.decision.ok_or_else(|| Error::Hook {
        path: cfg.hook_socket.clone(),
        source: std::io::Error::other("empty answer"),
    })?;
    Ok((client, answer))
}

fn create(cfg: &Config, inv: &Invocation) -> Result<Step> {
    let Ok(create) = CreateArgs::parse(&inv.args) else {
        return Ok(Step::Exec); // runc reports its own usage errors
    };
    let Ok(ann) = Annotations::from_bundle(&create.bundle) else {
        return Ok(Step::Exec);
    };
    if ann.is_sandbox() || !ann.is_pod_container() {
        return Ok(Step::Exec);
    }
    let target = ann.is_migration_target();
    let identity = ann.identity(&create.id, &create.bundle, &inv.root());
    let req = HookRequest {
        event: Event::Create as i32,
        container: Some(identity.clone()),
        ..Default::default()
    };
    let (client, answer) = match hook_call(cfg, &req) {
        Ok(x) => x,
        // Fail-safe: never start a migration target fresh while its other copy may run.
        Err(e) if target => {
            return Err(Error::Refused(format!(
                "container {} of pod {}/{} is a migration target and the podmig node daemon \
                 cannot be asked for its checkpoint ({e}); refusing to start it fresh",
                identity.container_name, identity.pod_namespace, identity.pod_name
            )));
        }
        Err(_) => return Ok(Step::Exec),
    };
    let (client, answer) = match answer {
        // The daemon fetches the checkpoint (a dump, maybe on another node): wait as long
        // as the move's own deadline says, not the short round-trip bound.
        Answer::Hold(h) => {
            log(
                inv,
                "info",
                &format!(
                    "create of {} waits up to {} ms for its checkpoint",
                    create.id, h.timeout_ms
                ),
            );
            let mut client = client;
            let wait = Duration::from_millis(h.timeout_ms) + Duration::from_secs(1);
            match client.recv(wait).map(|r| r.decision) {
                Ok(Some(a)) => (client, a),
                Ok(None) | Err(_) => {
                    return Err(Error::Refused(format!(
                        "container {} of pod {}/{} is a migration target and no checkpoint \
                         arrived within {} ms; refusing to start it fresh",
                        identity.container_name,
                        identity.pod_namespace,
                        identity.pod_name,
                        h.timeout_ms
                    )));
                }
            }
        }
        other => (client, other),
    };
    match answer {
        Answer::RestoreFrom(from) => restore(cfg, inv, &create, &identity, &from, client),
        Answer::Refuse(r) => Err(Error::Refused(format!(
            "podmig refused to create container {}: {}",
            identity.container_name, r.reason
        ))),
        _ => Ok(Step::Exec),
    }
}

fn restore(
    cfg: &Config,
    inv: &Invocation,
    create: &CreateArgs,
    identity: &ContainerIdentity,
    from: &RestoreFrom,
    mut client: HookClient,
) -> Result<Step> {
    let root = inv.root();
    let marker = restored_marker(&root, &create.id);
    let work = if from.work_path.is_empty() {
        marker.with_extension("work")
    } else {
        PathBuf::from(&from.work_path)
    };
    create_private_dir(&work)?;
    let started = Instant::now();
    // The source's writable layer goes into this container's fresh root first, its
    // volumes into the target's mounts.
    let images = Path::new(&from.image_path);
    let layer = crate::rootfs::bundle_rootfs(&create.bundle)
        .ok_or_else(|| Error::RestoreFailed("the bundle names no root file system".into()))
        .and_then(|rootfs| crate::rootfs::apply(images, &rootfs))
        .and_then(|_| {
            crate::volumes::apply(images, &crate::volumes::bundle_mounts(&create.bundle))
        });
    let mut globals = inv.globals.clone();
    if let Some(criu) = cfg
        .criu
        .as_ref()
        .filter(|_| !inv.globals.iter().any(|g| g == "--criu"))
    {
        globals.insert(0, criu.clone().into());
        globals.insert(0, "--criu".into());
    }
    let node_conf = std::fs::read_to_string(RUNC_CRIU_CONF).unwrap_or_default();
    let layer = layer.and_then(|l| {
        let conf = criu_conf_of(&marker);
        if let Some(parent) = conf.parent() {
            create_private_dir(parent)?;
        }
        connections_conf(
            &create.bundle,
            &conf,
            &node_conf,
            from.tcp_established && !from.tcp_close,
        )?;
        Ok(l)
    });
    let status = match &layer {
        Ok(_) => Some(
            Command::new(&cfg.runc)
                .args(create.restore_args(&globals, from, &work))
                .status()
                .map_err(|source| Error::Spawn {
                    command: cfg.runc.display().to_string(),
                    source,
                })?,
        ),
        Err(_) => None,
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    let result = match (status, layer) {
        (Some(status), _) if status.success() => {
            if let Some(parent) = marker.parent() {
                create_private_dir(parent)?;
            }
            std::fs::write(&marker, b"").map_err(|e| Error::io("write", &marker, e))?;
            log(
                inv,
                "info",
                &format!(
                    "restored {} from {} in {duration_ms} ms",
                    create.id, from.image_path
                ),
            );
            Ok(Step::Exit(0))
        }
        (Some(status), _) => {
            let why = log_tail(&work.join("restore.log")).unwrap_or_default();
            // runc normally removes a failed container itself; make sure nothing is left.
            let _ = Command::new(&cfg.runc)
                .args(&inv.globals)
                .args(["delete", "--force", &create.id])
                .stderr(Stdio::null())
                .status();
            Err(Error::RestoreFailed(format!(
                "restore of container {} (pod {}/{}) from {} failed ({status}): {why}",
                identity.container_name, identity.pod_namespace, identity.pod_name, from.image_path
            )))
        }
        (None, layer) => Err(Error::RestoreFailed(format!(
            "restore of container {} (pod {}/{}): {}",
            identity.container_name,
            identity.pod_namespace,
            identity.pod_name,
            layer.err().map(|e| e.to_string()).unwrap_or_default()
        ))),
    };
    let report = HookRequest {
        event: Event::Restored as i32,
        container: Some(identity.clone()),
        restore_result: Some(RestoreResult {
            ok: result.is_ok(),
            error: result
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default(),
            duration_ms,
            criu_ms: crate::criu_log::elapsed_ms(&work.join("restore.log")).unwrap_or(0),
        }),
        ..Default::default()
    };
    if let Err(e) = client.send(&report) {
        log(
            inv,
            "warning",
            &format!("cannot report restore outcome: {e}"),
        );
    }
    // The container's later checkpoints read the same file: from now on the node's own.
    let _ = std::fs::write(criu_conf_of(&marker), restore_conf(&node_conf, true));
    if from.work_path.is_empty() && result.is_ok() {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

fn start(inv: &Invocation) -> Result<Step> {
    let Some(id) = inv.single_id() else {
        return Ok(Step::Exec);
    };
    let marker = restored_marker(&inv.root(), &id);
    if marker.exists() {
        let _ = std::fs::remove_file(&marker);
        log(
            inv,
            "info",
            &format!("start of restored container {id} is a no-op"),
        );
        return Ok(Step::Exit(0));
    }
    Ok(Step::Exec)
}

fn kill(cfg: &Config, inv: &Invocation) -> Result<Step> {
    let Some((id, signal)) = inv.kill_target() else {
        return Ok(Step::Exec);
    };
    let root = inv.root();
    let Ok((ann, bundle)) = Annotations::from_runc_state(&root, &id) else {
        return Ok(Step::Exec);
    };
    if ann.is_sandbox() || !ann.is_pod_container() {
        return Ok(Step::Exec);
    }
    let identity = ann.identity(&id, bundle.as_deref().unwrap_or(Path::new("")), &root);
    let req = HookRequest {
        event: Event::Kill as i32,
        container: Some(identity),
        signal,
        ..Default::default()
    };
    // Fail-safe: an unreachable daemon never blocks a kill.
    let Ok((mut client, answer)) = hook_call(cfg, &req) else {
        return Ok(Step::Exec);
    };
    let answer = match answer {
        Answer::Hold(h) => {
            let wait = Duration::from_millis(h.timeout_ms) + Duration::from_secs(1);
            log(
                inv,
                "info",
                &format!("kill of {id} held until its checkpoint is taken"),
            );
            client
                .recv(wait)
                .ok()
                .and_then(|r| r.decision)
                .unwrap_or(Answer::Pass(Default::default()))
        }
        other => other,
    };
    Ok(match answer {
        Answer::NoOp(_) => Step::Exit(0),
        Answer::Refuse(r) => {
            log(
                inv,
                "error",
                &format!("podmig refused to kill {id}: {}", r.reason),
            );
            Step::Exit(1)
        }
        _ => Step::Exec,
    })
}

fn delete(cfg: &Config, inv: &Invocation, args: &[OsString]) -> i32 {
    let id = inv.single_id();
    let out = match Command::new(&cfg.runc)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            log(
                inv,
                "error",
                &format!("cannot run {}: {e}", cfg.runc.display()),
            );
            return 127;
        }
    };
    if let Some(id) = &id {
        let marker = restored_marker(&inv.root(), id);
        let _ = std::fs::remove_file(criu_conf_of(&marker));
        let _ = std::fs::remove_file(marker);
    }
    let _ = std::io::stdout().write_all(&out.stdout);
    if out.status.success() {
        return 0;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("does not exist") || stderr.contains("not exist") {
        // Deleting what is gone is done (e.g. a checkpoint already stopped and removed it).
        return 0;
    }
    let _ = std::io::stderr().write_all(&out.stderr);
    exit_code(out.status)
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Appends one line to runc's `--log` file in its `--log-format`, where the shim looks
/// for the reason of a failure. Never writes to stdout (the container's stdio).
fn log(inv: &Invocation, level: &str, msg: &str) {
    let Some(path) = inv.log_file() else {
        return;
    };
    let time = rfc3339_now();
    let line = if inv.log_json() {
        serde_json::json!({"level": level, "msg": format!("podmig-runc: {msg}"), "time": time})
            .to_string()
    } else {
        format!(
            "time=\"{time}\" level={level} msg=\"podmig-runc: {}\"",
            msg.replace('"', "'")
        )
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Current UTC time as RFC 3339 (what logrus writes and the shim parses).
fn rfc3339_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

/// Reads the wrapper configuration from an environment lookup (injectable for tests).
pub fn config_from(env: impl Fn(&str) -> Option<OsString>) -> Config {
    let ms = env("PODMIG_HOOK_TIMEOUT_MS")
        .and_then(|v| v.to_str().and_then(|s| s.parse().ok()))
        .unwrap_or(5_000);
    Config {
        runc: env("PODMIG_RUNC_BINARY").map_or_else(|| PathBuf::from("runc"), PathBuf::from),
        hook_socket: env("PODMIG_HOOK_SOCKET")
            .map_or_else(|| PathBuf::from(DEFAULT_HOOK_SOCKET), PathBuf::from),
        hook_timeout: Duration::from_millis(ms),
        criu: env("PODMIG_CRIU")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from(NODE_CRIU)).filter(|p| p.exists())),
    }
}

/// `OsStr` helper for tests and callers building argument vectors.
pub fn os_args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(it: I) -> Vec<OsString> {
    it.into_iter().map(|s| s.as_ref().to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_closes_connections_unless_it_keeps_them() {
        let node = "# podmig\nnetwork-lock nftables\ntcp-established\nskip-in-flight\n";
        assert_eq!(
            restore_conf(node, true),
            "# podmig\nnetwork-lock nftables\nskip-in-flight\ntcp-established\n"
        );
        assert_eq!(
            restore_conf(node, false),
            "# podmig\nnetwork-lock nftables\nskip-in-flight\ntcp-established\ntcp-close\n"
        );
        assert_eq!(restore_conf("", true), "tcp-established\n");
        // A node's own settings that close connections at the dump close them here too.
        assert!(restore_conf("tcp-close\n", true).ends_with("tcp-close\n"));
    }

    const SHIM_CREATE: &[&str] = &[
        "--root",
        "/run/containerd/runc/k8s.io",
        "--log",
        "/b/log.json",
        "--log-format",
        "json",
        "create",
        "--bundle",
        "/b",
        "--pid-file",
        "/b/init.pid",
        "--no-pivot",
        "abc",
    ];

    #[test]
    fn shim_create_line_is_split_and_turned_into_restore() {
        let inv = Invocation::parse(&os_args(SHIM_CREATE));
        assert_eq!(inv.command, "create");
        assert_eq!(inv.root(), PathBuf::from("/run/containerd/runc/k8s.io"));
        assert_eq!(inv.log_file(), Some(PathBuf::from("/b/log.json")));
        let c = CreateArgs::parse(&inv.args).expect("parse");
        assert_eq!(c.id, "abc");
        assert_eq!(c.bundle, PathBuf::from("/b"));
        assert!(c.no_pivot);
        let from = RestoreFrom {
            image_path: "/ckpt".into(),
            tcp_established: true,
            ..Default::default()
        };
        let restore = c.restore_args(&inv.globals, &from, Path::new("/w"));
        let expected = os_args([
            "--root",
            "/run/containerd/runc/k8s.io",
            "--log",
            "/b/log.json",
            "--log-format",
            "json",
            "restore",
            "--detach",
            "--bundle",
            "/b",
            "--image-path",
            "/ckpt",
            "--work-path",
            "/w",
            "--pid-file",
            "/b/init.pid",
            "--no-pivot",
            "--tcp-established",
            "abc",
        ]);
        assert_eq!(restore, expected);
    }

    #[test]
    fn equals_form_and_bool_globals_are_understood() {
        let inv = Invocation::parse(&os_args([
            "--debug",
            "--root=/r",
            "--systemd-cgroup",
            "kill",
            "--all",
            "c1",
            "9",
        ]));
        assert_eq!(inv.command, "kill");
        assert_eq!(inv.root(), PathBuf::from("/r"));
        assert_eq!(inv.kill_target(), Some(("c1".into(), "9".into())));
        let inv = Invocation::parse(&os_args(["delete", "--force", "c2"]));
        assert_eq!(inv.single_id().as_deref(), Some("c2"));
        assert_eq!(inv.root(), PathBuf::from("/run/runc"));
    }

    #[test]
    fn create_without_id_is_a_usage_error() {
        let err = CreateArgs::parse(&os_args(["--bundle", "/b"])).expect_err("no id");
        assert_eq!(err.metric_label(), "usage");
    }

    #[test]
    fn marker_lives_beside_the_runc_root() {
        assert_eq!(
            restored_marker(Path::new("/run/x/k8s.io"), "id1"),
            PathBuf::from("/run/x/k8s.io.podmig/id1")
        );
    }

    #[test]
    fn config_defaults_and_overrides() {
        let c = config_from(|_| None);
        assert_eq!(c.hook_socket, PathBuf::from(DEFAULT_HOOK_SOCKET));
        assert_eq!(c.runc, PathBuf::from("runc"));
        let c = config_from(|k| (k == "PODMIG_HOOK_TIMEOUT_MS").then(|| "250".into()));
        assert_eq!(c.hook_timeout, Duration::from_millis(250));
    }

    #[test]
    fn timestamp_is_rfc3339() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 30, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T",
            "{t}"
        );
    }
}
