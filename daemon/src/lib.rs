//! The podmig node daemon and (later) controller: library behind the `podmig` binary.

pub mod config;
pub mod decide;
pub mod error;
pub mod node;
pub mod store;

pub use error::{Error, Result};
