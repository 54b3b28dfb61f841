//! podmig's test bed: real containerd instances with the `podmig` runtime handler, the
//! node daemon as a real process, a CRI client playing kubelet, and probes of the test
//! app. Everything started here is stopped by its own pid and cleaned up by guards, also
//! when a test fails. The Kubernetes API server, the kubelet stand-in and a scheduler make
//! a local cluster of network namespaces ([`cluster`]).

pub mod apiserver;
pub mod bench;
pub mod bench_conn;
pub mod bench_drain;
pub mod bench_move;
pub mod bench_raw;
pub mod clock;
pub mod cluster;
pub mod compat;
pub mod compat_load;
pub mod containerd;
pub mod cri;
pub mod daemon;
pub mod daemon_api;
pub mod demo;
pub mod fabric;
pub mod hostile;
pub mod kubelet;
pub mod kubelet_logs;
pub mod kubelet_pod;
pub mod kubelet_projected;
pub mod kubelet_volumes;
pub mod node;
pub mod node_fs;
pub mod paths;
pub mod pki;
pub mod plot;
pub mod process;
pub mod scenario;
pub mod scheduler;
pub mod services;
pub mod soak;
pub mod testapp;
pub mod wait;
pub mod workloads;
