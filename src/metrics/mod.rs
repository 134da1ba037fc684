//! Prometheus metrics: lock-free counters the actors bump, rendered as text
//! by `GET /metrics` together with a few gauges read at scrape time (queue
//! depth from the database, pool state).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use crate::db::queries::{MeshBacklog, QueueDepth};
use crate::error_code::ErrorCode;
use crate::ids::Role;

mod live;
use live::{Actors, Buckets, Count, Messages};
pub use live::{Live, Refusal, RECENT_REFUSALS};

/// The actor kinds the metrics count, one label value each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorKind {
    Session,
    Drain,
    Sweeper,
    Registry,
    Janitor,
    /// The group-commit writer of sends.
    Writer,
    /// The batcher of the drains' claims.
    Claimer,
    /// The batcher of acks.
    Acker,
    /// This node in the cluster.
    Bus,
}

/// The actors that run batched rounds.
const BATCHING: [ActorKind; 3] = [ActorKind::Writer, ActorKind::Claimer, ActorKind::Acker];

/// Number of [`ActorKind`]s: the size of every per-kind series.
const KINDS: usize = 9;

impl ActorKind {
    const ALL: [ActorKind; KINDS] = [
        ActorKind::Session,
        ActorKind::Drain,
        ActorKind::Sweeper,
        ActorKind::Registry,
        ActorKind::Janitor,
        ActorKind::Writer,
        ActorKind::Claimer,
        ActorKind::Acker,
        ActorKind::Bus,
    ];
    fn label(self) -> &'static str {
        match self {
            ActorKind::Session => "session",
            ActorKind::Drain => "drain",
            ActorKind::Sweeper => "sweeper",
            ActorKind::Registry => "registry",
            ActorKind::Janitor => "janitor",
            ActorKind::Writer => "writer",
            ActorKind::Claimer => "claimer",
            ActorKind::Acker => "acker",
            ActorKind::Bus => "bus",
        }
    }
}

const PRIORITIES: [&str; 3] = ["now", "next", "low"];

fn role_index(role: Role) -> usize {
    match role {
        Role::ControlPlane => 0,
        Role::Session => 1,
        Role::Service => 2,
    }
}

/// A counter family keyed by one free label value (a reason).
#[derive(Default)]
struct Labeled(Mutex<BTreeMap<&'static str, u64>>);

impl Labeled {
    fn inc(&self, label: &'static str) {
        *self
            .0
            .lock()
            .expect("metrics lock")
            .entry(label)
            .or_default() += 1;
    }
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let map = self.0.lock().expect("metrics lock");
        map.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A fixed-bucket histogram; sums kept in microseconds to stay atomic.
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
    fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add((seconds * 1e6) as u64, Relaxed);
    }
    fn render(&self, out: &mut String, name: &str, help: &str) {
        self.render_labeled(out, name, help, "");
    }

    /// As `render`, with `labels` (`a="b"`, or empty) on every sample.
    fn render_labeled(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let (sep, braces) = if labels.is_empty() {
            ("", String::new())
        } else {
            (",", format!("{{{labels}}}"))
        };
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                bucket.load(Relaxed)
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// Everything `/metrics` shows that the broker counts itself.
pub struct Metrics {
    connections: [AtomicI64; 3],
    connections_total: [AtomicU64; 3],
    connections_rejected: Labeled,
    recent_refusals: live::Refusals,
    messages_accepted: [AtomicU64; 3],
    messages_rejected: Labeled,
    /// Frames refused after the hello or outside it: error frames that
    /// leave the connection open, and the 1009 / 1002 closes.
    frames_rejected: Labeled,
    pub deliveries_claimed: AtomicU64,
    pub deliveries_pushed: AtomicU64,
    pub deliveries_acked: AtomicU64,
    pub deliveries_redelivered: AtomicU64,
    pub leases_expired: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub sweeper_runs: AtomicU64,
    /// Connections cut off because their client stopped reading.
    pub slow_consumers: AtomicU64,
    delivery_seconds: Histogram,
    push_seconds: Histogram,
    actors: [AtomicI64; KINDS],
    actor_messages: [AtomicU64; KINDS],
    actor_restarts: [AtomicU64; KINDS],
    /// Rounds run by the batching actors, and the requests they carried.
    batches: [AtomicU64; KINDS],
    batched_requests: [AtomicU64; KINDS],
    /// Time those rounds took, in microseconds.
    batch_micros: [AtomicU64; KINDS],
    /// Rows the janitor deleted, by table (see [`RetentionTable`]).
    retention_deleted: [AtomicU64; 3],
    pub janitor_runs: AtomicU64,
    /// Times the supervisor restarted the embedded PostgreSQL.
    embedded_postgres_restarts: AtomicU64,
    /// What the bus counts (this node in the cluster).
    pub cluster: ClusterCounters,
}

/// What the cluster bus counts; rendered by [`Metrics::render_cluster`].
pub struct ClusterCounters {
    /// Notice items handed to the bus (one per wake-up batch, event, …).
    pub notices: AtomicU64,
    /// Notifications sent: one per node per flush, whatever it carried.
    pub notifications_sent: AtomicU64,
    pub notifications_received: AtomicU64,
    /// Notice items that did not need a notification of their own: folded
    /// into a repeat while a flush ran, or sharing one node's notification.
    pub coalesced: AtomicU64,
    /// Notice items dropped because the bus was down (the poll covers them).
    pub dropped: AtomicU64,
    /// Members the safety-net poll woke that had waited longer than one
    /// poll interval: a notice that was lost, or never sent.
    pub polled: AtomicU64,
    pub reconnects: AtomicU64,
    /// Other nodes this one declared dead (and took over).
    pub nodes_declared_dead: AtomicU64,
    /// Times this node found itself declared dead and closed its sockets.
    pub fenced: AtomicU64,
    /// From a notification's send to its receipt here (across hosts this
    /// includes their clock difference).
    notice_seconds: Histogram,
}

impl ClusterCounters {
    fn new() -> Self {
        ClusterCounters {
            notices: AtomicU64::new(0),
            notifications_sent: AtomicU64::new(0),
            notifications_received: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            polled: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            nodes_declared_dead: AtomicU64::new(0),
            fenced: AtomicU64::new(0),
            notice_seconds: Histogram::new(),
        }
    }

    pub fn notice_latency(&self, seconds: f64) {
        self.notice_seconds.observe(seconds);
    }
}

/// The tables the janitor deletes from, one label value each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionTable {
    Message,
    MessageQueue,
    Presence,
}

impl RetentionTable {
    const ALL: [RetentionTable; 3] = [
        RetentionTable::Message,
        RetentionTable::MessageQueue,
        RetentionTable::Presence,
    ];
    fn label(self) -> &'static str {
        match self {
            RetentionTable::Message => "message",
            RetentionTable::MessageQueue => "message_queue",
            RetentionTable::Presence => "presence",
        }
    }
}

/// Pool connections by state, read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolState {
    pub idle: u32,
    pub in_use: u32,
    /// The most the pool opens (`database.pool_size`).
    pub max: u32,
}

/// Writes one counter series per actor kind in `kinds`.
fn per_kind_counter<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    values: &[AtomicU64; KINDS],
    kinds: impl Iterator<Item = &'a ActorKind>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for k in kinds {
        let _ = writeln!(
            out,
            "{name}{{kind=\"{}\"}} {}",
            k.label(),
            values[*k as usize].load(Relaxed)
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            connections: Default::default(),
            connections_total: Default::default(),
            connections_rejected: Labeled::default(),
            recent_refusals: live::Refusals::default(),
            messages_accepted: Default::default(),
            messages_rejected: Labeled::default(),
            frames_rejected: Labeled::default(),
            deliveries_claimed: AtomicU64::new(0),
            deliveries_pushed: AtomicU64::new(0),
            deliveries_acked: AtomicU64::new(0),
            deliveries_redelivered: AtomicU64::new(0),
            leases_expired: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            sweeper_runs: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
            delivery_seconds: Histogram::new(),
            push_seconds: Histogram::new(),
            actors: Default::default(),
            actor_messages: Default::default(),
            actor_restarts: Default::default(),
            batches: Default::default(),
            batched_requests: Default::default(),
            batch_micros: Default::default(),
            retention_deleted: Default::default(),
            janitor_runs: AtomicU64::new(0),
            embedded_postgres_restarts: AtomicU64::new(0),
            cluster: ClusterCounters::new(),
        }
    }

    pub fn connection_opened(&self, role: Role) {
        self.connections[role_index(role)].fetch_add(1, Relaxed);
        self.connections_total[role_index(role)].fetch_add(1, Relaxed);
    }
    pub fn connection_closed(&self, role: Role) {
        self.connections[role_index(role)].fetch_sub(1, Relaxed);
    }
    pub fn message_accepted(&self, priority: &str) {
        if let Some(i) = PRIORITIES.iter().position(|p| *p == priority) {
            self.messages_accepted[i].fetch_add(1, Relaxed);
        }
    }
    pub fn message_rejected(&self, reason: ErrorCode) {
        self.messages_rejected.inc(reason.as_str());
    }
    /// A frame refused: `reason` is the error code sent, or
    /// `frame_too_large` (closed 1009) / `protocol_error` (closed 1002),
    /// or `ignored` / `settle_overflow` (dropped unanswered).
    pub fn frame_rejected(&self, reason: ErrorCode) {
        self.frames_rejected.inc(reason.as_str());
    }
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
    pub fn observe_delivery(&self, seconds: f64) {
        self.delivery_seconds.observe(seconds);
    }
    pub fn observe_first_push(&self, seconds: f64) {
        self.push_seconds.observe(seconds);
    }
    pub fn actor_started(&self, kind: ActorKind) {
        self.actors[kind as usize].fetch_add(1, Relaxed);
    }
    pub fn actor_stopped(&self, kind: ActorKind) {
        self.actors[kind as usize].fetch_sub(1, Relaxed);
    }
    pub fn actor_message(&self, kind: ActorKind) {
        self.actor_messages[kind as usize].fetch_add(1, Relaxed);
    }
    /// A batching actor ran one round of `requests`.
    pub fn batch_run(&self, kind: ActorKind, requests: usize) {
        self.batches[kind as usize].fetch_add(1, Relaxed);
        self.batched_requests[kind as usize].fetch_add(requests as u64, Relaxed);
    }
    /// A round of a batching actor ended after `seconds`.
    pub fn batch_done(&self, kind: ActorKind, seconds: f64) {
        self.batch_micros[kind as usize].fetch_add((seconds * 1e6) as u64, Relaxed);
    }
    pub fn actor_restarted(&self, kind: ActorKind) {
        self.actor_restarts[kind as usize].fetch_add(1, Relaxed);
    }
    /// Session actors alive now (connections, with or without a hello).
    pub fn live_sessions(&self) -> i64 {
        self.actors[ActorKind::Session as usize].load(Relaxed)
    }
    pub fn actor_restarts(&self, kind: ActorKind) -> u64 {
        self.actor_restarts[kind as usize].load(Relaxed)
    }
    pub fn embedded_postgres_restarted(&self) {
        self.embedded_postgres_restarts.fetch_add(1, Relaxed);
    }
    pub fn retention_deleted(&self, table: RetentionTable, rows: u64) {
        self.retention_deleted[table as usize].fetch_add(rows, Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, queue: Option<QueueDepth>, pool: PoolState) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let by_role = |out: &mut String, name: &str, kind: &str, help: &str, v: [i64; 3]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for role in Role::ALL {
                let _ = writeln!(out, "{name}{{role=\"{role}\"}} {}", v[role_index(role)]);
            }
        };
        by_role(
            &mut out,
            "meshbroker_connections",
            "gauge",
            "Live WebSocket connections past hello, by role.",
            std::array::from_fn(|i| self.connections[i].load(Relaxed)),
        );
        by_role(
            &mut out,
            "meshbroker_connections_total",
            "counter",
            "Connections accepted (hello_ack sent), by role.",
            std::array::from_fn(|i| self.connections_total[i].load(Relaxed) as i64),
        );
        labeled(
            &mut out,
            "meshbroker_connections_rejected_total",
            "Hellos refused, by reason (the error code).",
            &self.connections_rejected.snapshot(),
        );
        let _ = writeln!(
            out,
            "# HELP meshbroker_messages_accepted_total Sends answered queued:true, by priority.\n# TYPE meshbroker_messages_accepted_total counter"
        );
        for (i, p) in PRIORITIES.iter().enumerate() {
            let _ = writeln!(
                out,
                "meshbroker_messages_accepted_total{{priority=\"{p}\"}} {}",
                self.messages_accepted[i].load(Relaxed)
            );
        }
        labeled(
            &mut out,
            "meshbroker_messages_rejected_total",
            "Sends refused, by reason (the error code).",
            &self.messages_rejected.snapshot(),
        );
        labeled(
            &mut out,
            "meshbroker_frames_rejected_total",
            "Frames refused other than hellos and sends, by reason (the error code; frame_too_large closed 1009, protocol_error closed 1002).",
            &self.frames_rejected.snapshot(),
        );
        let counters: [(&str, &str, &AtomicU64); 8] = [
            (
                "meshbroker_deliveries_claimed_total",
                "Deliveries claimed with a lease.",
                &self.deliveries_claimed,
            ),
            (
                "meshbroker_deliveries_pushed_total",
                "Pushes written to a connection.",
                &self.deliveries_pushed,
            ),
            (
                "meshbroker_deliveries_acked_total",
                "Deliveries marked delivered by a client_ack.",
                &self.deliveries_acked,
            ),
            (
                "meshbroker_deliveries_redelivered_total",
                "Claims of a delivery pushed before (attempt > 1).",
                &self.deliveries_redelivered,
            ),
            (
                "meshbroker_leases_expired_total",
                "Leases the sweeper found expired and cleared.",
                &self.leases_expired,
            ),
            (
                "meshbroker_deliveries_dead_lettered_total",
                "Deliveries dead-lettered after max_attempts.",
                &self.dead_lettered,
            ),
            (
                "meshbroker_sweeper_runs_total",
                "Completed sweeper passes.",
                &self.sweeper_runs,
            ),
            (
                "meshbroker_slow_consumers_closed_total",
                "Connections closed because their client stopped reading (outbound backlog over its bound).",
                &self.slow_consumers,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Relaxed)
            );
        }
        if let Some(q) = queue {
            let _ = writeln!(
                out,
                "# HELP meshbroker_queue_deliveries Undelivered deliveries in the database, by state.\n# TYPE meshbroker_queue_deliveries gauge"
            );
            for (state, v) in [
                ("pending", q.pending),
                ("claimed", q.claimed),
                ("dead", q.dead),
            ] {
                let _ = writeln!(out, "meshbroker_queue_deliveries{{state=\"{state}\"}} {v}");
            }
        }
        self.delivery_seconds.render(
            &mut out,
            "meshbroker_delivery_seconds",
            "Time from a message's acceptance to its client_ack.",
        );
        self.push_seconds.render(
            &mut out,
            "meshbroker_push_seconds",
            "Time from a message's acceptance to its first push.",
        );
        let _ = writeln!(
            out,
            "# HELP meshbroker_janitor_runs_total Completed janitor passes.\n# TYPE meshbroker_janitor_runs_total counter\nmeshbroker_janitor_runs_total {}",
            self.janitor_runs.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP meshbroker_retention_deleted_rows_total Rows the janitor deleted (retention, expiry, closed presence), by table.\n# TYPE meshbroker_retention_deleted_rows_total counter"
        );
        for t in RetentionTable::ALL {
            let _ = writeln!(
                out,
                "meshbroker_retention_deleted_rows_total{{table=\"{}\"}} {}",
                t.label(),
                self.retention_deleted[t as usize].load(Relaxed)
            );
        }
        let per_kind: [(&str, &str, &str, &[AtomicI64; KINDS]); 1] = [(
            "meshbroker_actors",
            "gauge",
            "Running actors, by kind.",
            &self.actors,
        )];
        for (name, kind, help, values) in per_kind {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for k in ActorKind::ALL {
                let _ = writeln!(
                    out,
                    "{name}{{kind=\"{}\"}} {}",
                    k.label(),
                    values[k as usize].load(Relaxed)
                );
            }
        }
        for (name, help, values) in [
            (
                "meshbroker_actor_messages_total",
                "Messages handled by actors, by kind.",
                &self.actor_messages,
            ),
            (
                "meshbroker_actor_restarts_total",
                "Supervisor restarts of actors, by kind.",
                &self.actor_restarts,
            ),
        ] {
            per_kind_counter(&mut out, name, help, values, ActorKind::ALL.iter());
        }
        for (name, help, values) in [
            (
                "meshbroker_batches_total",
                "Rounds (one database transaction each) run by the batching actors, by kind.",
                &self.batches,
            ),
            (
                "meshbroker_batched_requests_total",
                "Requests carried by those rounds, by kind: divided by meshbroker_batches_total, the mean batch size.",
                &self.batched_requests,
            ),
        ] {
            per_kind_counter(&mut out, name, help, values, BATCHING.iter());
        }
        let name = "meshbroker_batch_seconds_total";
        let _ = writeln!(
            out,
            "# HELP {name} Time the batching actors' rounds took, by kind: its rate is how busy each is (1 = always running a round).\n# TYPE {name} counter"
        );
        for k in BATCHING {
            let _ = writeln!(
                out,
                "{name}{{kind=\"{}\"}} {}",
                k.label(),
                self.batch_micros[k as usize].load(Relaxed) as f64 / 1e6
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshbroker_db_pool_connections Database pool connections, by state.\n# TYPE meshbroker_db_pool_connections gauge\nmeshbroker_db_pool_connections{{state=\"idle\"}} {}\nmeshbroker_db_pool_connections{{state=\"in_use\"}} {}\n# HELP meshbroker_db_pool_max_connections The most connections the pool opens (database.pool_size).\n# TYPE meshbroker_db_pool_max_connections gauge\nmeshbroker_db_pool_max_connections {}",
            pool.idle, pool.in_use, pool.max
        );
        let _ = writeln!(
            out,
            "# HELP meshbroker_embedded_postgres_restarts_total Restarts of the embedded PostgreSQL after it died.\n# TYPE meshbroker_embedded_postgres_restarts_total counter\nmeshbroker_embedded_postgres_restarts_total {}",
            self.embedded_postgres_restarts.load(Relaxed)
        );
        out
    }
}

impl Histogram {
    fn live(&self) -> Buckets {
        let count = self.count.load(Relaxed);
        let mut le: Vec<Option<f64>> = BUCKETS.iter().copied().map(Some).collect();
        le.push(None);
        let mut cumulative: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        cumulative.push(count);
        Buckets {
            le,
            cumulative,
            count,
            sum: self.sum_micros.load(Relaxed) as f64 / 1e6,
        }
    }
}

impl Metrics {
    /// A hello refused with `code`: counted by code, and kept among the
    /// recent refusals with its message and client address.
    pub fn hello_refused(&self, code: ErrorCode, message: &str, client: Option<IpAddr>) {
        self.connections_rejected.inc(code.as_str());
        self.recent_refusals.push(code, message, client);
    }

    /// Everything the broker counts itself, now.
    pub fn live(&self) -> Live {
        Live {
            at_ms: chrono::Utc::now().timestamp_millis(),
            connections: Role::ALL
                .iter()
                .map(|r| Count {
                    name: r.as_str(),
                    value: self.connections[role_index(*r)].load(Relaxed),
                })
                .collect(),
            actors: ActorKind::ALL
                .iter()
                .map(|k| Actors {
                    kind: k.label(),
                    running: self.actors[*k as usize].load(Relaxed),
                    messages: self.actor_messages[*k as usize].load(Relaxed),
                    restarts: self.actor_restarts[*k as usize].load(Relaxed),
                })
                .collect(),
            messages: Messages {
                accepted: (0..PRIORITIES.len())
                    .map(|i| self.messages_accepted[i].load(Relaxed))
                    .sum(),
                rejected: self
                    .messages_rejected
                    .snapshot()
                    .iter()
                    .map(|(_, n)| n)
                    .sum(),
                claimed: self.deliveries_claimed.load(Relaxed),
                pushed: self.deliveries_pushed.load(Relaxed),
                acked: self.deliveries_acked.load(Relaxed),
                redelivered: self.deliveries_redelivered.load(Relaxed),
                leases_expired: self.leases_expired.load(Relaxed),
                dead_lettered: self.dead_lettered.load(Relaxed),
                slow_consumers_closed: self.slow_consumers.load(Relaxed),
            },
            push_seconds: self.push_seconds.live(),
            delivery_seconds: self.delivery_seconds.live(),
            refusals_total: self.connections_rejected.snapshot(),
            recent_refusals: self.recent_refusals.snapshot(),
        }
    }
}

/// Meshes `/metrics` shows the backlog gauges of at most (the oldest first).
pub const BACKLOG_MESHES: i64 = 50;

impl Metrics {
    /// The per-mesh gauges an alert needs (read by the leader at scrape
    /// time, at most [`BACKLOG_MESHES`] meshes).
    pub fn render_backlog(rows: &[MeshBacklog]) -> String {
        let mut out = String::with_capacity(256 + rows.len() * 120);
        let _ = writeln!(
            out,
            "# HELP meshbroker_queue_oldest_undelivered_seconds Age of the oldest delivery neither delivered nor dead, by mesh (the {BACKLOG_MESHES} oldest meshes).\n# TYPE meshbroker_queue_oldest_undelivered_seconds gauge"
        );
        for r in rows {
            if let Some(age) = r.oldest_undelivered_s {
                let _ = writeln!(
                    out,
                    "meshbroker_queue_oldest_undelivered_seconds{{mesh=\"{}\"}} {age:.3}",
                    r.mesh_id
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP meshbroker_dead_letters Dead-lettered deliveries waiting for an operator, by mesh (the same meshes).\n# TYPE meshbroker_dead_letters gauge"
        );
        for r in rows.iter().filter(|r| r.dead_letters > 0) {
            let _ = writeln!(
                out,
                "meshbroker_dead_letters{{mesh=\"{}\"}} {}",
                r.mesh_id, r.dead_letters
            );
        }
        out
    }

    /// The cluster's series, each labelled with this node's id.
    pub fn render_cluster(&self, node: &str, live_nodes: i64, leader: bool) -> String {
        let c = &self.cluster;
        let mut out = String::with_capacity(2048);
        let _ = writeln!(
            out,
            "# HELP meshbroker_cluster_nodes Live nodes of the cluster, as this node's last heartbeat saw them.\n# TYPE meshbroker_cluster_nodes gauge\nmeshbroker_cluster_nodes{{node=\"{node}\"}} {live_nodes}"
        );
        let _ = writeln!(
            out,
            "# HELP meshbroker_cluster_leader 1 on the node that runs the cluster-wide housekeeping.\n# TYPE meshbroker_cluster_leader gauge\nmeshbroker_cluster_leader{{node=\"{node}\"}} {}",
            u8::from(leader)
        );
        let counters: [(&str, &str, &AtomicU64); 9] = [
            (
                "notices",
                "Notice items for other nodes (wake-ups, events, closes).",
                &c.notices,
            ),
            (
                "notifications_sent",
                "NOTIFYs sent: one per node per flush.",
                &c.notifications_sent,
            ),
            (
                "notifications_received",
                "Notifications received from other nodes.",
                &c.notifications_received,
            ),
            (
                "notices_coalesced",
                "Notice items that shared a notification or were folded into a repeat.",
                &c.coalesced,
            ),
            (
                "notices_dropped",
                "Notice items dropped while the bus was down (the poll covers them).",
                &c.dropped,
            ),
            (
                "missed_then_polled",
                "Members the safety-net poll woke after waiting longer than one poll interval.",
                &c.polled,
            ),
            (
                "bus_reconnects",
                "Times the bus's listening connection was re-established.",
                &c.reconnects,
            ),
            (
                "nodes_declared_dead",
                "Other nodes this node declared dead and took over.",
                &c.nodes_declared_dead,
            ),
            (
                "fenced",
                "Times this node found itself declared dead and closed its sockets.",
                &c.fenced,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP meshbroker_cluster_{name}_total {help}\n# TYPE meshbroker_cluster_{name}_total counter\nmeshbroker_cluster_{name}_total{{node=\"{node}\"}} {}",
                v.load(Relaxed)
            );
        }
        c.notice_seconds.render_labeled(
            &mut out,
            "meshbroker_cluster_notice_seconds",
            "From a notification's send on another node to its receipt here.",
            &format!("node=\"{node}\""),
        );
        out
    }
}

fn labeled(out: &mut String, name: &str, help: &str, values: &[(&'static str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (reason, v) in values {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_moving_series() {
        let m = Metrics::new();
        m.connection_opened(Role::Session);
        m.message_accepted("now");
        m.message_rejected(ErrorCode::RateLimit);
        m.frame_rejected(ErrorCode::FrameTooLarge);
        m.observe_delivery(0.02);
        m.actor_started(ActorKind::Drain);
        m.actor_restarted(ActorKind::Janitor);
        m.retention_deleted(RetentionTable::MessageQueue, 1500);
        m.embedded_postgres_restarted();
        let text = m.render(
            Some(QueueDepth {
                pending: 3,
                claimed: 1,
                dead: 0,
            }),
            PoolState {
                idle: 2,
                in_use: 1,
                max: 4,
            },
        );
        assert!(text.contains("meshbroker_connections{role=\"session\"} 1"));
        assert!(text.contains("meshbroker_messages_accepted_total{priority=\"now\"} 1"));
        assert!(text.contains("meshbroker_messages_rejected_total{reason=\"rate_limit\"} 1"));
        assert!(text.contains("meshbroker_frames_rejected_total{reason=\"frame_too_large\"} 1"));
        assert!(text.contains("meshbroker_delivery_seconds_bucket{le=\"0.025\"} 1"));
        assert!(text.contains("meshbroker_actors{kind=\"drain\"} 1"));
        assert!(text.contains("meshbroker_actor_restarts_total{kind=\"janitor\"} 1"));
        assert!(
            text.contains("meshbroker_retention_deleted_rows_total{table=\"message_queue\"} 1500")
        );
        assert!(text.contains("meshbroker_retention_deleted_rows_total{table=\"presence\"} 0"));
        assert!(text.contains("meshbroker_queue_deliveries{state=\"pending\"} 3"));
        assert!(text.contains("meshbroker_db_pool_max_connections 4"));
        assert!(text.contains("meshbroker_db_pool_connections{state=\"in_use\"} 1"));
        assert!(text.contains("meshbroker_embedded_postgres_restarts_total 1"));
    }

    #[test]
    fn a_snapshot_has_the_totals_and_the_newest_refusals_first() {
        let m = Metrics::new();
        m.connection_opened(Role::Service);
        m.message_accepted("low");
        m.observe_first_push(0.003);
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        for i in 0..RECENT_REFUSALS + 5 {
            m.hello_refused(ErrorCode::BadSignature, &format!("no {i}"), Some(ip));
        }
        let live = m.live();
        assert_eq!(live.messages.accepted, 1);
        let service = live.connections.iter().find(|c| c.name == "service");
        assert_eq!(service.map(|c| c.value), Some(1));
        assert_eq!(live.push_seconds.count, 1);
        // 0.003 s is above the 2.5 ms bound and within 5 ms.
        assert_eq!(&live.push_seconds.cumulative[..3], &[0, 0, 1]);
        assert_eq!(live.push_seconds.le.last(), Some(&None));
        assert_eq!(
            live.refusals_total,
            vec![("bad_signature", RECENT_REFUSALS as u64 + 5)]
        );
        assert_eq!(live.recent_refusals.len(), RECENT_REFUSALS);
        let newest = &live.recent_refusals[0];
        assert_eq!(newest.message, format!("no {}", RECENT_REFUSALS + 4));
        assert_eq!(newest.client.as_deref(), Some("10.1.2.3"));
    }
}
