//! Node preparation, what the chart's init container runs on every node (`podmig
//! prepare-node`): it installs `podmig-runc` and podmig's CRIU under the host's
//! `/opt/podmig`, and adds the `podmig` runtime handler to the node's container runtime
//! through a drop-in file, so that stock containerd or CRI-O runs Pods of RuntimeClass
//! `podmig` through the wrapper and passes it the `podmig.dev/*` Pod annotations. The
//! runtime is restarted only when its configuration changed; running again changes
//! nothing; `--uninstall` undoes it all.
//!
//! containerd layouts:
//! - 1.6/1.7, `config.toml` `version = 2`: containerd merges imported files by whole
//!   plugin section, so the drop-in carries the node's `io.containerd.grpc.v1.cri`
//!   section as it is in `config.toml` plus the `podmig` runtime (regenerated at every
//!   run, so it follows edits of `config.toml` at the daemon's next start);
//! - 2.x, `version = 3`: imports merge deeply; the drop-in holds the runtime only.
//!
//! The `podmig` runtime copies the options of the node's `runc` runtime (cgroup driver,
//! runc root) and swaps the binary for `podmig-runc`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use toml_edit::{Array, DocumentMut, Item, Table, value};

/// Errors of node preparation.
#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The runtime's configuration cannot be understood or extended.
    #[error("{0}")]
    Config(String),
    /// The runtime could not be restarted.
    #[error("restarting the container runtime ({command}): {message}")]
    Restart {
        /// The command.
        command: String,
        /// What it said.
        message: String,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PrepError + 'a {
    move |source| PrepError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// CRIU's settings for runc's checkpoints and restores (`/etc/criu/runc.conf`): the
/// network locked in process, established TCP connections dumped (podmig-runc decides per
/// restore whether they go on), connections still in a listen queue dropped, the file
/// locks a process holds dumped and taken again (databases lock their files). The same
/// body as `scripts/setup` writes on test machines.
pub const RUNC_CONF: &str = "# podmig: CRIU settings for runc checkpoint/restore (scripts/setup)\nnetwork-lock nftables\ntcp-established\nskip-in-flight\nfile-locks\n";

/// The drop-in's name, in `/etc/containerd/conf.d/` or `/etc/crio/crio.conf.d/`.
pub const DROPIN: &str = "podmig.toml";
/// CRI-O's drop-in name (read in lexical order; late enough to win).
pub const CRIO_DROPIN: &str = "99-podmig.conf";

/// What to prepare, and where.
#[derive(Debug, Clone)]
pub struct Options {
    /// The host's root file system, as mounted in the installer (`/host`).
    pub host_root: PathBuf,
    /// Where the binaries go, as the host sees it (`/opt/podmig`).
    pub install_dir: PathBuf,
    /// Files to install: (source in the installer's image, path below `install_dir`).
    pub files: Vec<(PathBuf, PathBuf)>,
    /// The runtime handler's name (the RuntimeClass's `handler`).
    pub handler: String,
    /// Runs after a configuration change (argv); `None`: restart nothing.
    pub restart: Option<Vec<String>>,
}

impl Options {
    /// The install directory as this process sees it (below the host's root).
    pub fn host_install_dir(&self) -> PathBuf {
        self.host_root.join(
            self.install_dir
                .strip_prefix("/")
                .unwrap_or(&self.install_dir),
        )
    }
}

/// The container runtime configuration found on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// containerd 1.6/1.7: `config.toml` version 2.
    ContainerdV2 {
        /// The main configuration file (host path below the root).
        config: PathBuf,
    },
    /// containerd 2.x: `config.toml` version 3.
    ContainerdV3 {
        /// The main configuration file.
        config: PathBuf,
    },
    /// CRI-O: `crio.conf.d` drop-ins.
    Crio {
        /// The drop-in directory.
        dir: PathBuf,
    },
}

impl Layout {
    /// The drop-in file this layout uses.
    pub fn dropin(&self) -> PathBuf {
        match self {
            Layout::ContainerdV2 { config } | Layout::ContainerdV3 { config } => config
                .parent()
                .unwrap_or(Path::new("/"))
                .join("conf.d")
                .join(DROPIN),
            Layout::Crio { dir } => dir.join(CRIO_DROPIN),
        }
    }

    /// Short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Layout::ContainerdV2 { .. } => "containerd (config version 2)",
            Layout::ContainerdV3 { .. } => "containerd (config version 3)",
            Layout::Crio { .. } => "CRI-O",
        }
    }
}

/// What a run changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Files written or removed.
    pub changed_files: Vec<PathBuf>,
    /// Whether the runtime's configuration changed (and so it was restarted).
    pub config_changed: bool,
    /// The node's own `/etc/criu/runc.conf`, kept as it is (podmig's settings not in it).
    pub foreign_runc_conf: bool,
}

/// Pipe size CRIU's page server asks for when it serves lazy pages (~3.4 MB, rounded up to
/// a power of two); without `CAP_SYS_RESOURCE` the kernel allows only `fs.pipe-max-size`.
pub const LAZY_PIPE_SIZE: u64 = 4 << 20;

/// The sysctl drop-in that keeps `fs.pipe-max-size` raised across reboots.
const SYSCTL_DROPIN: &str = "etc/sysctl.d/60-podmig.conf";

/// Raises the node's `fs.pipe-max-size` to [`LAZY_PIPE_SIZE`] (never lowers it), now through
/// the host's `/proc` and across reboots through a sysctl drop-in, for lazy moves.
fn raise_pipe_max_size(root: &Path, outcome: &mut Outcome) -> Result<(), PrepError> {
    let dropin = root.join(SYSCTL_DROPIN);
    let text = format!(
        "# podmig: CRIU's page server (lazy moves) needs pipes of {LAZY_PIPE_SIZE} bytes\nfs.pipe-max-size = {LAZY_PIPE_SIZE}\n"
    );
    if write_if_changed(&dropin, text.as_bytes(), 0o644)? {
        outcome.changed_files.push(dropin);
    }
    let live = root.join("proc/sys/fs/pipe-max-size");
    let current: Option<u64> = std::fs::read_to_string(&live)
        .ok()
        .and_then(|v| v.trim().parse().ok());
    if current.is_some_and(|v| v < LAZY_PIPE_SIZE) {
        std::fs::write(&live, LAZY_PIPE_SIZE.to_string()).map_err(io("write", &live))?;
        outcome.changed_files.push(live);
    }
    Ok(())
}

/// Writes podmig's `/etc/criu/runc.conf` unless the node has one of its own.
fn write_runc_conf(root: &Path, outcome: &mut Outcome) -> Result<(), PrepError> {
    let path = root.join("etc/criu/runc.conf");
    match std::fs::read_to_string(&path) {
        Ok(old) if !old.starts_with("# podmig") => outcome.foreign_runc_conf = true,
        _ => {
            if write_if_changed(&path, RUNC_CONF.as_bytes(), 0o644)? {
                outcome.changed_files.push(path);
            }
        }
    }
    Ok(())
}

fn parse(path: &Path) -> Result<DocumentMut, PrepError> {
    let text = std::fs::read_to_string(path).map_err(io("read", path))?;
    text.parse::<DocumentMut>()
        .map_err(|e| PrepError::Config(format!("{}: {e}", path.display())))
}

/// Finds the runtime's configuration below `root`.
pub fn detect(root: &Path) -> Result<Layout, PrepError> {
    let containerd = root.join("etc/containerd/config.toml");
    if containerd.is_file() {
        let doc = parse(&containerd)?;
        return match doc.get("version").and_then(Item::as_integer) {
            Some(3) => Ok(Layout::ContainerdV3 { config: containerd }),
            Some(2) => Ok(Layout::ContainerdV2 { config: containerd }),
            other => Err(PrepError::Config(format!(
                "{}: config version {} is not supported; convert it with `containerd config migrate`",
                containerd.display(),
                other.map_or("1 (none given)".to_owned(), |v| v.to_string())
            ))),
        };
    }
    let crio = root.join("etc/crio");
    if crio.join("crio.conf").is_file() || crio.join("crio.conf.d").is_dir() {
        return Ok(Layout::Crio {
            dir: crio.join("crio.conf.d"),
        });
    }
    Err(PrepError::Config(format!(
        "no container runtime configuration under {}: expected etc/containerd/config.toml \
         (write one with `containerd config default`) or etc/crio",
        root.display()
    )))
}

const CRI_V2: &str = "io.containerd.grpc.v1.cri";
const CRI_V3: &str = "io.containerd.cri.v1.runtime";

/// A table at `path` below `doc`'s root, if every step is a table.
fn table_at<'a>(doc: &'a DocumentMut, path: &[&str]) -> Option<&'a Table> {
    let mut t = doc.as_table();
    for key in path {
        t = t.get(key)?.as_table()?;
    }
    Some(t)
}

/// The `podmig` runtime's table: the node's runc runtime's options with podmig's binary.
fn runtime_table(runc_options: Option<&Table>, binary: &Path) -> Table {
    let mut rt = Table::new();
    rt["runtime_type"] = value("io.containerd.runc.v2");
    let mut ann = Array::new();
    ann.push("podmig.dev/*");
    rt["pod_annotations"] = value(ann);
    let mut options = runc_options.cloned().unwrap_or_default();
    options.set_implicit(false);
    options["BinaryName"] = value(binary.display().to_string());
    rt["options"] = Item::Table(options);
    rt
}

/// The drop-in's text for `layout`, given the main configuration `main` (containerd).
pub fn dropin_text(
    layout: &Layout,
    main: Option<&DocumentMut>,
    binary: &Path,
    handler: &str,
) -> String {
    match layout {
        Layout::ContainerdV2 { .. } => {
            let mut cri = main
                .and_then(|d| table_at(d, &["plugins", CRI_V2]))
                .cloned()
                .unwrap_or_default();
            let runc_options = main
                .and_then(|d| {
                    table_at(
                        d,
                        &[
                            "plugins",
                            CRI_V2,
                            "containerd",
                            "runtimes",
                            "runc",
                            "options",
                        ],
                    )
                })
                .cloned();
            let containerd = cri
                .entry("containerd")
                .or_insert(Item::Table(Table::new()))
                .as_table_mut();
            if let Some(containerd) = containerd {
                let runtimes = containerd
                    .entry("runtimes")
                    .or_insert(Item::Table(Table::new()));
                if let Some(runtimes) = runtimes.as_table_mut() {
                    runtimes.insert(
                        handler,
                        Item::Table(runtime_table(runc_options.as_ref(), binary)),
                    );
                }
            }
            let mut doc = DocumentMut::new();
            doc["version"] = value(2);
            let mut plugins = Table::new();
            plugins.set_implicit(true);
            plugins.insert(CRI_V2, Item::Table(cri));
            doc["plugins"] = Item::Table(plugins);
            format!(
                "# Written by podmig prepare-node (the node's CRI section plus the {handler} runtime:\n# containerd 1.x replaces whole plugin sections on import). Do not edit.\n{doc}"
            )
        }
        Layout::ContainerdV3 { .. } => {
            let runc_options = main.and_then(|d| {
                table_at(
                    d,
                    &[
                        "plugins",
                        CRI_V3,
                        "containerd",
                        "runtimes",
                        "runc",
                        "options",
                    ],
                )
            });
            let mut runtimes = Table::new();
            runtimes.set_implicit(true);
            runtimes.insert(handler, Item::Table(runtime_table(runc_options, binary)));
            let mut containerd = Table::new();
            containerd.set_implicit(true);
            containerd.insert("runtimes", Item::Table(runtimes));
            let mut cri = Table::new();
            cri.set_implicit(true);
            cri.insert("containerd", Item::Table(containerd));
            let mut plugins = Table::new();
            plugins.set_implicit(true);
            plugins.insert(CRI_V3, Item::Table(cri));
            let mut doc = DocumentMut::new();
            doc["version"] = value(3);
            doc["plugins"] = Item::Table(plugins);
            format!("# Written by podmig prepare-node. Do not edit.\n{doc}")
        }
        Layout::Crio { .. } => format!(
            "# Written by podmig prepare-node. Do not edit.\n[crio.runtime.runtimes.{handler}]\nruntime_path = \"{}\"\nruntime_type = \"oci\"\nruntime_root = \"/run/runc\"\nmonitor_path = \"/usr/libexec/crio/conmon\"\nallowed_annotations = [\"podmig.dev/migrate-from\", \"podmig.dev/source-node\", \"podmig.dev/migration-id\", \"podmig.dev/migration-deadline\", \"podmig.dev/pod-uid\"]\n",
            binary.display()
        ),
    }
}

/// The `imports` entry that names the drop-in, relative to the main file (containerd
/// resolves relative imports against the main configuration's directory).
const IMPORT: &str = "conf.d/podmig.toml";

/// Whether an `imports` entry already covers the drop-in.
fn covers(entry: &str, dropin: &Path, host_root: &Path, config_dir: &Path) -> bool {
    let target = if Path::new(entry).is_absolute() {
        host_root.join(entry.trim_start_matches('/'))
    } else {
        config_dir.join(entry)
    };
    let (dir, name) = (target.parent(), target.file_name().and_then(|n| n.to_str()));
    match (dir, name) {
        (Some(d), Some(n)) if d == dropin.parent().unwrap_or(Path::new("/")) => {
            n == DROPIN || (n.starts_with('*') && DROPIN.ends_with(n.trim_start_matches('*')))
        }
        _ => false,
    }
}

/// Adds (or with `remove`, takes out) podmig's entry of `imports`; true when changed.
fn edit_imports(doc: &mut DocumentMut, covered: bool, remove: bool) -> bool {
    let has_ours = doc
        .get("imports")
        .and_then(Item::as_array)
        .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(IMPORT)));
    if remove {
        if !has_ours {
            return false;
        }
        if let Some(a) = doc.get_mut("imports").and_then(Item::as_array_mut) {
            a.retain(|v| v.as_str() != Some(IMPORT));
            if a.is_empty() {
                doc.remove("imports");
            }
        }
        return true;
    }
    if has_ours || covered {
        return false;
    }
    match doc.get_mut("imports").and_then(Item::as_array_mut) {
        Some(a) => a.push(IMPORT),
        None => {
            let mut a = Array::new();
            a.push(IMPORT);
            // Root keys are written before the first table.
            doc.insert("imports", value(a));
        }
    }
    true
}

/// Writes `text` to `path` unless it already holds it; true when written.
fn write_if_changed(path: &Path, text: &[u8], mode: u32) -> Result<bool, PrepError> {
    if std::fs::read(path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    let tmp = path.with_extension("podmig-tmp");
    std::fs::write(&tmp, text).map_err(io("write", &tmp))?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(io("chmod", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))?;
    Ok(true)
}

fn restart(opts: &Options) -> Result<(), PrepError> {
    let Some(argv) = opts.restart.as_ref().filter(|a| !a.is_empty()) else {
        return Ok(());
    };
    let command = argv.join(" ");
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| PrepError::Restart {
            command: command.clone(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(PrepError::Restart {
            command,
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Installs the binaries and the runtime handler; restarts the runtime if its
/// configuration changed.
pub fn install(opts: &Options, layout: &Layout) -> Result<Outcome, PrepError> {
    let root = &opts.host_root;
    let mut outcome = Outcome::default();
    let install_dir = opts.host_install_dir();
    for (from, to) in &opts.files {
        let dest = install_dir.join(to);
        let bytes = std::fs::read(from).map_err(io("read", from))?;
        let mode = std::fs::metadata(from)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap_or(0o755);
        if write_if_changed(&dest, &bytes, mode)? {
            outcome.changed_files.push(dest);
        }
    }
    write_runc_conf(root, &mut outcome)?;
    raise_pipe_max_size(root, &mut outcome)?;
    let binary = opts.install_dir.join("bin/podmig-runc");
    let dropin = layout.dropin();
    match layout {
        Layout::ContainerdV2 { config } | Layout::ContainerdV3 { config } => {
            let mut main = parse(config)?;
            let text = dropin_text(layout, Some(&main), &binary, &opts.handler);
            if write_if_changed(&dropin, text.as_bytes(), 0o644)? {
                outcome.changed_files.push(dropin.clone());
                outcome.config_changed = true;
            }
            let dir = config.parent().unwrap_or(Path::new("/"));
            let covered = main
                .get("imports")
                .and_then(Item::as_array)
                .is_some_and(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str())
                        .any(|e| e != IMPORT && covers(e, &dropin, root, dir))
                });
            if edit_imports(&mut main, covered, false) {
                write_if_changed(config, main.to_string().as_bytes(), 0o644)?;
                outcome.changed_files.push(config.clone());
                outcome.config_changed = true;
            }
        }
        Layout::Crio { .. } => {
            let text = dropin_text(layout, None, &binary, &opts.handler);
            if write_if_changed(&dropin, text.as_bytes(), 0o644)? {
                outcome.changed_files.push(dropin.clone());
                outcome.config_changed = true;
            }
        }
    }
    if outcome.config_changed {
        restart(opts)?;
    }
    Ok(outcome)
}

/// Undoes [`install`]: the drop-in, podmig's `imports` entry and the binaries go; the
/// runtime is restarted if its configuration changed.
pub fn uninstall(opts: &Options, layout: &Layout) -> Result<Outcome, PrepError> {
    let root = &opts.host_root;
    let mut outcome = Outcome::default();
    let dropin = layout.dropin();
    if dropin.exists() {
        std::fs::remove_file(&dropin).map_err(io("remove", &dropin))?;
        outcome.changed_files.push(dropin.clone());
        outcome.config_changed = true;
    }
    if let Layout::ContainerdV2 { config } | Layout::ContainerdV3 { config } = layout {
        let mut main = parse(config)?;
        if edit_imports(&mut main, false, true) {
            write_if_changed(config, main.to_string().as_bytes(), 0o644)?;
            outcome.changed_files.push(config.clone());
            outcome.config_changed = true;
        }
    }
    // The live fs.pipe-max-size stays as it is (lowering it could break pipes in use).
    let sysctl = root.join(SYSCTL_DROPIN);
    if sysctl.exists() {
        std::fs::remove_file(&sysctl).map_err(io("remove", &sysctl))?;
        outcome.changed_files.push(sysctl);
    }
    let runc_conf = root.join("etc/criu/runc.conf");
    if std::fs::read_to_string(&runc_conf).is_ok_and(|t| t.starts_with("# podmig")) {
        std::fs::remove_file(&runc_conf).map_err(io("remove", &runc_conf))?;
        outcome.changed_files.push(runc_conf);
    }
    let install_dir = opts.host_install_dir();
    for (_, to) in &opts.files {
        let dest = install_dir.join(to);
        if dest.exists() {
            std::fs::remove_file(&dest).map_err(io("remove", &dest))?;
            outcome.changed_files.push(dest);
        }
    }
    if outcome.config_changed {
        restart(opts)?;
    }
    Ok(outcome)
}

/// The files below `source` to install: `bin/podmig-runc`, `bin/criu` (a wrapper that
/// runs CRIU with its own libraries) and everything under `criu/`.
pub fn files_below(source: &Path) -> Result<Vec<(PathBuf, PathBuf)>, PrepError> {
    let mut out = Vec::new();
    for name in ["bin/podmig-runc", "bin/criu"] {
        let p = source.join(name);
        if !p.is_file() {
            return Err(PrepError::Config(format!(
                "{} is missing from the image",
                p.display()
            )));
        }
        out.push((p, PathBuf::from(name)));
    }
    let mut stack = vec![source.join("criu")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(source) {
                out.push((p.clone(), rel.to_owned()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The restart command for `choice` (`auto`, `none` or a command line) and `layout`.
pub fn restart_command(choice: &str, layout: &Layout) -> Option<Vec<String>> {
    match choice {
        "none" | "" => None,
        "auto" => {
            let unit = match layout {
                Layout::Crio { .. } => "crio",
                _ => "containerd",
            };
            Some(
                [
                    "nsenter",
                    "-t",
                    "1",
                    "-m",
                    "-u",
                    "-i",
                    "-n",
                    "-p",
                    "--",
                    "systemctl",
                    "restart",
                    unit,
                ]
                .map(String::from)
                .to_vec(),
            )
        }
        cmd => Some(cmd.split_whitespace().map(String::from).collect()),
    }
}

/// `podmig prepare-node`: install (or uninstall), with a line saying what changed.
pub fn run(cfg: &crate::config::PrepareConfig) -> Result<String, PrepError> {
    let layout = detect(&cfg.host_root)?;
    let opts = Options {
        host_root: cfg.host_root.clone(),
        install_dir: cfg.install_dir.clone(),
        files: if cfg.uninstall {
            files_below(&cfg.source_dir).unwrap_or_default()
        } else {
            files_below(&cfg.source_dir)?
        },
        handler: cfg.handler.clone(),
        restart: restart_command(&cfg.restart, &layout),
    };
    let outcome = if cfg.uninstall {
        uninstall(&opts, &layout)?
    } else {
        install(&opts, &layout)?
    };
    Ok(format!(
        "podmig prepare-node: {} {}: {} file(s) changed, runtime {}{}",
        if cfg.uninstall {
            "uninstalled from"
        } else {
            "installed into"
        },
        layout.name(),
        outcome.changed_files.len(),
        if outcome.config_changed && opts.restart.is_some() {
            "restarted"
        } else if outcome.config_changed {
            "configuration changed (not restarted: --restart none)"
        } else {
            "unchanged"
        },
        if outcome.foreign_runc_conf {
            "; the node's own /etc/criu/runc.conf was kept: podmig needs network-lock nftables, tcp-established and skip-in-flight in it (and no tcp-close: podmig-runc closes connections per restore)"
        } else {
            ""
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2: &str = r#"version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = true
"#;

    #[test]
    fn a_version_2_drop_in_keeps_the_node_s_cri_section_and_runc_options() {
        let main: DocumentMut = V2.parse().expect("toml");
        let layout = Layout::ContainerdV2 {
            config: "/etc/containerd/config.toml".into(),
        };
        let text = dropin_text(
            &layout,
            Some(&main),
            Path::new("/opt/podmig/bin/podmig-runc"),
            "podmig",
        );
        let doc: DocumentMut = text.parse().expect("drop-in parses");
        let cri = table_at(&doc, &["plugins", CRI_V2]).expect("cri");
        assert_eq!(
            cri["sandbox_image"].as_str(),
            Some("registry.k8s.io/pause:3.9")
        );
        let rt = table_at(
            &doc,
            &["plugins", CRI_V2, "containerd", "runtimes", "podmig"],
        )
        .expect("rt");
        assert_eq!(rt["runtime_type"].as_str(), Some("io.containerd.runc.v2"));
        assert_eq!(rt["options"]["SystemdCgroup"].as_bool(), Some(true));
        assert_eq!(
            rt["options"]["BinaryName"].as_str(),
            Some("/opt/podmig/bin/podmig-runc")
        );
        assert_eq!(
            rt["pod_annotations"]
                .as_array()
                .and_then(|a| a.get(0))
                .and_then(|v| v.as_str()),
            Some("podmig.dev/*")
        );
        assert!(table_at(&doc, &["plugins", CRI_V2, "containerd", "runtimes", "runc"]).is_some());
    }

    #[test]
    fn a_version_3_drop_in_holds_the_runtime_only() {
        let main: DocumentMut = "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\nSystemdCgroup = false\n".parse().expect("toml");
        let layout = Layout::ContainerdV3 {
            config: "/etc/containerd/config.toml".into(),
        };
        let text = dropin_text(
            &layout,
            Some(&main),
            Path::new("/opt/podmig/bin/podmig-runc"),
            "podmig",
        );
        let doc: DocumentMut = text.parse().expect("parses");
        assert_eq!(doc["version"].as_integer(), Some(3));
        let rt = table_at(
            &doc,
            &["plugins", CRI_V3, "containerd", "runtimes", "podmig"],
        )
        .expect("rt");
        assert_eq!(rt["options"]["SystemdCgroup"].as_bool(), Some(false));
        assert!(table_at(&doc, &["plugins", CRI_V3, "containerd", "runtimes", "runc"]).is_none());
    }

    #[test]
    fn imports_are_added_once_respected_when_a_glob_covers_and_removed_cleanly() {
        let mut doc: DocumentMut = V2.parse().expect("toml");
        assert!(edit_imports(&mut doc, false, false));
        assert!(!edit_imports(&mut doc, false, false), "idempotent");
        let text = doc.to_string();
        assert!(text.find("imports").expect("imports") < text.find("[plugins").expect("plugins"));
        assert!(edit_imports(&mut doc, false, true));
        assert_eq!(doc.to_string(), V2, "uninstall restores the file");
        let (root, dir) = (Path::new("/host"), Path::new("/host/etc/containerd"));
        let dropin = Path::new("/host/etc/containerd/conf.d/podmig.toml");
        assert!(covers("/etc/containerd/conf.d/*.toml", dropin, root, dir));
        assert!(covers("conf.d/*.toml", dropin, root, dir));
        assert!(!covers("/etc/containerd/other.d/*.toml", dropin, root, dir));
        assert!(!covers("/etc/containerd/conf.d/*.conf", dropin, root, dir));
    }

    #[test]
    fn an_old_or_missing_configuration_is_refused_with_what_to_do() {
        let tmp = tempfile::tempdir().expect("tmp");
        let err = detect(tmp.path()).expect_err("nothing there");
        assert!(
            err.to_string().contains("containerd config default"),
            "{err}"
        );
        std::fs::create_dir_all(tmp.path().join("etc/containerd")).expect("dir");
        std::fs::write(
            tmp.path().join("etc/containerd/config.toml"),
            "root = \"/x\"\n",
        )
        .expect("write");
        let err = detect(tmp.path()).expect_err("version 1");
        assert!(
            err.to_string().contains("containerd config migrate"),
            "{err}"
        );
    }

    #[test]
    fn the_pipe_size_lazy_moves_need_is_raised_never_lowered_and_kept_across_reboots() {
        let tmp = tempfile::tempdir().expect("tmp");
        let live = tmp.path().join("proc/sys/fs/pipe-max-size");
        std::fs::create_dir_all(live.parent().expect("dir")).expect("mkdir");
        std::fs::write(&live, "1048576\n").expect("write");
        let mut outcome = Outcome::default();
        raise_pipe_max_size(tmp.path(), &mut outcome).expect("raise");
        assert_eq!(std::fs::read_to_string(&live).expect("read"), "4194304");
        let dropin = std::fs::read_to_string(tmp.path().join(SYSCTL_DROPIN)).expect("drop-in");
        assert!(dropin.contains("fs.pipe-max-size = 4194304"), "{dropin}");
        assert_eq!(outcome.changed_files.len(), 2);
        // A node that allows more keeps its value; a second run changes nothing.
        std::fs::write(&live, "8388608").expect("write");
        let mut again = Outcome::default();
        raise_pipe_max_size(tmp.path(), &mut again).expect("raise");
        assert_eq!(std::fs::read_to_string(&live).expect("read"), "8388608");
        assert!(again.changed_files.is_empty(), "{:?}", again.changed_files);
    }
}
