//! podmig's runtime extension: the protos of the CRI checkpoint/restore extension and of
//! the runtime hook, the runc + CRIU engine, and the pieces of the `podmig-runc` wrapper.

pub mod criu_log;
pub mod engine;
pub mod error;
pub mod freezer;
pub mod hook;
pub mod identity;
pub mod lazy;
pub mod rootfs;
pub mod stray;
pub mod stream;
pub mod untrusted;
pub mod volumes;
pub mod wrapper;

pub use error::{Error, Result};
pub use tonic;

/// Generated protobuf modules, nested by proto package.
pub mod proto {
    /// `podmig.hook.v1`: podmig-runc ⇄ node daemon.
    pub mod hook {
        /// Version 1.
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            tonic::include_proto!("podmig.hook.v1");
        }
    }
    /// `podmig.runtime.v1`: the CRI checkpoint/restore extension.
    pub mod runtime {
        /// Version 1.
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            tonic::include_proto!("podmig.runtime.v1");
        }
    }
}

/// Connects a gRPC client channel to a server listening on a unix socket.
pub async fn connect(uds_path: impl AsRef<std::path::Path>) -> Result<tonic::transport::Channel> {
    let path = uds_path.as_ref().to_path_buf();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    // NB: the URI is a placeholder; the connector ignores it and dials the socket.
    tonic::transport::Endpoint::try_from("http://[::]:50051")
        .map_err(|source| Error::Connect {
            path: uds_path.as_ref().display().to_string(),
            source,
        })?
        .connect_with_connector(connector)
        .await
        .map_err(|source| Error::Connect {
            path: uds_path.as_ref().display().to_string(),
            source,
        })
}
