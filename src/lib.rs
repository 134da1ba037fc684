//! meshbroker: a message broker for meshes of AI agent sessions, host
//! daemons and services.
//!
//! # Layout
//!
//! Lowest layer first. Dependencies run one way: a module uses only modules
//! of its own layer and of those listed before it, and no modules use each
//! other in a circle.
//! `tests/module_graph.rs` holds the same order as data and fails `cargo test`
//! on a module cycle or an upward edge.
//!
//! - Vocabulary
//!   - [`protocol`]: wire frames, decoded and encoded, and their bounds.
//!   - [`ids`]: identifier newtypes, the wire words [`ids::Role`], [`ids::Status`],
//!     [`ids::Priority`], and the connection-key rule.
//!   - [`config`]: the TOML configuration, validated at load.
//!   - [`client_addr`]: an HTTP request's client address, taken from
//!     `X-Forwarded-For` only when the peer is a trusted proxy.
//!   - [`error_code`]: every refusal: wire code, close code, metric label,
//!     permanent or retryable.
//!   - [`crypto`]: ed25519 keys and the exact strings each handshake signs.
//!   - [`tls`]: the listener's certificate (rustls), swappable on SIGHUP,
//!     and the client's trusted authorities for `wss://`.
//!   - [`reload`]: what SIGHUP may change: the new configuration compared
//!     with the running one, key by key.
//!   - [`sd_notify`]: readiness and stopping, told to systemd.
//! - [`client`]: a small real protocol client, used by `meshbroker client`,
//!   the tests and the bench; it needs nothing of the broker.
//! - [`db`]: migrations, and all SQL; [`db::pool`] the pool, which fails fast
//!   while the database is known down (a background probe watches it).
//!   - [`db::schema`]: the diesel schema.
//!   - [`db::queries`]: every query the broker runs while serving, one file per
//!     section (members, presence, messages, queue, sweep).
//!   - [`db::rules`]: the queue's invariants as SQL, each written once (claim
//!     reset, claimable, connection key).
//!   - [`db::lifecycle`]: the janitor's deletes and wake-up query.
//!   - [`db::admin`], [`db::dead_letters`]: the operator commands' statements.
//!   - [`db::embedded`]: the private PostgreSQL cluster used without `database.url`;
//!     [`db::supervisor`] restarts it when it dies.
//!   - `db::text_enums`: the wire words stored as `text`; an unknown one is an error.
//! - [`metrics`]: Prometheus counters and the `/metrics` text.
//! - Work on one database connection, without actors
//!   - [`handshake`]: hello verification, offline checks then database checks.
//!   - [`admin`]: operator actions on meshes and members.
//!   - [`dead_letters`]: operator actions on dead letters.
//! - [`routing`]: routing decisions as pure functions: who receives a send,
//!   which connection claims a delivery, what a hello replaces, whom a kick
//!   names.
//! - [`actors`]: what every actor shares ([`actors::Shared`], the rate limiter).
//!   - [`actors::conn`]: a connection's outward face: what the drain and the
//!     registry may send it, through a handle of `Recipient`s.
//!   - [`actors::backlog`]: one connection's output bounds and socket handle.
//!   - [`actors::drain`]: one per member with a live connection; claims,
//!     pushes, takes acks.
//!   - [`actors::registry`]: every live connection and drain; routes between them.
//!   - [`actors::session`]: one per WebSocket connection, tagged with its
//!     role; its frames are handled by concern in `dispatch`, `hello`,
//!     `send`, `presence` and `kick`.
//!   - [`actors::sweeper`]: supervised; expired leases, dead letters, grace windows.
//!   - [`actors::janitor`]: supervised; retention and expiry deletes, wakes drains.
//! - [`http`]: the listener's routes: `/ws`, `/health`, `/health/ready`,
//!   `/metrics`, `/hook/set-status`.
//! - [`broker`]: starts and stops one broker (the singleton actors, then HTTP).
//! - [`bench`]: `meshbroker bench`, a load generator over [`client`] that
//!   starts its own broker (or targets a running one).
//! - [`cli`]: the command line; `cli::client_cmd` is `meshbroker client`.
//!
//! # Errors
//!
//! - Each layer names its own failures with a `thiserror` enum
//!   ([`config::ConfigError`], [`crypto::KeyError`], [`db::DbError`],
//!   [`admin::AdminError`], [`broker::BrokerError`], …), and wraps a lower
//!   layer's error as its `#[source]` rather than flattening it to text.
//! - Query functions return diesel's `QueryResult`; the caller decides what a
//!   database error means (to a client, `unavailable`).
//! - Actors keep errors typed in their messages and results; they do not
//!   turn them into `String`. An error is logged once, where it is handled.
//! - What a client sees is a typed error code, an [`error_code::ErrorCode`]
//!   (its wire code and close code), never an internal error's text.
//! - `anyhow` only where an error ends as text for a person: [`cli`], the
//!   tests and the bench. [`client`] is their shared client and reports its
//!   failures the same way.

pub mod actors;
pub mod admin;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod client;
pub mod client_addr;
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
pub mod reload;
pub mod routing;
pub mod sd_notify;
pub mod status;
pub mod tls;
