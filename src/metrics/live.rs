//! The shape of the counters as one JSON-able snapshot, for the status
//! page (`GET /status.json`; `Metrics::live` takes it), and the last hello
//! refusals, which a Prometheus series cannot hold (they carry the client's
//! address and the message).
//!
//! Counters are totals since the broker started; the page takes rates and
//! latency quantiles from the difference between two snapshots, timed by
//! the broker's clock (`at_ms`).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Mutex;

use serde::Serialize;

use crate::error_code::ErrorCode;

/// Hello refusals kept for the status page, newest first.
pub const RECENT_REFUSALS: usize = 50;

/// One refused hello.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    /// Unix millis.
    pub at_ms: i64,
    pub code: &'static str,
    pub message: String,
    /// The client's address (a trusted proxy's `X-Forwarded-For` applied).
    pub client: Option<String>,
}

/// The last [`RECENT_REFUSALS`] refused hellos.
#[derive(Default)]
pub struct Refusals(Mutex<VecDeque<Refusal>>);

impl Refusals {
    pub fn push(&self, code: ErrorCode, message: &str, client: Option<IpAddr>) {
        let mut ring = self.0.lock().expect("refusals lock");
        if ring.len() == RECENT_REFUSALS {
            ring.pop_back();
        }
        ring.push_front(Refusal {
            at_ms: chrono::Utc::now().timestamp_millis(),
            code: code.as_str(),
            message: message.chars().take(200).collect(),
            client: client.map(|ip| ip.to_string()),
        });
    }
    pub fn snapshot(&self) -> Vec<Refusal> {
        self.0
            .lock()
            .expect("refusals lock")
            .iter()
            .cloned()
            .collect()
    }
}

#[derive(Debug, Serialize)]
pub struct Live {
    /// When it was taken, unix millis (the broker's clock).
    pub at_ms: i64,
    /// This node's connections past hello, by role.
    pub connections: Vec<Count>,
    pub actors: Vec<Actors>,
    pub messages: Messages,
    /// Send → first push and send → `client_ack`.
    pub push_seconds: Buckets,
    pub delivery_seconds: Buckets,
    /// Refused hellos since the start, by code.
    pub refusals_total: Vec<(&'static str, u64)>,
    pub recent_refusals: Vec<Refusal>,
}

#[derive(Debug, Serialize)]
pub struct Count {
    pub name: &'static str,
    pub value: i64,
}

/// The actors of one kind.
#[derive(Debug, Serialize)]
pub struct Actors {
    pub kind: &'static str,
    pub running: i64,
    pub messages: u64,
    pub restarts: u64,
}

/// Message and delivery totals.
#[derive(Debug, Serialize)]
pub struct Messages {
    pub accepted: u64,
    pub rejected: u64,
    pub claimed: u64,
    pub pushed: u64,
    pub acked: u64,
    pub redelivered: u64,
    pub leases_expired: u64,
    pub dead_lettered: u64,
    pub slow_consumers_closed: u64,
}

/// A histogram: cumulative counts per upper bound (seconds), as
/// Prometheus has them, the last bound being infinity (`null`).
#[derive(Debug, Serialize)]
pub struct Buckets {
    pub le: Vec<Option<f64>>,
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}
