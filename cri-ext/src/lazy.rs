//! Lazy (post-copy) moves: the source's CRIU serves the memory pages after the dump, the
//! target restores at once and a CRIU lazy-pages daemon faults the pages in over a TCP
//! connection. CRIU's page server listens on every address of its network namespace and
//! speaks plain TCP, so both CRIU ends run in private network namespaces of their own
//! (only loopback, reachable by nobody else); the node daemons carry the bytes between
//! them inside their authenticated TLS channel.

use std::{
    io::Read,
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::{fd::OwnedFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{Error, Result, engine::log_tail};

/// Port of CRIU's page server inside its private network namespace (nothing else is there).
pub const PAGE_PORT: u16 = 7070;

/// Name of the lazy-pages daemon's log in the images directory.
pub const LAZY_LOG: &str = "lazy-pages.log";

/// A network namespace with only loopback up, kept alive by its file descriptor.
#[derive(Debug)]
pub struct PrivateNet {
    ns: OwnedFd,
}

pub(crate) fn on_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    // A thread that switched namespaces ends with it, so the caller's thread never moves.
    std::thread::spawn(f)
        .join()
        .unwrap_or_else(|_| Err(Error::CheckpointFailed("namespace thread panicked".into())))
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::io(what, Path::new("/proc/thread-self/ns/net"), source)
}

impl PrivateNet {
    /// A new network namespace with loopback up (by `ip`, started inside it).
    pub fn new() -> Result<Self> {
        on_thread(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| os("unshare")(e.into()))?;
            // A child started by this thread is born in its namespace.
            let mut up = Command::new("ip");
            up.args(["link", "set", "lo", "up"]);
            crate::engine::run(up, None)?;
            let ns = std::fs::File::open("/proc/thread-self/ns/net").map_err(os("open"))?;
            Ok(Self { ns: ns.into() })
        })
    }

    fn run_inside<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let ns = self.ns.try_clone().map_err(os("dup"))?;
        on_thread(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| os("setns")(e.into()))?;
            f()
        })
    }

    /// Connects to `port` on loopback inside the namespace.
    pub fn connect(&self, port: u16) -> Result<TcpStream> {
        self.run_inside(move || {
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map_err(os("connect in"))
        })
    }

    /// Listens on `port` on loopback inside the namespace.
    pub fn listen(&self, port: u16) -> Result<TcpListener> {
        self.run_inside(move || {
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map_err(os("listen in"))
        })
    }

    /// Runs `cmd` to completion inside the namespace (see [`crate::engine::run`]).
    pub fn run(&self, cmd: Command, log: Option<PathBuf>) -> Result<std::process::Output> {
        self.run_inside(move || crate::engine::run(cmd, log.as_deref()))
    }

    /// Starts `cmd` inside the namespace, leading a process group of its own.
    pub(crate) fn spawn(&self, mut cmd: Command) -> Result<Child> {
        self.run_inside(move || {
            cmd.process_group(0);
            let command = format!("{cmd:?}");
            cmd.spawn()
                .map_err(|source| Error::Spawn { command, source })
        })
    }
}

/// A child process that can be waited for with a limit and killed with its group.
#[derive(Debug)]
pub(crate) struct Tracked {
    child: Mutex<Child>,
    what: &'static str,
}

impl Tracked {
    pub(crate) fn new(child: Child, what: &'static str) -> Self {
        Self {
            child: Mutex::new(child),
            what,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The exit status, or `None` while it runs.
    pub(crate) fn try_wait(&self) -> Option<std::process::ExitStatus> {
        self.lock().try_wait().ok().flatten()
    }

    /// Waits at most `limit` for the exit; `None` when it still runs.
    pub(crate) fn wait(&self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            #[allow(clippy::disallowed_methods)] // synchronous engine, off the async runtime
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub(crate) fn kill_group(&self) {
        let mut child = self.lock();
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = child.wait();
    }

    fn pid(&self) -> u32 {
        self.lock().id()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            tracing::warn!(
                what = self.what,
                pid = self.pid(),
                "stopping a CRIU process left running"
            );
            self.kill_group();
        }
    }
}

/// The source side: `runc checkpoint --lazy-pages` whose CRIU dumped everything but the
/// memory pages and now serves them on [`PAGE_PORT`] of its private namespace.
#[derive(Debug)]
pub struct PageServer {
    process: Tracked,
    net: PrivateNet,
    images: PathBuf,
}

impl PageServer {
    /// Starts `cmd` (a `runc checkpoint --lazy-pages --page-server 127.0.0.1:PAGE_PORT
    /// --status-fd 1 ...`) in a private namespace and waits until CRIU says the images
    /// are written (`ready` on the status fd) or it exits.
    pub fn start(mut cmd: Command, images: &Path, limit: Duration) -> Result<Self> {
        let net = PrivateNet::new()?;
        // runc writes the ready byte to its stdout (`--status-fd 1`).
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = net.spawn(cmd)?;
        let ready_rx = child.stdout.take();
        let server = Self {
            process: Tracked::new(child, "lazy page server"),
            net,
            images: images.to_path_buf(),
        };
        // CRIU writes one byte when ready; EOF means it ended without getting there.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            let ready = ready_rx.is_some_and(|mut r| r.read(&mut b).is_ok_and(|n| n == 1));
            let _ = done_tx.send(ready);
        });
        let ready = done_rx.recv_timeout(limit).unwrap_or(false);
        if !ready {
            server.process.kill_group();
            let stderr = {
                let mut c = server.process.lock();
                let mut s = String::new();
                if let Some(e) = c.stderr.as_mut() {
                    let _ = e.read_to_string(&mut s);
                }
                s
            };
            let why = log_tail(&images.join("dump.log")).unwrap_or(stderr);
            return Err(Error::CheckpointFailed(format!(
                "the lazy dump did not get ready: {why}"
            )));
        }
        Ok(server)
    }

    /// A connection to the page server (for the tunnel to the target's lazy-pages daemon).
    pub fn connect(&self) -> Result<TcpStream> {
        self.net.connect(PAGE_PORT)
    }

    /// Waits at most `limit` for CRIU to have served every page and ended. `Ok` when it
    /// ended well; an error says why not (or that it still runs).
    pub fn wait(&self, limit: Duration) -> Result<()> {
        match self.process.wait(limit) {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(Error::CheckpointFailed(format!(
                "serving the pages failed ({s}): {}",
                log_tail(&self.images.join("dump.log")).unwrap_or_default()
            ))),
            None => Err(Error::CheckpointFailed(
                "the pages were not all served in time".into(),
            )),
        }
    }

    /// Ends a page server nobody will read from: a connection that closes at once makes
    /// CRIU finish its dump (unlocking the network) without having sent anything; killed
    /// if that does not end it.
    pub fn abort(&self) {
        if self.process.try_wait().is_some() {
            return;
        }
        drop(self.connect());
        if self.process.wait(Duration::from_secs(5)).is_none() {
            self.process.kill_group();
        }
    }

    /// Whether CRIU still runs.
    pub fn running(&self) -> bool {
        self.process.try_wait().is_none()
    }
}

/// Where `nice` may be found (coreutils on a node, podmig's image).
const NICE: [&str; 2] = ["/usr/bin/nice", "/bin/nice"];

/// A command for `program` at the lowest CPU priority (`nice -n 19`) where `nice` exists.
/// NB: CRIU's lazy-pages daemon polls without sleeping while a page request is in flight;
/// at normal priority it takes a whole core from the daemons that carry those very pages
/// (and from the restored app). At nice 19 it still runs whenever a core is idle.
fn yielding(program: &Path) -> Command {
    match NICE.iter().map(Path::new).find(|p| p.is_file()) {
        Some(nice) => {
            let mut cmd = Command::new(nice);
            cmd.args(["-n", "19"]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// What the target's lazy-pages daemon reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageStats {
    /// Pages the restored process asked for by faulting on them.
    pub faulted: u64,
    /// Pages copied in all (faulted ones included).
    pub transferred: u64,
    /// Pages the images said were to be handled lazily.
    pub expected: u64,
}

impl PageStats {
    /// Pages copied in the background, before the process touched them.
    pub fn pushed(&self) -> u64 {
        self.transferred.saturating_sub(self.faulted)
    }

    /// Reads the figures from a lazy-pages log (CRIU log level 4).
    pub fn parse(log: &str) -> Self {
        let mut s = Self::default();
        for line in log.lines() {
            if line.contains(": #PF at ") {
                s.faulted += 1;
            } else if let Some(rest) = line.split("UFFD transferred pages: (").nth(1) {
                let mut it = rest.trim_end_matches(')').split('/');
                s.transferred += it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            } else if let Some(rest) = line.split("Found ").nth(1)
                && let Some(n) = rest.strip_suffix(" pages to be handled by UFFD")
            {
                s.expected += n.parse().unwrap_or(0);
            }
        }
        s
    }
}

/// The target side: CRIU's lazy-pages daemon, started before the restore and connected
/// (inside its private namespace) to the listener the node daemon tunnels from.
#[derive(Debug)]
pub struct LazyPages {
    process: Tracked,
    /// Where the node daemon accepts the daemon's page-server connection.
    pub listener: TcpListener,
    images: PathBuf,
}

impl LazyPages {
    /// Starts `criu lazy-pages` on `images` (also its work directory, so the restore that
    /// is told `--work-path images` finds its socket) and waits for the socket.
    pub fn start(criu: &Path, images: &Path) -> Result<Self> {
        let net = PrivateNet::new()?;
        let listener = net.listen(PAGE_PORT)?;
        let mut cmd = yielding(criu);
        cmd.arg("lazy-pages")
            .arg("--images-dir")
            .arg(images)
            .arg("--work-dir")
            .arg(images)
            .args(["--page-server", "--address", "127.0.0.1", "--port"])
            .arg(PAGE_PORT.to_string())
            .args(["-v4", "-o", LAZY_LOG])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let socket = images.join("lazy-pages.socket");
        let _ = std::fs::remove_file(&socket);
        let process = Tracked::new(net.spawn(cmd)?, "lazy-pages daemon");
        let me = Self {
            process,
            listener,
            images: images.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if me.process.try_wait().is_some() || Instant::now() > deadline {
                return Err(Error::RestoreFailed(format!(
                    "CRIU's lazy-pages daemon did not start: {}",
                    log_tail(&images.join(LAZY_LOG)).unwrap_or_default()
                )));
            }
            #[allow(clippy::disallowed_methods)] // synchronous engine, off the async runtime
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(me)
    }

    /// Waits at most `limit` for every page to have arrived. `Ok` with the figures when
    /// the daemon ended well; an error with CRIU's reason otherwise (or when it still runs).
    pub fn wait(&self, limit: Duration) -> Result<PageStats> {
        let log = || std::fs::read_to_string(self.images.join(LAZY_LOG)).unwrap_or_default();
        match self.process.wait(limit) {
            Some(s) if s.success() => Ok(PageStats::parse(&log())),
            Some(s) => Err(Error::RestoreFailed(format!(
                "the lazy-pages daemon failed ({s}): {}",
                log_tail(&self.images.join(LAZY_LOG)).unwrap_or_default()
            ))),
            None => Err(Error::RestoreFailed(
                "the pages did not all arrive in time".into(),
            )),
        }
    }

    /// Stops the daemon (a restore that will not happen, or a move given up).
    pub fn kill(&self) {
        self.process.kill_group();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_figures_come_from_the_lazy_pages_log() {
        let log = "(00.5) uffd: 1-8: Found 65556 pages to be handled by UFFD\n\
                   (00.5) uffd: 1-8: #PF at 0x7ff1d2c52000\n\
                   (00.5) uffd: 1-8: #PF at 0x7ff1c2c4c000\n\
                   (00.8) uffd: 1-8: UFFD transferred pages: (65556/65556)\n";
        let s = PageStats::parse(log);
        assert_eq!((s.expected, s.transferred, s.faulted), (65556, 65556, 2));
        assert_eq!(s.pushed(), 65554);
    }

    #[test]
    fn a_private_namespace_is_reachable_only_from_inside() {
        let net = PrivateNet::new().expect("netns (needs root)");
        let listener = net.listen(PAGE_PORT).expect("listen inside");
        let inside = net.connect(PAGE_PORT);
        assert!(inside.is_ok(), "connect inside: {inside:?}");
        assert!(listener.accept().is_ok());
        // The same port on this process's own loopback is not that listener.
        let outside = TcpStream::connect_timeout(
            &(Ipv4Addr::LOCALHOST, PAGE_PORT).into(),
            Duration::from_millis(200),
        );
        assert!(
            outside.is_err(),
            "the private listener leaked out: {outside:?}"
        );
    }
}
