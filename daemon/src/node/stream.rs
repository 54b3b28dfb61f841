//! Streamed full moves, node side: the memory pages go from the source's CRIU (dumping
//! into a page server) straight to a page server on the target while the dump runs.
//!
//! ```text
//! source node                                         target node
//! runc checkpoint --page-server ─tcp─▶ [carry_from_criu] ═TLS upgrade═▶ [receive] ─tcp─▶ criu page-server
//!   (private netns)                       POST /migrations/{id}/streams/{container}        (private netns)
//! ```
//!
//! The source opens one tunnel per container before it freezes (the target expects them:
//! it registered a [`Sink`] before asking for the hand-over), so the frozen window is the
//! dump at link speed, not a dump, then a copy, then a write. Each side counts the bytes
//! and a CRC-32 of the page stream; the source announces its figures in the hand-over's
//! image stream and the target restores only when its own figures match.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::store::CheckpointStore;

/// Copy buffer of a page stream: CRIU sends pages in runs of up to a few MiB.
const BUFFER: usize = 1 << 20;

/// What one page stream carried from the source's CRIU: its length and CRC-32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamFigures {
    /// Bytes of CRIU's page-server protocol (headers and pages).
    pub bytes: u64,
    /// CRC-32 of those bytes.
    pub crc: u32,
}

/// Why a page stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection of a CRIU end or the tunnel broke.
    #[error("page stream: {0}")]
    Io(#[from] std::io::Error),
    /// CRIU's side did not connect or end in time.
    #[error("page stream: {0} did not happen within {1:?}")]
    Timeout(&'static str, Duration),
    /// The receiving page server failed.
    #[error("page stream: {0}")]
    Criu(#[from] podmig_cri_ext::Error),
    /// A blocking step panicked or was cancelled.
    #[error("page stream: {0}")]
    Task(String),
}

/// A move's bandwidth cap (`--move-bandwidth-mibps`): the bytes a move sends to its
/// target (page streams, then the image stream) go out no faster than `rate`. One per
/// phase of a move, shared by its containers' streams.
#[derive(Debug)]
pub struct Pace {
    /// Bytes per second.
    rate: f64,
    /// When the first byte went, and how many went since.
    sent: std::sync::Mutex<(Option<tokio::time::Instant>, u64)>,
}

impl Pace {
    /// A cap of `mibps` MiB/s; `None` (no cap) for 0.
    pub fn per_move(mibps: u64) -> Option<Arc<Self>> {
        (mibps > 0).then(|| {
            Arc::new(Self {
                rate: mibps as f64 * 1024.0 * 1024.0,
                sent: std::sync::Mutex::new((None, 0)),
            })
        })
    }

    /// How long `n` more bytes must wait to stay within the rate.
    fn delay_for(&self, n: usize) -> Duration {
        let Ok(mut sent) = self.sent.lock() else {
            return Duration::ZERO;
        };
        let now = tokio::time::Instant::now();
        let start = *sent.0.get_or_insert(now);
        sent.1 += n as u64;
        let due = start + Duration::from_secs_f64(sent.1 as f64 / self.rate);
        due.saturating_duration_since(now)
    }

    /// Waits until `n` more bytes may go (async callers).
    pub async fn take(&self, n: usize) {
        let wait = self.delay_for(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Waits until `n` more bytes may go (blocking callers: the image stream is sent from
    /// a blocking task).
    #[allow(clippy::disallowed_methods)]
    pub fn take_blocking(&self, n: usize) {
        let wait = self.delay_for(n);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// Copies `from` into `to` until `from` ends (within the bandwidth cap `pace`, when there
/// is one), counting and hashing what passed; `to` is shut down at the end so the other
/// side sees the end too.
pub async fn pump<R, W>(from: R, mut to: W, pace: Option<&Pace>) -> std::io::Result<StreamFigures>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let figures = pump_open(from, &mut to, pace).await?;
    let _ = to.shutdown().await;
    Ok(figures)
}

/// [`pump`] that leaves `to` open at the end (its owner decides when the other side may
/// learn that the stream ended).
pub async fn pump_open<R, W>(
    mut from: R,
    mut to: W,
    pace: Option<&Pace>,
) -> std::io::Result<StreamFigures>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    let mut crc = crc32fast::Hasher::new();
    let mut bytes = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        bytes += n as u64;
        if let Some(p) = pace {
            p.take(n).await;
        }
        to.write_all(&buf[..n]).await?;
    }
    to.flush().await?;
    Ok(StreamFigures {
        bytes,
        crc: crc.finalize(),
    })
}

/// Joins the two directions of a carried connection: `data` (the pages) decides the
/// figures; `replies` (CRIU's small answers) must end too, at most `linger` after it.
async fn both_ways(
    data: impl std::future::Future<Output = std::io::Result<StreamFigures>>,
    replies: impl std::future::Future<Output = std::io::Result<StreamFigures>>,
    linger: Duration,
) -> Result<StreamFigures, StreamError> {
    tokio::pin!(data, replies);
    let mut answered = None;
    let figures = loop {
        tokio::select! {
            d = &mut data => break d?,
            r = &mut replies, if answered.is_none() => answered = Some(r?),
        }
    };
    if answered.is_none() {
        tokio::time::timeout(linger, replies)
            .await
            .map_err(|_| StreamError::Timeout("the end of the page stream", linger))??;
    }
    Ok(figures)
}

/// The source's side: accepts the connection of the dumping CRIU on `listener` (inside
/// its private namespace) and carries it through `tunnel` to the target, for at most
/// `limit`. Returns what went out once both directions ended.
pub async fn carry_from_criu<T>(
    listener: std::net::TcpListener,
    tunnel: T,
    limit: Duration,
    pace: Option<Arc<Pace>>,
) -> Result<StreamFigures, StreamError>
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let (criu, _) = tokio::time::timeout(limit, listener.accept())
        .await
        .map_err(|_| StreamError::Timeout("CRIU's connection", limit))??;
    criu.set_nodelay(true)?;
    carry(criu, tunnel, Flow::FromCriu, limit, pace).await
}

/// Which way the pages go through a carried connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// From the dumping CRIU into the tunnel (the source).
    FromCriu,
    /// From the tunnel into CRIU's page server (the target).
    ToCriu,
}

/// Carries a CRIU connection through `tunnel` both ways until both ended (at most
/// `limit`); the figures are those of the pages' direction.
async fn carry<T>(
    criu: tokio::net::TcpStream,
    tunnel: T,
    flow: Flow,
    limit: Duration,
    pace: Option<Arc<Pace>>,
) -> Result<StreamFigures, StreamError>
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (criu_rx, criu_tx) = criu.into_split();
    let (tunnel_rx, tunnel_tx) = tokio::io::split(tunnel);
    let linger = Duration::from_secs(30);
    let carried = async {
        match flow {
            Flow::FromCriu => {
                let pages = pump(criu_rx, tunnel_tx, pace.as_deref());
                both_ways(pages, pump(tunnel_rx, criu_tx, None), linger).await
            }
            Flow::ToCriu => {
                both_ways(
                    pump(tunnel_rx, criu_tx, None),
                    pump(criu_rx, tunnel_tx, None),
                    linger,
                )
                .await
            }
        }
    };
    tokio::time::timeout(limit, carried)
        .await
        .map_err(|_| StreamError::Timeout("the page stream", limit))?
}

/// The source's side of one container's page stream, opened before the freeze: the
/// private namespace its dump runs in and the task carrying the dump's connection.
/// Dropped unused, the task ends (the target's page server then fails and is cleaned up).
#[derive(Debug)]
pub struct PageStream {
    /// The container whose pages it carries.
    pub container: String,
    /// Where the dump must run: its page server address is loopback there.
    pub net: Arc<podmig_cri_ext::lazy::PrivateNet>,
    carrier: Option<tokio::task::JoinHandle<Result<StreamFigures, StreamError>>>,
}

impl PageStream {
    /// Listens in a new private namespace and carries what the dump sends there through
    /// `tunnel` (spawned on `rt`), for at most `limit`.
    pub fn open<T>(
        rt: &tokio::runtime::Handle,
        container: &str,
        tunnel: T,
        limit: Duration,
        pace: Option<Arc<Pace>>,
    ) -> Result<Self, StreamError>
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let net = Arc::new(podmig_cri_ext::lazy::PrivateNet::new()?);
        let listener = net.listen(podmig_cri_ext::lazy::PAGE_PORT)?;
        let carrier = rt.spawn(carry_from_criu(listener, tunnel, limit, pace));
        Ok(Self {
            container: container.to_owned(),
            net,
            carrier: Some(carrier),
        })
    }

    /// What the stream carried, once it ended (at most `limit` from now).
    pub async fn figures(mut self, limit: Duration) -> Result<StreamFigures, StreamError> {
        let Some(carrier) = self.carrier.take() else {
            return Err(StreamError::Task("the stream was already read".into()));
        };
        match tokio::time::timeout(limit, carrier).await {
            Err(_) => Err(StreamError::Timeout("the end of the page stream", limit)),
            Ok(Err(e)) => Err(StreamError::Task(e.to_string())),
            Ok(Ok(r)) => r,
        }
    }
}

impl Drop for PageStream {
    fn drop(&mut self) {
        if let Some(c) = &self.carrier {
            c.abort();
        }
    }
}

/// Why a target has no figures of a container's page stream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// No stream of it ever opened.
    #[error("no page stream of container {0:?} arrived")]
    NeverArrived(String),
    /// It was still open at the limit.
    #[error("the page stream of container {0:?} did not end in time")]
    NotEnded(String),
    /// It failed.
    #[error("the page stream of container {container:?} failed: {source}")]
    Failed {
        /// The container.
        container: String,
        /// How.
        source: Arc<StreamError>,
    },
}

/// One container's page stream as the target saw it.
#[derive(Debug, Clone)]
enum Arrival {
    /// Its tunnel is open (attempt `n`: a dump tried again opens a new one).
    Receiving(u32),
    /// It ended: the figures received, or why it failed.
    Done(Result<StreamFigures, Arc<StreamError>>),
}

/// A move whose target expects page streams: registered before the hand-over is asked
/// for, read by the hand-over's end to check the figures the source announced.
#[derive(Debug)]
pub struct Sink {
    store: CheckpointStore,
    target_uid: String,
    /// The node the move's source is on: the only caller that may stream into it.
    pub source_node: String,
    /// The containers it takes streams for (the target Pod's); empty: any.
    containers: Vec<String>,
    arrivals: Mutex<HashMap<String, Arrival>>,
    changed: Condvar,
    attempts: std::sync::atomic::AtomicU32,
}

impl Sink {
    /// A sink writing container `c`'s pages into `store`'s directory of (`target_uid`, `c`).
    pub fn new(
        store: CheckpointStore,
        target_uid: &str,
        source_node: &str,
        containers: Vec<String>,
    ) -> Self {
        Self {
            store,
            target_uid: target_uid.to_owned(),
            source_node: source_node.to_owned(),
            containers,
            arrivals: Mutex::default(),
            changed: Condvar::new(),
            attempts: Default::default(),
        }
    }

    fn arrivals(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arrival>> {
        self.arrivals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where container `container`'s images go (`None`: not a container of the target
    /// Pod, or a name that could escape the store).
    pub fn dir_for(&self, container: &str) -> Option<PathBuf> {
        if !self.containers.is_empty() && !self.containers.iter().any(|c| c == container) {
            return None;
        }
        self.store.path_for(&self.target_uid, container)
    }

    /// The directories streams wrote into (to remove when the move fails).
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.arrivals()
            .keys()
            .filter_map(|c| self.dir_for(c))
            .collect()
    }

    fn begin(&self, container: &str) -> u32 {
        let n = self
            .attempts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.arrivals()
            .insert(container.to_owned(), Arrival::Receiving(n));
        n
    }

    fn finish(&self, container: &str, attempt: u32, result: Result<StreamFigures, StreamError>) {
        let mut arrivals = self.arrivals();
        // A newer attempt's tunnel replaced this one: its outcome is the one that counts.
        if matches!(arrivals.get(container), Some(Arrival::Receiving(n)) if *n == attempt) {
            let result = result.map_err(Arc::new);
            arrivals.insert(container.to_owned(), Arrival::Done(result));
        }
        self.changed.notify_all();
    }

    /// Waits at most `limit` for container `container`'s stream to end; its figures, or
    /// why there are none. Blocking: for the pod worker's thread.
    pub fn wait(&self, container: &str, limit: Duration) -> Result<StreamFigures, SinkError> {
        let deadline = Instant::now() + limit;
        let mut arrivals = self.arrivals();
        loop {
            match arrivals.get(container) {
                Some(Arrival::Done(r)) => {
                    return r.clone().map_err(|source| SinkError::Failed {
                        container: container.to_owned(),
                        source,
                    });
                }
                None => return Err(SinkError::NeverArrived(container.to_owned())),
                Some(Arrival::Receiving(_)) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SinkError::NotEnded(container.to_owned()));
            }
            arrivals = self
                .changed
                .wait_timeout(arrivals, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

/// The target's side of one container's stream: a fresh root-only directory, CRIU's page
/// server writing into it, and the tunnel carried to it; the outcome goes into `sink`.
pub async fn receive<T>(
    sink: Arc<Sink>,
    container: String,
    dir: PathBuf,
    tunnel: T,
    limit: Duration,
) where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let attempt = sink.begin(&container);
    let result = receive_into(dir, tunnel, limit).await;
    if let Err(error) = &result {
        tracing::warn!(container = %container, %error, "page stream failed");
    }
    sink.finish(&container, attempt, result);
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StreamError> + Send + 'static,
) -> Result<T, StreamError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StreamError::Task(e.to_string()))?
}

async fn receive_into<T>(
    dir: PathBuf,
    tunnel: T,
    limit: Duration,
) -> Result<StreamFigures, StreamError>
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (server, tcp) = blocking(move || {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        podmig_cri_ext::engine::create_private_dir(&dir)?;
        let server =
            podmig_cri_ext::stream::PageReceiver::start(std::path::Path::new("criu"), &dir)?;
        let tcp = server.connect(Duration::from_secs(10))?;
        tcp.set_nonblocking(true)?;
        tcp.set_nodelay(true)?;
        Ok((server, tcp))
    })
    .await?;
    let figures = carry(
        tokio::net::TcpStream::from_std(tcp)?,
        tunnel,
        Flow::ToCriu,
        limit,
        None,
    )
    .await?;
    // The pages are in the files once CRIU's page server ended well.
    blocking(move || Ok(server.wait(Duration::from_secs(30))?)).await?;
    Ok(figures)
}

#[cfg(test)]
mod tests {
    #[tokio::test(start_paused = true)]
    async fn a_capped_move_sends_no_faster_than_its_rate() {
        assert!(Pace::per_move(0).is_none(), "0: no cap");
        let pace = Pace::per_move(4).expect("a cap");
        let start = tokio::time::Instant::now();
        // 8 MiB at 4 MiB/s, in 64 KiB pieces: 2 s (virtual time).
        for _ in 0..128 {
            pace.take(64 << 10).await;
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1980) && took <= Duration::from_millis(2100),
            "{took:?}"
        );
    }

    use super::*;

    #[tokio::test]
    async fn a_pump_counts_and_hashes_what_it_carries() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut a, b) = tokio::io::duplex(64 << 10);
        let (c, mut d) = tokio::io::duplex(64 << 10);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.expect("write");
            a.shutdown().await.expect("shutdown");
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            d.read_to_end(&mut got).await.expect("read");
            got
        });
        let figures = pump(b, c, None).await.expect("pump");
        writer.await.expect("writer");
        assert_eq!(reader.await.expect("reader"), data);
        assert_eq!(figures.bytes, data.len() as u64);
        assert_eq!(figures.crc, crc32fast::hash(&data));
    }

    #[test]
    fn a_sink_keeps_the_outcome_of_the_latest_attempt() {
        let tmp = tempfile::tempdir().expect("tmp");
        let sink = Sink::new(
            CheckpointStore::new(tmp.path()),
            "uid",
            "node-0",
            vec!["app".into()],
        );
        assert_eq!(sink.dir_for("intruder"), None);
        let first = sink.begin("app");
        let second = sink.begin("app");
        sink.finish("app", first, Err(StreamError::Task("cut".into())));
        assert!(
            sink.wait("app", Duration::from_millis(50))
                .is_err_and(|e| e.to_string().contains("in time")),
            "the first attempt's end must not count"
        );
        let figures = StreamFigures { bytes: 7, crc: 9 };
        sink.finish("app", second, Ok(figures));
        assert_eq!(
            sink.wait("app", Duration::from_millis(50)).ok(),
            Some(figures)
        );
        assert!(sink.wait("other", Duration::from_millis(50)).is_err());
        assert_eq!(sink.dirs(), vec![tmp.path().join("uid/app")]);
    }
}
