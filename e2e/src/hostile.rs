//! A hostile source: a server holding a node's real daemon credentials (its certificate,
//! on its address and port) that answers a target's hand-over with a crafted checkpoint
//! stream — the attacker that owns one node and wants to write on another. Each case is
//! one stream in the daemons' wire format (`F` frames of files, `E` and a CRC-32), built
//! here byte by byte, never with podmig's own sender.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{Router, body::Body, extract::State, http::StatusCode, response::Response};

/// The media type of a checkpoint stream (the target refuses any other body).
const MEDIA_TYPE: &str = podmig_api::nodeapi::CHECKPOINT_MEDIA_TYPE;

/// One crafted hand-over: what it tries, and the bytes of its stream.
#[derive(Debug, Clone)]
pub struct Case {
    /// What the stream tries (for messages).
    pub name: &'static str,
    /// Words the target's refusal must contain.
    pub refused_with: &'static str,
    /// The stream.
    pub stream: Vec<u8>,
}

/// A file frame: container `container`, file `file`, mode 0600, `content`.
pub fn file_frame(container: &str, file: &str, content: &[u8]) -> Vec<u8> {
    let mut f = vec![b'F'];
    for s in [container, file] {
        f.extend_from_slice(&u16::try_from(s.len()).unwrap_or(u16::MAX).to_be_bytes());
        f.extend_from_slice(s.as_bytes());
    }
    f.extend_from_slice(&0o600u32.to_be_bytes());
    f.extend_from_slice(&(content.len() as u64).to_be_bytes());
    f.extend_from_slice(content);
    f
}

/// `frames` ended as a stream: `E` and the CRC-32 of every byte before it (`bad_crc`:
/// flipped).
pub fn stream(frames: &[Vec<u8>], bad_crc: bool) -> Vec<u8> {
    let mut s: Vec<u8> = frames.concat();
    s.push(b'E');
    let mut crc = crc32fast::hash(&s);
    if bad_crc {
        crc ^= 0xdead_beef;
    }
    s.extend_from_slice(&crc.to_be_bytes());
    s
}

/// A tar holding one entry named `path` (written raw: the tar crate refuses `..`) of type
/// `kind`, with `link` as its link target and `data` as its content.
pub fn tar_with(path: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    if let Some(gnu) = h.as_gnu_mut() {
        let n = path.len().min(gnu.name.len());
        gnu.name[..n].copy_from_slice(&path.as_bytes()[..n]);
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    if let Some(l) = link {
        let _ = h.set_link_name(l);
    }
    if kind == tar::EntryType::Char {
        let _ = h.set_device_major(1);
        let _ = h.set_device_minor(3);
    }
    h.set_cksum();
    let _ = b.append(&h, data);
    b.into_inner().unwrap_or_default()
}

/// The crafted streams, each for container `container` of the target; `marker` names the
/// file a successful attack would leave (`/tmp/<marker>` on the target's node).
pub fn cases(container: &str, marker: &str) -> Vec<Case> {
    let diff = podmig_cri_ext::rootfs::DIFF_TAR;
    let up = format!("../../../../../../../../../../tmp/{marker}");
    let layer = |tar: Vec<u8>| stream(&[file_frame(container, diff, &tar)], false);
    // A symlink out of the rootfs, then a file through it: one tar of two entries.
    let mut symlink = tar_with("evil", tar::EntryType::Symlink, Some("/tmp"), b"");
    symlink.truncate(symlink.len().saturating_sub(1024)); // drop the end blocks
    symlink.extend(tar_with(
        &format!("evil/{marker}"),
        tar::EntryType::Regular,
        None,
        b"owned",
    ));
    let mut oversize = vec![b'F'];
    for s in [container, "pages-1.img"] {
        oversize.extend_from_slice(&(s.len() as u16).to_be_bytes());
        oversize.extend_from_slice(s.as_bytes());
    }
    oversize.extend_from_slice(&0o600u32.to_be_bytes());
    oversize.extend_from_slice(&(1u64 << 50).to_be_bytes());
    vec![
        Case {
            name: "traversal in the layer tar",
            refused_with: "leaves its root",
            stream: layer(tar_with(&up, tar::EntryType::Regular, None, b"owned")),
        },
        Case {
            name: "an absolute path in the layer tar",
            refused_with: "leaves its root",
            stream: layer(tar_with(
                &format!("/tmp/{marker}"),
                tar::EntryType::Regular,
                None,
                b"owned",
            )),
        },
        Case {
            name: "a symlink out of the rootfs",
            refused_with: "symbolic link",
            stream: layer(symlink),
        },
        Case {
            name: "a device node",
            refused_with: "device node",
            stream: layer(tar_with("dev-mem", tar::EntryType::Char, None, b"")),
        },
        Case {
            name: "an oversize frame (1 PiB announced)",
            refused_with: "too big",
            stream: oversize,
        },
        Case {
            name: "a bad CRC",
            refused_with: "checksum mismatch",
            stream: stream(
                &[file_frame(container, "core-1.img", b"not an image")],
                true,
            ),
        },
        Case {
            name: "another Pod's directory as the container",
            refused_with: "malformed checkpoint stream",
            stream: stream(&[file_frame("../other-pod", "core-1.img", b"x")], false),
        },
        Case {
            name: "a file no checkpoint holds (a CRIU configuration)",
            refused_with: "malformed checkpoint stream",
            stream: stream(
                &[file_frame(container, "runc.conf", b"action-script /tmp/x")],
                false,
            ),
        },
    ]
}

/// What the hostile source saw: the hand-overs asked of it, and the verdicts sent to it.
#[derive(Default, Debug)]
pub struct Seen {
    /// Paths of the hand-over requests.
    pub handovers: Vec<String>,
    /// Bodies of the verdicts (`…/complete`).
    pub verdicts: Vec<String>,
}

struct Served {
    cases: Vec<Case>,
    next: AtomicUsize,
    seen: Arc<Mutex<Seen>>,
}

/// The hostile source, serving until dropped.
pub struct HostileSource {
    handle: axum_server::Handle<SocketAddr>,
    /// What it saw.
    pub seen: Arc<Mutex<Seen>>,
}

impl HostileSource {
    /// Serves `cases`, one per hand-over in order, on `addr` inside network namespace
    /// `netns`, with the certificate `cert`/`key` of the node it impersonates.
    pub async fn start(
        netns: &str,
        addr: SocketAddr,
        cert: &Path,
        key: &Path,
        cases: Vec<Case>,
    ) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key).await?;
        let listener = crate::kubelet_logs::bind_in_netns(netns, addr)?;
        listener.set_nonblocking(true)?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let state = Arc::new(Served {
            cases,
            next: AtomicUsize::new(0),
            seen: seen.clone(),
        });
        let app = Router::new().fallback(answer).with_state(state);
        let handle = axum_server::Handle::new();
        let server = axum_server::from_tcp_rustls(listener, config)?.handle(handle.clone());
        tokio::spawn(async move {
            if let Err(error) = server.serve(app.into_make_service()).await {
                tracing::warn!(%error, "hostile source stopped");
            }
        });
        Ok(Self { handle, seen })
    }
}

impl Drop for HostileSource {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

async fn answer(State(s): State<Arc<Served>>, req: axum::extract::Request) -> Response {
    let path = req.uri().path().to_owned();
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let reply = |code: StatusCode, content_type: &str, body: Vec<u8>| {
        Response::builder()
            .status(code)
            .header("content-type", content_type)
            .body(Body::from(body))
            .unwrap_or_default()
    };
    if path.starts_with("/migrate/") {
        if let Ok(mut seen) = s.seen.lock() {
            seen.handovers.push(path);
        }
        let i = s.next.fetch_add(1, Ordering::SeqCst);
        return match s.cases.get(i) {
            Some(case) => reply(StatusCode::OK, MEDIA_TYPE, case.stream.clone()),
            None => reply(
                StatusCode::CONFLICT,
                "application/json",
                br#"{"error":"no more cases","reason":"Conflict"}"#.to_vec(),
            ),
        };
    }
    if path.ends_with("/complete") {
        if let Ok(mut seen) = s.seen.lock() {
            seen.verdicts
                .push(String::from_utf8_lossy(&body).into_owned());
        }
        return reply(StatusCode::NO_CONTENT, "application/json", Vec::new());
    }
    reply(
        StatusCode::NOT_FOUND,
        "application/json",
        br#"{"error":"no such endpoint","reason":"NotFound"}"#.to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_ends_with_the_crc_of_what_came_before() {
        let s = stream(&[file_frame("app", "core-1.img", b"abc")], false);
        let (body, crc) = s.split_at(s.len() - 4);
        assert_eq!(body.last(), Some(&b'E'));
        assert_eq!(crc, crc32fast::hash(body).to_be_bytes());
        assert_eq!(&body[..3], &[b'F', 0, 3]);
        let bad = stream(&[file_frame("app", "core-1.img", b"abc")], true);
        assert_ne!(bad, s);
    }

    #[test]
    fn the_crafted_tars_hold_what_they_claim() {
        let t = tar_with("../../tmp/x", tar::EntryType::Regular, None, b"owned");
        assert_eq!(&t[..11], b"../../tmp/x");
        let mut a = tar::Archive::new(&t[..]);
        let e = a
            .entries()
            .expect("entries")
            .next()
            .expect("one")
            .expect("entry");
        assert_eq!(e.header().entry_type(), tar::EntryType::Regular);
        let dev = tar_with("d", tar::EntryType::Char, None, b"");
        let mut a = tar::Archive::new(&dev[..]);
        let e = a
            .entries()
            .expect("entries")
            .next()
            .expect("one")
            .expect("entry");
        assert_eq!(e.header().device_major().ok().flatten(), Some(1));
        assert_eq!(cases("app", "m").len(), 8);
    }
}
