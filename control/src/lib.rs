//! qmig's control plane, libvirt's half of migration: host agents that own VMs
//! (QEMU 7.2 processes or `qmig vm` processes, both driven over QMP) and run
//! libvirt's version 3 migration protocol between them.
//!
//! - [`qmp`]: the QMP client (the one in the tree; testkit re-exports it).
//! - [`rpc`]: the agents' JSON-lines RPC over TCP, server and client.
//! - [`host`]: the host identity (UUID, hostname) an agent puts in its cookies.
//! - [`cookie`]: the migration cookies exchanged between the phases.
//! - [`state`]: the agent's state dir: VM definitions, runtime records, jobs and their phases.
//! - [`vmproc`]: starting, reattaching to and stopping one VM process.
//! - [`migrate`]: the v3 phases' driver (virDomainMigrateVersion3Full) and the options.
//! - [`agent`]: the agent itself (`qmig agent`): VMs by name, the RPC calls.
//! - [`tunnel`]: the relay of a tunnelled migration (`--tunnelled`) and its cancel.
//! - [`recovery`]: what a restarted agent does with its unfinished jobs (libvirt's table).
//!
//! The protocol is described in `docs/control-plane.md`.

#![warn(missing_docs)]

pub mod agent;
pub mod cookie;
pub mod host;
pub mod migrate;
pub mod qmp;
pub mod recovery;
pub mod rpc;
pub mod state;
pub mod tunnel;
pub mod vmproc;

pub use rpc::{ErrorClass, RpcError};

/// The control plane's result type: every call ends in a value or an [`RpcError`].
pub type Result<T, E = RpcError> = std::result::Result<T, E>;
