//! The podmig node daemon and controller: the library behind the `podmig` binary.

pub mod cleanup;
pub mod cni;
pub mod config;
pub mod controller;
pub mod crds;
pub mod error;
pub mod extender;
pub mod keepip;
pub mod kubeclient;
pub mod node;
pub mod nodeprep;
pub mod plugin;
pub mod store;

pub use error::{Error, Result};
