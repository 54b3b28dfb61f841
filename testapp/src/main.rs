//! The thesis' test app, so that state continuity is observable from outside:
//! - allocates `--mem-mib N` MiB and touches every page (memory CRIU must carry),
//! - serves `GET /count` on `--port` (default 8080): how often it was called, counted in
//!   memory, so a restored copy continues the count,
//! - serves `GET /stream`: keeps the connection open and writes `tick <n>` every 100 ms
//!   (a client holding a connection across a move sees what becomes of it),
//! - prints `heartbeat seq=<n>` to stdout every 10 ms, a monotonic sequence a restored
//!   copy continues in its new log,
//! - exits 0 on SIGTERM after printing `received SIGTERM` (graceful stop is observable),
//! - with `--hold-open PATH` (repeatable), creates PATH and keeps it open (a file in the
//!   container's writable layer or a volume: CRIU cannot restore the app where it is missing).
//! - with `--reserve-gib N`, reserves N GiB of address space as JVMs, Go's runtime and
//!   databases do, the way MariaDB maps its 8 TiB (`PROT_NONE`, private, anonymous, no
//!   `MAP_NORESERVE`: not charged while inaccessible), and makes
//!   `--reserve-commit-mib M` (default 8) MiB in its middle writable and touches every page
//!   of those; they count in `GET /checksum`.
//!
//! - with `--unix-listen PATH`, answers each connection to the Unix socket PATH with its
//!   heartbeat sequence; with `--unix-peer PATH`, asks that socket every 50 ms and serves
//!   `GET /peer` (`ok=N failed=M last=S`): two containers of a Pod talking over a socket
//!   in a shared volume, so a move that separates them is seen.
//!
//! Plain std threads and blocking sockets: nothing a checkpoint could find surprising.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

const PAGE: usize = 4096;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mem_mib: usize = match arg(&args, "--mem-mib").map(|v| v.parse()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("testapp: --mem-mib: {e}");
            std::process::exit(64);
        }
    };
    let port: u16 = match arg(&args, "--port").map(|v| v.parse()) {
        None => 8080,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("testapp: --port: {e}");
            std::process::exit(64);
        }
    };

    // Touch every page with a value that depends on its index so it cannot be deduplicated.
    let mut ballast = vec![0u8; mem_mib * 1024 * 1024];
    for (i, page) in ballast.chunks_mut(PAGE).enumerate() {
        page[0] = (i % 251) as u8 + 1;
    }
    let reserved = match reservation(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("testapp: {e}");
            std::process::exit(64);
        }
    };
    let memory = Arc::new(Memory { ballast, reserved });
    let checksum = memory.checksum();

    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("testapp: bind port {port}: {e}");
            std::process::exit(1);
        }
    };
    let _held: Vec<std::fs::File> = args
        .windows(2)
        .filter(|w| w[0] == "--hold-open")
        .map(|w| {
            let path = &w[1];
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("testapp: --hold-open {path}: {e}");
                    std::process::exit(1);
                }
            }
        })
        .collect();
    println!("testapp ready port={port} mem_mib={mem_mib} checksum={checksum}");

    let term = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(sig, term.clone()) {
            eprintln!("testapp: signal handler: {e}");
        }
    }

    let count = Arc::new(AtomicU64::new(0));
    let heartbeat = Arc::new(AtomicU64::new(0));
    let peer = Arc::new(PeerStats::default());
    {
        let (count, peer, memory) = (count.clone(), peer.clone(), memory.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                serve(stream, &count, &peer, &memory);
            }
        });
    }
    if let Some(path) = arg(&args, "--unix-listen") {
        let _ = std::fs::remove_file(&path);
        match std::os::unix::net::UnixListener::bind(&path) {
            Ok(l) => {
                let heartbeat = heartbeat.clone();
                std::thread::spawn(move || {
                    for mut s in l.incoming().flatten() {
                        let _ = writeln!(s, "{}", heartbeat.load(Ordering::SeqCst));
                    }
                });
            }
            Err(e) => {
                eprintln!("testapp: --unix-listen {path}: {e}");
                std::process::exit(1);
            }
        }
    }
    if let Some(path) = arg(&args, "--unix-peer") {
        let peer = peer.clone();
        std::thread::spawn(move || poll_peer(&path, &peer));
    }

    let mut seq: u64 = 0;
    let stdout = std::io::stdout();
    loop {
        if term.load(Ordering::Relaxed) {
            println!("received SIGTERM seq={seq}");
            std::process::exit(0);
        }
        seq += 1;
        heartbeat.store(seq, Ordering::SeqCst);
        // A failing stdout (closed pipe) must not kill the app during a move.
        let _ = writeln!(stdout.lock(), "heartbeat seq={seq}");
        #[allow(clippy::disallowed_methods)] // a plain synchronous program
        std::thread::sleep(Duration::from_millis(10));
        std::hint::black_box(&memory);
    }
}

/// What `--unix-peer` saw of its peer.
#[derive(Default)]
struct PeerStats {
    ok: AtomicU64,
    failed: AtomicU64,
    last: AtomicU64,
}

/// Asks the peer's socket for its sequence every 50 ms, counting answers and failures.
fn poll_peer(path: &str, stats: &PeerStats) {
    loop {
        let answer = std::os::unix::net::UnixStream::connect(path).and_then(|s| {
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            line.trim()
                .parse::<u64>()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        });
        match answer {
            Ok(v) => {
                stats.ok.fetch_add(1, Ordering::SeqCst);
                stats.last.store(v, Ordering::SeqCst);
            }
            Err(_) => {
                stats.failed.fetch_add(1, Ordering::SeqCst);
            }
        }
        #[allow(clippy::disallowed_methods)] // a plain synchronous program
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sum of every page's first byte: a page that lost its content (zero-filled) changes it.
fn memory_checksum(ballast: &[u8]) -> u64 {
    ballast.iter().step_by(PAGE).map(|&b| u64::from(b)).sum()
}

/// The memory a move must carry: the ballast and the touched part of a reservation.
struct Memory {
    ballast: Vec<u8>,
    reserved: &'static [u8],
}

impl Memory {
    /// Both parts' [`memory_checksum`]s added (reads every page: faults a lazy move's in).
    fn checksum(&self) -> u64 {
        memory_checksum(&self.ballast) + memory_checksum(self.reserved)
    }
}

/// `--reserve-gib N [--reserve-commit-mib M]`: N GiB of address space reserved
/// (`PROT_NONE`, never backed) with M MiB in its middle made writable and
/// every page of those written; the written part is returned (empty without the flag).
fn reservation(args: &[String]) -> Result<&'static [u8], String> {
    let Some(gib) = arg(args, "--reserve-gib") else {
        return Ok(&[]);
    };
    let gib: usize = gib.parse().map_err(|e| format!("--reserve-gib: {e}"))?;
    let commit_mib: usize = arg(args, "--reserve-commit-mib")
        .map(|v| v.parse().map_err(|e| format!("--reserve-commit-mib: {e}")))
        .transpose()?
        .unwrap_or(8);
    let len = gib.checked_mul(1 << 30).ok_or("--reserve-gib: too large")?;
    let commit = commit_mib << 20;
    if commit > len / 2 {
        return Err("--reserve-commit-mib must be under half the reservation".to_owned());
    }
    let committed = map_reservation(len, len / 2, commit)?;
    for (i, page) in committed.chunks_mut(PAGE).enumerate() {
        page[0] = (i % 241) as u8 + 3;
    }
    Ok(committed)
}

/// Maps `len` bytes `PROT_NONE` (private, anonymous; as MariaDB does, without
/// `MAP_NORESERVE`) and makes `commit` bytes from `offset`
/// readable and writable; the mapping lives as long as the process.
#[allow(unsafe_code)] // the one raw mmap of the test app
fn map_reservation(len: usize, offset: usize, commit: usize) -> Result<&'static mut [u8], String> {
    // SAFETY: a fresh anonymous mapping owned by nobody else; only the range made
    // writable is turned into a slice, and the mapping is never unmapped.
    unsafe {
        let base = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if base == libc::MAP_FAILED {
            return Err(format!(
                "--reserve-gib: mmap of {len} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        let start = base.cast::<u8>().add(offset);
        if libc::mprotect(start.cast(), commit, libc::PROT_READ | libc::PROT_WRITE) != 0 {
            return Err(format!(
                "--reserve-commit-mib: mprotect: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(std::slice::from_raw_parts_mut(start, commit))
    }
}

fn serve(stream: TcpStream, count: &AtomicU64, peer: &PeerStats, memory: &Memory) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Drain the headers.
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
        line.clear();
    }
    let (status, body) = match request_line.split_whitespace().nth(1) {
        Some("/count") => (
            "200 OK",
            format!("{}\n", count.fetch_add(1, Ordering::SeqCst) + 1),
        ),
        Some("/healthz") => ("200 OK", "ok\n".to_owned()),
        // Reads every page of the ballast now (after a lazy move: faults them all in).
        Some("/checksum") => ("200 OK", format!("{}\n", memory.checksum())),
        Some("/peer") => (
            "200 OK",
            format!(
                "ok={} failed={} last={}\n",
                peer.ok.load(Ordering::SeqCst),
                peer.failed.load(Ordering::SeqCst),
                peer.last.load(Ordering::SeqCst)
            ),
        ),
        Some("/stream") => {
            if let Ok(s) = stream.try_clone() {
                std::thread::spawn(move || stream_ticks(s));
            }
            return;
        }
        _ => ("404 Not Found", "not found\n".to_owned()),
    };
    let mut stream = &stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// `GET /stream`: a long-lived response, one line every 100 ms until the peer goes.
fn stream_ticks(mut stream: TcpStream) {
    if write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return;
    }
    for n in 1u64.. {
        if writeln!(stream, "tick {n}")
            .and_then(|()| stream.flush())
            .is_err()
        {
            return;
        }
        #[allow(clippy::disallowed_methods)] // a plain synchronous program
        std::thread::sleep(Duration::from_millis(100));
    }
}
