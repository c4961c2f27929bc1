//! What the controller and the agent both need from the machine they run on, so that a
//! device and the controller write their keys, tokens and state the same careful way and
//! read `--labels` and stop signals the same way.
//!
//! # Layout
//! - `files`: private directories, and files that appear whole or not at all (temporary
//!   file, fsync, rename, parent fsync).
//! - `cli`: `--labels` parsing with the Kubernetes label rules, Ctrl-C/SIGTERM as a
//!   cancellation token, and the open-file limit raised for thousands of connections.

pub mod cli;
pub mod files;
