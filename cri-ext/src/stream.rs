//! Streamed full moves: the source's CRIU sends the memory pages to a page server while it
//! dumps (`runc checkpoint --page-server`), so the pages never rest on the source's disk
//! and land in the target's image directory while the dump still runs. Both CRIU ends run
//! in private network namespaces (CRIU's page server speaks plain TCP on every address of
//! its namespace); the node daemons carry the bytes between them inside their TLS channel.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    Error, Result,
    engine::log_tail,
    lazy::{PAGE_PORT, PrivateNet, Tracked},
};

/// Name of the receiving page server's log in the images directory (a name no dump
/// writes, so the images that follow the pages cannot collide with it).
pub const PAGE_SERVER_LOG: &str = "page-server-in.log";

/// The target side: `criu page-server` writing the pages (and their pagemaps) that the
/// source's dump sends into an images directory.
#[derive(Debug)]
pub struct PageReceiver {
    process: Tracked,
    net: PrivateNet,
    images: PathBuf,
}

impl PageReceiver {
    /// Starts `criu page-server` on `images` (an existing root-only directory) in a
    /// private namespace; it serves one dump and ends.
    pub fn start(criu: &Path, images: &Path) -> Result<Self> {
        let net = PrivateNet::new()?;
        let mut cmd = Command::new(criu);
        cmd.arg("page-server")
            .arg("--images-dir")
            .arg(images)
            .args(["--address", "127.0.0.1", "--port"])
            .arg(PAGE_PORT.to_string())
            .args(["-v2", "-o", PAGE_SERVER_LOG])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let process = Tracked::new(net.spawn(cmd)?, "receiving page server");
        Ok(Self {
            process,
            net,
            images: images.to_path_buf(),
        })
    }

    /// A connection to the page server, once it listens (at most `limit` from now).
    pub fn connect(&self, limit: Duration) -> Result<TcpStream> {
        let deadline = Instant::now() + limit;
        loop {
            match self.net.connect(PAGE_PORT) {
                Ok(s) => return Ok(s),
                Err(e) if self.process.try_wait().is_some() || Instant::now() > deadline => {
                    return Err(Error::RestoreFailed(format!(
                        "CRIU's page server did not start ({e}): {}",
                        log_tail(&self.images.join(PAGE_SERVER_LOG)).unwrap_or_default()
                    )));
                }
                Err(_) => {
                    #[allow(clippy::disallowed_methods)]
                    // synchronous engine, off the async runtime
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    /// Waits at most `limit` for the page server to have written everything and ended
    /// well; an error says why not (or that it still runs, then it is stopped).
    pub fn wait(&self, limit: Duration) -> Result<()> {
        let why = || log_tail(&self.images.join(PAGE_SERVER_LOG)).unwrap_or_default();
        match self.process.wait(limit) {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(Error::RestoreFailed(format!(
                "the page server failed ({s}): {}",
                why()
            ))),
            None => {
                self.process.kill_group();
                Err(Error::RestoreFailed(format!(
                    "the page server did not end in time: {}",
                    why()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_server_that_cannot_start_says_so() {
        let tmp = tempfile::tempdir().expect("tmp");
        // `false` stands in for a CRIU that exits at once.
        let r = PageReceiver::start(Path::new("false"), tmp.path()).expect("spawn (needs root)");
        let err = r
            .connect(Duration::from_secs(2))
            .expect_err("nothing listens");
        assert!(err.to_string().contains("did not start"), "{err}");
        let err = r.wait(Duration::from_secs(2)).expect_err("failed");
        assert!(err.to_string().contains("failed"), "{err}");
    }
}
