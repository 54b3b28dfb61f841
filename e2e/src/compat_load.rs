//! The compatibility suite's clients: each application's own client keeps working while the
//! application moves (PostgreSQL under `pgbench`, a memcached and a Redis writer of known
//! keys, a large download from nginx, a MariaDB writer), and afterwards the data the
//! clients were told was stored is checked.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, bail};

/// What a client saw through one move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The client, as the table names it.
    pub client: String,
    /// Operations the application acknowledged.
    pub acknowledged: u64,
    /// Errors the client met (failed operations, dropped connections, aborted clients).
    pub errors: u64,
    /// Whether the client's connections lasted through the move (`None`: it keeps none).
    pub kept: Option<bool>,
    /// The data check after the move: `passed` or what was missing.
    pub data: Result<String, String>,
}

/// A client started before a move and finished after it.
pub struct Running {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<anyhow::Result<Seen>>,
}

impl Running {
    /// Stops the client and checks the data it was told was stored.
    pub fn finish(self) -> anyhow::Result<Seen> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
    }
}

/// Waits on a client's own thread (never on the async runtime).
#[allow(clippy::disallowed_methods)] // the clients run on threads of their own
fn pause(d: Duration) {
    std::thread::sleep(d);
}

fn spawn(work: impl FnOnce(Arc<AtomicBool>) -> anyhow::Result<Seen> + Send + 'static) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    Running {
        stop,
        handle: std::thread::spawn(move || work(s)),
    }
}

fn connect(ip: &str, port: u16) -> anyhow::Result<TcpStream> {
    let addr = format!("{ip}:{port}").parse()?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    // Long enough for a frozen Pod (a move freezes it for well under this).
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    Ok(s)
}

// ---- PostgreSQL ----------------------------------------------------------------------------

/// `psql -c sql` against the server at `ip` (postgresql-client).
pub fn psql(ip: &str, sql: &str) -> anyhow::Result<String> {
    let out = Command::new("psql")
        .args([
            "-h", ip, "-U", "postgres", "-d", "postgres", "-Atq", "-c", sql,
        ])
        .env("PGCONNECT_TIMEOUT", "3")
        .output()
        .context("running psql (postgresql-client)")?;
    if !out.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Creates pgbench's tables (scale 1: 100 000 accounts).
pub fn pgbench_init(ip: &str) -> anyhow::Result<()> {
    let out = Command::new("pgbench")
        .args([
            "-i", "-s", "1", "-q", "-h", ip, "-U", "postgres", "postgres",
        ])
        .output()
        .context("running pgbench -i (postgresql-client)")?;
    anyhow::ensure!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// pgbench's TPC-B-like transactions from 2 clients for `secs` seconds; each committed
/// transaction adds one row to `pgbench_history`, so every transaction pgbench counted
/// as processed must be there afterwards.
pub fn pgbench(ip: &str, secs: u32) -> Running {
    let ip = ip.to_owned();
    spawn(move |_| {
        let before: u64 = psql(&ip, "SELECT count(*) FROM pgbench_history")?.parse()?;
        let out = Command::new("pgbench")
            .args(["-n", "-c", "2", "-j", "1", "-T", &secs.to_string()])
            .args(["-h", &ip, "-U", "postgres", "postgres"])
            .stdin(Stdio::null())
            .output()
            .context("running pgbench (postgresql-client)")?;
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let processed = pgbench_figure(&text, "number of transactions actually processed:")
            .with_context(|| format!("pgbench printed no count: {text}"))?;
        let failed = pgbench_figure(&text, "number of failed transactions:").unwrap_or(0);
        let aborted = text.lines().filter(|l| l.contains(" aborted ")).count() as u64;
        let after: u64 = psql(&ip, "SELECT count(*) FROM pgbench_history")?.parse()?;
        let stored = after - before;
        Ok(Seen {
            client: "pgbench, 2 clients".into(),
            acknowledged: processed,
            errors: failed + aborted,
            kept: Some(aborted == 0 && out.status.success()),
            data: if stored >= processed {
                Ok(format!("all {processed} committed transactions present"))
            } else {
                Err(format!(
                    "{} of {processed} committed transactions missing",
                    processed - stored
                ))
            },
        })
    })
}

/// The number after `label` in pgbench's report.
pub fn pgbench_figure(text: &str, label: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.split('/').next())
        .and_then(|n| n.parse().ok())
}

// ---- key-value writers (memcached, Redis) ----------------------------------------------------

/// A line protocol a writer of known keys speaks.
#[derive(Debug, Clone, Copy)]
pub enum Kv {
    /// memcached's text protocol.
    Memcached,
    /// Redis's inline commands.
    Redis,
}

impl Kv {
    fn port(self) -> u16 {
        match self {
            Kv::Memcached => 11211,
            Kv::Redis => 6379,
        }
    }

    fn set(self, key: &str, value: &str) -> (String, &'static str) {
        match self {
            Kv::Memcached => (
                format!("set {key} 0 0 {}\r\n{value}\r\n", value.len()),
                "STORED",
            ),
            Kv::Redis => (format!("SET {key} {value}\r\n"), "+OK"),
        }
    }

    /// Reads `key` over `s`: its value, or `None` when the store does not have it.
    fn get(self, r: &mut BufReader<TcpStream>, key: &str) -> anyhow::Result<Option<String>> {
        let cmd = match self {
            Kv::Memcached => format!("get {key}\r\n"),
            Kv::Redis => format!("GET {key}\r\n"),
        };
        r.get_mut().write_all(cmd.as_bytes())?;
        let first = read_line(r)?;
        match self {
            Kv::Memcached if first == "END" => Ok(None),
            Kv::Memcached => {
                let value = read_line(r)?;
                anyhow::ensure!(read_line(r)? == "END", "memcached: no END after {key}");
                Ok(Some(value))
            }
            Kv::Redis if first == "$-1" => Ok(None),
            Kv::Redis => Ok(Some(read_line(r)?)),
        }
    }
}

fn read_line(r: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    let mut l = String::new();
    if r.read_line(&mut l)? == 0 {
        bail!("connection closed");
    }
    Ok(l.trim_end().to_owned())
}

/// Writes key `k<n>` = `v<n>` one after another over one connection until stopped,
/// reconnecting after an error; afterwards every key the store acknowledged must read back.
pub fn kv_writer(kv: Kv, ip: &str) -> Running {
    let ip = ip.to_owned();
    spawn(move |stop| {
        let mut acked = Vec::new();
        let mut errors = 0u64;
        let mut conn: Option<BufReader<TcpStream>> = None;
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let r = match conn.as_mut() {
                Some(r) => r,
                None => match connect(&ip, kv.port()) {
                    Ok(s) => conn.insert(BufReader::new(s)),
                    Err(_) => {
                        errors += 1;
                        pause(Duration::from_millis(200));
                        continue;
                    }
                },
            };
            let (key, value) = (format!("podmig{n}"), format!("value{n}"));
            let (cmd, ok) = kv.set(&key, &value);
            let answer = r
                .get_mut()
                .write_all(cmd.as_bytes())
                .map_err(anyhow::Error::from)
                .and_then(|()| read_line(r));
            match answer {
                Ok(a) if a == ok => acked.push((key, value)),
                _ => {
                    errors += 1;
                    conn = None;
                }
            }
            n += 1;
            pause(Duration::from_millis(5));
        }
        let mut r = BufReader::new(connect(&ip, kv.port())?);
        let mut missing = Vec::new();
        for (key, value) in &acked {
            if kv.get(&mut r, key)?.as_deref() != Some(value.as_str()) {
                missing.push(key.clone());
            }
        }
        Ok(Seen {
            client: "a writer of known keys, one connection".into(),
            acknowledged: acked.len() as u64,
            errors,
            kept: Some(errors == 0),
            data: if missing.is_empty() {
                Ok(format!("all {} acknowledged keys read back", acked.len()))
            } else {
                Err(format!(
                    "{} of {} acknowledged keys lost (first {})",
                    missing.len(),
                    acked.len(),
                    missing[0]
                ))
            },
        })
    })
}

// ---- MariaDB -------------------------------------------------------------------------------

/// `mariadb -e sql` against the server at `ip` (mariadb-client), in batch mode.
pub fn mariadb(ip: &str, sql: &str) -> anyhow::Result<String> {
    let out = Command::new("mariadb")
        .args([
            "-h",
            ip,
            "-u",
            "root",
            "--batch",
            "-N",
            "--connect-timeout=3",
            "-e",
            sql,
        ])
        .output()
        .context("running mariadb (mariadb-client)")?;
    if !out.status.success() {
        bail!("mariadb: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Inserts row `n` after row `n - 1` over one client connection (autocommit: each insert
/// is committed when it is answered) until stopped; afterwards every answered row must be
/// in the table.
pub fn mariadb_writer(ip: &str) -> Running {
    let ip = ip.to_owned();
    spawn(move |stop| {
        mariadb(
            &ip,
            "CREATE DATABASE IF NOT EXISTS podmig; \
             CREATE TABLE IF NOT EXISTS podmig.writes (n INT PRIMARY KEY)",
        )?;
        let mut child = Command::new("mariadb")
            .args(["-h", &ip, "-u", "root", "--batch", "--unbuffered", "-N"])
            .args(["--connect-timeout=3", "podmig"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running mariadb (mariadb-client)")?;
        let mut input = child.stdin.take().context("no stdin")?;
        let mut output = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut acked = Vec::new();
        let mut errors = 0;
        // Numbers go on from an earlier writer's (a Pod moved again and again).
        let mut n: u64 = mariadb(&ip, "SELECT COALESCE(MAX(n) + 1, 0) FROM podmig.writes")?
            .trim()
            .parse()
            .context("the next row number")?;
        while !stop.load(Ordering::SeqCst) {
            let mut answer = String::new();
            let sent = writeln!(input, "INSERT INTO writes VALUES ({n}); SELECT {n};");
            if sent.is_err() || output.read_line(&mut answer).unwrap_or(0) == 0 {
                errors += 1;
                break;
            }
            if answer.trim() == n.to_string() {
                acked.push(n);
            }
            n += 1;
            pause(Duration::from_millis(5));
        }
        drop(input);
        let status = child.wait()?;
        let stored: std::collections::BTreeSet<u64> = mariadb(&ip, "SELECT n FROM podmig.writes")?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        let missing: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|n| !stored.contains(n))
            .collect();
        Ok(Seen {
            client: "a writer of numbered rows, one connection".into(),
            acknowledged: acked.len() as u64,
            errors,
            kept: Some(errors == 0 && status.success()),
            data: if acked.is_empty() {
                Err("no row was acknowledged".to_owned())
            } else if missing.is_empty() {
                Ok(format!("all {} committed rows present", acked.len()))
            } else {
                Err(format!(
                    "{} of {} committed rows missing (first {})",
                    missing.len(),
                    acked.len(),
                    missing[0]
                ))
            },
        })
    })
}

// ---- nginx ---------------------------------------------------------------------------------

/// What `/big` holds: `seq 1 3000000` (scripts/build-images).
fn big_file() -> Vec<u8> {
    let mut v = Vec::with_capacity(24 << 20);
    for i in 1..=3_000_000u32 {
        v.extend_from_slice(i.to_string().as_bytes());
        v.push(b'\n');
    }
    v
}

/// One download of the large, rate-limited `/big` over one connection, started before the
/// move; it must arrive whole and unchanged.
pub fn download(ip: &str) -> Running {
    let ip = ip.to_owned();
    spawn(move |_| {
        let got = (|| -> anyhow::Result<Vec<u8>> {
            let mut s = connect(&ip, 80)?;
            s.write_all(b"GET /big HTTP/1.0\r\nHost: app\r\n\r\n")?;
            let mut all = Vec::new();
            s.read_to_end(&mut all)?;
            let at = all
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .context("no HTTP body")?;
            Ok(all.split_off(at + 4))
        })();
        let want = big_file();
        let (errors, data) = match got {
            Ok(body) if body == want => (0, Ok(format!("{} bytes, unchanged", body.len()))),
            Ok(body) => (
                1,
                Err(format!(
                    "{} of {} bytes arrived or they changed",
                    body.len(),
                    want.len()
                )),
            ),
            Err(e) => (1, Err(format!("the download failed: {e:#}"))),
        };
        Ok(Seen {
            client: "a 22 MB download at 4 MB/s".into(),
            acknowledged: u64::from(errors == 0),
            errors,
            kept: Some(errors == 0),
            data,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_s_counts_are_read_from_its_report() {
        let report = "transaction type: <builtin: TPC-B (sort of)>\nnumber of clients: 2\nnumber of transactions actually processed: 1834\nnumber of failed transactions: 3 (0.163%)\nlatency average = 8.7 ms\n";
        assert_eq!(
            pgbench_figure(report, "number of transactions actually processed:"),
            Some(1834)
        );
        assert_eq!(
            pgbench_figure(report, "number of failed transactions:"),
            Some(3)
        );
        assert_eq!(pgbench_figure(report, "tps ="), None);
        // With -t, pgbench prints processed/planned.
        assert_eq!(
            pgbench_figure(
                "number of transactions actually processed: 40/100\n",
                "number of transactions actually processed:"
            ),
            Some(40)
        );
    }

    #[test]
    fn the_large_file_is_what_seq_prints() {
        let f = big_file();
        assert!(f.starts_with(b"1\n2\n3\n") && f.ends_with(b"2999999\n3000000\n"));
        assert_eq!(f.len(), 22_888_896);
    }
}
