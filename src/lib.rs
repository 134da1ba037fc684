//! meshbroker: a message broker for meshes of AI agent sessions, host
//! daemons and services.
//!
//! # Layout (in the order a message travels)
//! - [`config`]: the TOML configuration.
//! - [`http`]: the listener: `/ws` upgrades, `/health`, `/metrics`, `/hook/set-status`.
//! - [`protocol`]: wire frames, decoded and encoded.
//! - [`actors::session`]: one actor per WebSocket connection, tagged with its [`ids::Role`].
//! - [`actors::registry`]: routes between connections and per-member drains.
//! - [`actors::drain`]: one per member with a live connection; claims, pushes, takes acks.
//! - [`actors::sweeper`]: supervised; clears expired leases, dead-letters, ends grace windows.
//! - [`actors::janitor`]: supervised; deletes rows past retention or expiry, wakes drains.
//! - [`db`]: pool, migrations, schema and the queue queries; [`db::embedded`] the private cluster.
//! - [`metrics`]: Prometheus counters and the `/metrics` text.
//! - [`crypto`]: ed25519 keys and the signed handshake strings.
//! - [`client`]: a small real client, used by `meshbroker client` and the tests.
//! - [`bench`]: `meshbroker bench`, a load generator over [`client`] with its own broker.
//! - [`cli`]: the command line.

pub mod actors;
pub mod admin;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod client;
pub mod config;
pub mod crypto;
pub mod db;
pub mod dead_letters;
pub mod error_code;
pub mod handshake;
pub mod http;
pub mod ids;
pub mod metrics;
pub mod protocol;
pub mod routing;
