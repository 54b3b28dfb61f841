//! Both ends of the runtime hook: the synchronous client `podmig-runc` uses and the async
//! server the node daemon runs. Messages are the `podmig.hook.v1` protos, each framed by
//! a 4-byte big-endian length on a unix stream socket.

use std::{
    future::Future,
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use prost::Message;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::oneshot,
};

use crate::{
    Error, Result,
    proto::hook::v1::{Event, HookRequest, HookResponse, hook_response::Decision as Answer},
};

/// Largest message either end accepts; identities are small.
const MAX_FRAME: usize = 1 << 20;

/// Blocking client used by `podmig-runc`: one connection per runc invocation.
pub struct HookClient {
    stream: UnixStream,
    path: PathBuf,
}

impl HookClient {
    /// Connects to the daemon's hook socket; every read and write is bounded by `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let hook_err = |source| Error::Hook {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(hook_err)?;
        stream.set_read_timeout(Some(timeout)).map_err(hook_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(hook_err)?;
        Ok(Self {
            stream,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, source: std::io::Error) -> Error {
        Error::Hook {
            path: self.path.clone(),
            source,
        }
    }

    /// Sends a request without waiting for an answer.
    pub fn send(&mut self, req: &HookRequest) -> Result<()> {
        let buf = frame(req);
        self.stream.write_all(&buf).map_err(|e| self.err(e))
    }

    /// Waits for the next answer, at most `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<HookResponse> {
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| self.err(e))?;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).map_err(|e| self.err(e))?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(self.err(std::io::Error::other(format!("frame of {len} bytes"))));
        }
        let mut buf = vec![0u8; len];
        self.stream.read_exact(&mut buf).map_err(|e| self.err(e))?;
        Ok(HookResponse::decode(buf.as_slice())?)
    }

    /// Sends a request and waits for its answer.
    pub fn call(&mut self, req: &HookRequest, timeout: Duration) -> Result<HookResponse> {
        self.send(req)?;
        self.recv(timeout)
    }
}

fn frame(msg: &impl Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut buf = Vec::with_capacity(body.len() + 4);
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    buf
}

async fn read_frame<M: Message + Default>(
    stream: &mut (impl AsyncReadExt + Unpin),
) -> std::io::Result<Option<M>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    M::decode(buf.as_slice())
        .map(Some)
        .map_err(std::io::Error::other)
}

/// What the daemon answers to one hook request.
pub enum Decision {
    /// Answer at once.
    Reply(Answer),
    /// Answer `hold` now and the released answer when `release` fires (or `timeout` passes,
    /// in which case the wrapper goes ahead on its own).
    Hold {
        /// Upper bound the wrapper waits.
        timeout: Duration,
        /// Fires with the final answer.
        release: oneshot::Receiver<Answer>,
    },
}

/// The daemon's policy for runtime hook requests.
pub trait HookHandler: Send + Sync + 'static {
    /// Decides what the wrapper does with a create / start / kill / delete.
    fn decide(&self, req: HookRequest) -> impl Future<Output = Decision> + Send;
    /// Learns how a restore it asked for ended.
    fn restored(&self, req: HookRequest) -> impl Future<Output = ()> + Send;
}

/// Serves hook requests on `listener` until the task is dropped.
pub async fn serve<H: HookHandler>(listener: UnixListener, handler: Arc<H>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%error, "hook accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(error) = serve_conn(stream, handler).await {
                tracing::warn!(%error, "hook connection failed");
            }
        });
    }
}

async fn write_answer(stream: &mut tokio::net::UnixStream, answer: Answer) -> std::io::Result<()> {
    let resp = HookResponse {
        decision: Some(answer),
    };
    stream.write_all(&frame(&resp)).await
}

async fn serve_conn<H: HookHandler>(
    mut stream: tokio::net::UnixStream,
    handler: Arc<H>,
) -> std::io::Result<()> {
    while let Some(req) = read_frame::<HookRequest>(&mut stream).await? {
        let event = req.event();
        if event == Event::Restored {
            handler.restored(req).await;
            continue;
        }
        match handler.decide(req).await {
            Decision::Reply(answer) => write_answer(&mut stream, answer).await?,
            Decision::Hold { timeout, release } => {
                let hold = crate::proto::hook::v1::HoldUntilCheckpointed {
                    timeout_ms: timeout.as_millis() as u64,
                };
                write_answer(&mut stream, Answer::Hold(hold)).await?;
                let answer = match tokio::time::timeout(timeout, release).await {
                    Ok(Ok(answer)) => answer,
                    // A held create that got no answer must not start a container fresh.
                    _ if event == Event::Create => Answer::Refuse(crate::proto::hook::v1::Refuse {
                        reason: format!("no answer within the hold of {} ms", timeout.as_millis()),
                    }),
                    _ => Answer::Pass(Default::default()),
                };
                write_answer(&mut stream, answer).await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::hook::v1::{ContainerIdentity, NoOp, Pass, RestoreResult};

    struct Policy {
        restored: tokio::sync::mpsc::UnboundedSender<RestoreResult>,
    }

    impl HookHandler for Policy {
        async fn decide(&self, req: HookRequest) -> Decision {
            match req.event() {
                Event::Kill => {
                    let (tx, rx) = oneshot::channel();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        let _ = tx.send(Answer::NoOp(NoOp {}));
                    });
                    Decision::Hold {
                        timeout: Duration::from_secs(5),
                        release: rx,
                    }
                }
                _ => Decision::Reply(Answer::Pass(Pass {})),
            }
        }
        async fn restored(&self, req: HookRequest) {
            let _ = self.restored.send(req.restore_result.unwrap_or_default());
        }
    }

    #[tokio::test]
    async fn hold_then_release_and_restore_report_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("hook.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(serve(listener, Arc::new(Policy { restored: tx })));
        let sock2 = sock.clone();
        let answers = tokio::task::spawn_blocking(move || {
            let mut c = HookClient::connect(&sock2, Duration::from_secs(2)).expect("connect");
            let kill = HookRequest {
                event: Event::Kill as i32,
                container: Some(ContainerIdentity::default()),
                ..Default::default()
            };
            let first = c.call(&kill, Duration::from_secs(2)).expect("first");
            let second = c.recv(Duration::from_secs(2)).expect("second");
            c.send(&HookRequest {
                event: Event::Restored as i32,
                restore_result: Some(RestoreResult {
                    ok: true,
                    duration_ms: 7,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .expect("send");
            (first.decision, second.decision)
        })
        .await
        .expect("join");
        assert!(matches!(answers.0, Some(Answer::Hold(h)) if h.timeout_ms == 5000));
        assert!(matches!(answers.1, Some(Answer::NoOp(_))));
        let report = rx.recv().await.expect("restored report");
        assert!(report.ok);
        assert_eq!(report.duration_ms, 7);
        server.abort();
    }

    #[test]
    fn unreachable_socket_is_a_hook_error() {
        let err = match HookClient::connect(
            Path::new("/nonexistent/hook.sock"),
            Duration::from_millis(10),
        ) {
            Ok(_) => panic!("must fail"),
            Err(e) => e,
        };
        assert_eq!(err.metric_label(), "hook");
        assert!(err.to_string().contains("/nonexistent/hook.sock"));
    }
}
