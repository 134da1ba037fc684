//! Every query the broker runs while serving, one small function each.
//!
//! The queue queries are written in SQL (claim, ack, sweep): they are the
//! heart of the broker, and `UPDATE … FROM (SELECT … FOR UPDATE SKIP LOCKED)`
//! reads best as the SQL it is. Everything else uses the diesel DSL.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{
    Bool, Double, Int4, Int8, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde_json::Value;
use uuid::Uuid;

use super::schema::mesh::{hello_seen, member, message, message_queue, presence};
use crate::metrics::QueueDepth;

type Conn = AsyncPgConnection;

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

// ---------------------------------------------------------------------------
// Members and the handshake

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = member)]
pub struct MemberRow {
    pub id: Uuid,
    pub mesh_id: Uuid,
    pub name: String,
    pub pubkey: String,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

pub async fn member_by_pubkey(
    conn: &mut Conn,
    mesh_id: Uuid,
    pubkey: &str,
) -> QueryResult<Option<MemberRow>> {
    member::table
        .filter(member::mesh_id.eq(mesh_id))
        .filter(member::pubkey.eq(pubkey))
        .select(MemberRow::as_select())
        .first(conn)
        .await
        .optional()
}

/// Records an accepted hello signature; false when it was already seen
/// (a replay).
pub async fn record_hello(conn: &mut Conn, signature: &str) -> QueryResult<bool> {
    let inserted = diesel::insert_into(hello_seen::table)
        .values(hello_seen::signature.eq(signature))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(inserted == 1)
}

// ---------------------------------------------------------------------------
// Presence

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = presence)]
pub struct NewPresence {
    pub id: Uuid,
    pub mesh_id: Uuid,
    pub member_id: Uuid,
    pub session_id: String,
    pub session_pubkey: Option<String>,
    pub role: String,
    pub display_name: String,
    pub groups: Value,
    pub pid: Option<i64>,
    pub cwd: Option<String>,
    pub hostname: Option<String>,
    pub peer_type: Option<String>,
    pub channel: Option<String>,
    pub model: Option<String>,
    pub broker_node_id: Uuid,
}

/// What [`open_presence`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// The mesh already has `max_live` live connections: nothing inserted.
    MeshFull,
    /// Inserted; `silent` when it took over a connection in its grace window.
    Opened { silent: bool },
}

/// Inserts a new connection's presence row, unless the mesh already has
/// `max_live` live connections. If a closed connection with the same
/// identity is inside its grace window, that window ends here and the new
/// connection takes it over silently.
///
/// The count and the insert run under a per-mesh transaction lock, so
/// simultaneous hellos cannot take the mesh past its cap.
pub async fn open_presence(
    conn: &mut Conn,
    row: &NewPresence,
    max_live: i64,
) -> QueryResult<Opened> {
    let row = row.clone();
    conn.transaction::<_, diesel::result::Error, _>(async move |conn| {
        diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))")
            .bind::<SqlUuid, _>(row.mesh_id)
            .execute(conn)
            .await?;
        let live: i64 = presence::table
            .filter(presence::mesh_id.eq(row.mesh_id))
            .filter(presence::disconnected_at.is_null())
            .count()
            .get_result(conn)
            .await?;
        if live >= max_live {
            return Ok(Opened::MeshFull);
        }
        let in_grace = presence::table
            .filter(presence::mesh_id.eq(row.mesh_id))
            .filter(presence::grace_until.gt(diesel::dsl::now));
        let taken: Vec<Uuid> = if row.role == "session" {
            diesel::update(in_grace.filter(presence::role.eq("session")).filter(
                presence::session_pubkey.eq(row.session_pubkey.clone().unwrap_or_default()),
            ))
            .set(presence::grace_until.eq(None::<DateTime<Utc>>))
            .returning(presence::id)
            .get_results(conn)
            .await?
        } else {
            diesel::update(
                in_grace
                    .filter(presence::role.ne("session"))
                    .filter(presence::member_id.eq(row.member_id))
                    .filter(presence::session_id.eq(&row.session_id)),
            )
            .set(presence::grace_until.eq(None::<DateTime<Utc>>))
            .returning(presence::id)
            .get_results(conn)
            .await?
        };
        diesel::insert_into(presence::table)
            .values(&row)
            .execute(conn)
            .await?;
        Ok(Opened::Opened {
            silent: !taken.is_empty(),
        })
    })
    .await
}

/// Marks a connection closed; with `grace` it stays listed (and can be
/// taken over) until then.
pub async fn close_presence(
    conn: &mut Conn,
    id: Uuid,
    grace: Option<std::time::Duration>,
) -> QueryResult<()> {
    let grace_until = grace.map(|g| Utc::now() + chrono::Duration::from_std(g).unwrap_or_default());
    diesel::update(presence::table.find(id))
        .set((
            presence::disconnected_at.eq(diesel::dsl::now),
            presence::grace_until.eq(grace_until),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_status(conn: &mut Conn, id: Uuid, status: &str) -> QueryResult<()> {
    diesel::update(presence::table.find(id))
        .set(presence::status.eq(status))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_summary(conn: &mut Conn, id: Uuid, summary: Option<&str>) -> QueryResult<()> {
    diesel::update(presence::table.find(id))
        .set(presence::summary.eq(summary))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_visible(conn: &mut Conn, id: Uuid, visible: bool) -> QueryResult<()> {
    diesel::update(presence::table.find(id))
        .set(presence::visible.eq(visible))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_groups(conn: &mut Conn, id: Uuid, groups: &Value) -> QueryResult<()> {
    diesel::update(presence::table.find(id))
        .set(presence::groups.eq(groups))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn touch_presence(conn: &mut Conn, ids: &[Uuid]) -> QueryResult<()> {
    diesel::update(presence::table.filter(presence::id.eq_any(ids)))
        .set(presence::last_seen_at.eq(diesel::dsl::now))
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(Debug, Clone, Queryable)]
pub struct PeerRow {
    pub id: Uuid,
    pub member_id: Uuid,
    pub member_pubkey: String,
    pub session_id: String,
    pub session_pubkey: Option<String>,
    pub role: String,
    pub display_name: String,
    pub status: String,
    pub summary: Option<String>,
    pub groups: Value,
    pub visible: bool,
    pub cwd: Option<String>,
    pub hostname: Option<String>,
    pub peer_type: Option<String>,
    pub channel: Option<String>,
    pub model: Option<String>,
    pub connected_at: DateTime<Utc>,
}

/// Connections of a mesh that are live or inside their grace window.
pub async fn listed_presence(conn: &mut Conn, mesh_id: Uuid) -> QueryResult<Vec<PeerRow>> {
    presence::table
        .inner_join(member::table)
        .filter(presence::mesh_id.eq(mesh_id))
        .filter(
            presence::disconnected_at
                .is_null()
                .or(presence::grace_until.gt(diesel::dsl::now)),
        )
        .order(presence::connected_at)
        .select((
            presence::id,
            presence::member_id,
            member::pubkey,
            presence::session_id,
            presence::session_pubkey,
            presence::role,
            presence::display_name,
            presence::status,
            presence::summary,
            presence::groups,
            presence::visible,
            presence::cwd,
            presence::hostname,
            presence::peer_type,
            presence::channel,
            presence::model,
            presence::connected_at,
        ))
        .load(conn)
        .await
}

/// The member that ever connected in this mesh with session pubkey `key`.
///
/// A `session_hello` proves the key (the session signs with it); a plain
/// `hello` only names one, so any member could name another's session key
/// there. The proven owner therefore wins over every hello that named the
/// key, however recent.
pub async fn member_of_session(
    conn: &mut Conn,
    mesh_id: Uuid,
    key: &str,
) -> QueryResult<Option<Uuid>> {
    presence::table
        .filter(presence::mesh_id.eq(mesh_id))
        .filter(presence::session_pubkey.eq(key))
        .order((
            presence::role.eq("session").desc(),
            presence::connected_at.desc(),
        ))
        .select(presence::member_id)
        .first(conn)
        .await
        .optional()
}

/// Whether a member other than `member_id` proved session key `key` in
/// this mesh (a `session` row: only `session_hello` makes those).
pub async fn session_key_proven_by_other(
    conn: &mut Conn,
    mesh_id: Uuid,
    key: &str,
    member_id: Uuid,
) -> QueryResult<bool> {
    diesel::select(diesel::dsl::exists(
        presence::table
            .filter(presence::mesh_id.eq(mesh_id))
            .filter(presence::session_pubkey.eq(key))
            .filter(presence::role.eq("session"))
            .filter(presence::member_id.ne(member_id)),
    ))
    .get_result(conn)
    .await
}

/// Live `session` connections whose session id is `session_id` (the hook).
pub async fn live_sessions_by_session_id(
    conn: &mut Conn,
    session_id: &str,
) -> QueryResult<Vec<(Uuid, String)>> {
    presence::table
        .filter(presence::session_id.eq(session_id))
        .filter(presence::role.eq("session"))
        .filter(presence::disconnected_at.is_null())
        .select((presence::id, presence::status))
        .load(conn)
        .await
}

/// Live `session` connections matching a pid and/or cwd (loopback hooks only).
pub async fn live_sessions_by_process(
    conn: &mut Conn,
    pid: Option<i64>,
    cwd: Option<&str>,
) -> QueryResult<Vec<(Uuid, String)>> {
    let mut q = presence::table
        .filter(presence::role.eq("session"))
        .filter(presence::disconnected_at.is_null())
        .select((presence::id, presence::status))
        .into_boxed();
    if let Some(pid) = pid {
        q = q.filter(presence::pid.eq(pid));
    }
    if let Some(cwd) = cwd {
        q = q.filter(presence::cwd.eq(cwd));
    }
    q.load(conn).await
}

// ---------------------------------------------------------------------------
// Sending

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = message)]
pub struct NewMessage {
    pub id: Uuid,
    pub mesh_id: Uuid,
    pub sender_member_id: Uuid,
    pub sender_session_pubkey: Option<String>,
    pub sender_name: String,
    pub target_spec: String,
    pub priority: String,
    pub nonce: String,
    pub ciphertext: String,
    pub reply_to_id: Option<String>,
    pub mentions: Option<Value>,
    pub client_message_id: Option<String>,
    pub request_fingerprint: Option<String>,
    pub dedupe_key: Option<String>,
    pub expires_at: DateTime<Utc>,
}

/// One recipient of a message: a member, or one of its connections by key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Recipient {
    pub member_id: Uuid,
    pub key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    Stored {
        message_id: Uuid,
        recipients: u32,
    },
    Duplicate {
        message_id: Uuid,
        recipients: u32,
    },
    KeyReused,
    /// The sender was revoked after its hello (its connections are closed
    /// by the next sweeper pass); nothing was stored.
    SenderRevoked,
}

/// Stores a message and one delivery per recipient, in one transaction,
/// honouring the sender's idempotency window.
pub async fn store_message(
    conn: &mut Conn,
    msg: NewMessage,
    recipients: Vec<Recipient>,
    dedupe_window: std::time::Duration,
) -> QueryResult<SendOutcome> {
    conn.transaction::<_, diesel::result::Error, _>(async move |conn| {
        {
            let revoked_at: Option<DateTime<Utc>> = member::table
                .find(msg.sender_member_id)
                .select(member::revoked_at)
                .first(conn)
                .await?;
            if revoked_at.is_some() {
                return Ok(SendOutcome::SenderRevoked);
            }
            if let Some(key) = &msg.dedupe_key {
                // A key whose window has closed is free again.
                let cutoff =
                    Utc::now() - chrono::Duration::from_std(dedupe_window).unwrap_or_default();
                diesel::update(
                    message::table
                        .filter(message::sender_member_id.eq(msg.sender_member_id))
                        .filter(message::dedupe_key.eq(key))
                        .filter(message::created_at.lt(cutoff)),
                )
                .set(message::dedupe_key.eq(None::<String>))
                .execute(conn)
                .await?;
            }
            let inserted: Option<(Uuid, DateTime<Utc>)> = diesel::insert_into(message::table)
                .values(&msg)
                .on_conflict((message::sender_member_id, message::dedupe_key))
                .do_nothing()
                .returning((message::id, message::created_at))
                .get_result(conn)
                .await
                .optional()?;
            let Some((message_id, created_at)) = inserted else {
                let (id, fingerprint): (Uuid, Option<String>) = message::table
                    .filter(message::sender_member_id.eq(msg.sender_member_id))
                    .filter(message::dedupe_key.eq(&msg.dedupe_key))
                    .select((message::id, message::request_fingerprint))
                    .first(conn)
                    .await?;
                if msg.request_fingerprint.is_some() && msg.request_fingerprint != fingerprint {
                    return Ok(SendOutcome::KeyReused);
                }
                let recipients: i64 = message_queue::table
                    .filter(message_queue::message_id.eq(id))
                    .count()
                    .get_result(conn)
                    .await?;
                return Ok(SendOutcome::Duplicate {
                    message_id: id,
                    recipients: recipients as u32,
                });
            };
            let rows: Vec<_> = recipients
                .iter()
                .map(|r| {
                    (
                        message_queue::message_id.eq(message_id),
                        message_queue::mesh_id.eq(msg.mesh_id),
                        message_queue::recipient_member_id.eq(r.member_id),
                        message_queue::recipient_key.eq(r.key.clone()),
                        message_queue::priority.eq(&msg.priority),
                        message_queue::created_at.eq(created_at),
                        message_queue::expires_at.eq(msg.expires_at),
                    )
                })
                .collect();
            if !rows.is_empty() {
                diesel::insert_into(message_queue::table)
                    .values(rows)
                    .execute(conn)
                    .await?;
            }
            Ok(SendOutcome::Stored {
                message_id,
                recipients: recipients.len() as u32,
            })
        }
    })
    .await
}

// ---------------------------------------------------------------------------
// Delivery: claim, ack, release

/// A delivery claimed for one connection, with what its push needs.
#[derive(Debug, Clone, QueryableByName)]
pub struct Claimed {
    #[diesel(sql_type = Int8)]
    pub id: i64,
    #[diesel(sql_type = SqlUuid)]
    pub claim_id: Uuid,
    #[diesel(sql_type = Int4)]
    pub attempts: i32,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    pub claim_expires_at: DateTime<Utc>,
    #[diesel(sql_type = SqlUuid)]
    pub message_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub mesh_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub sender_member_id: Uuid,
    #[diesel(sql_type = Text)]
    pub sender_member_pubkey: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub sender_session_pubkey: Option<String>,
    #[diesel(sql_type = Text)]
    pub sender_name: String,
    #[diesel(sql_type = Text)]
    pub target_spec: String,
    #[diesel(sql_type = Text)]
    pub priority: String,
    #[diesel(sql_type = Text)]
    pub nonce: String,
    #[diesel(sql_type = Text)]
    pub ciphertext: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub reply_to_id: Option<String>,
    #[diesel(sql_type = Nullable<Jsonb>)]
    pub mentions: Option<Value>,
    #[diesel(sql_type = Nullable<Text>)]
    pub client_message_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub request_fingerprint: Option<String>,
}

/// What one claim may take.
#[derive(Debug, Clone)]
pub struct ClaimSpec<'a> {
    pub member_id: Uuid,
    pub presence_id: Uuid,
    /// The connection's key: deliveries addressed to exactly this key.
    pub key: &'a str,
    /// Whether this connection also takes the member's unkeyed deliveries.
    pub member_wide: bool,
    pub limit: i64,
    pub lease: std::time::Duration,
    pub node_id: Uuid,
    pub max_attempts: i32,
}

/// Claims up to `limit` deliveries for one connection, oldest first, in one
/// statement: rows locked by another claimer are skipped, leases run out
/// are taken over, and the status gate is read from the connection's
/// presence row.
pub async fn claim(conn: &mut Conn, spec: &ClaimSpec<'_>) -> QueryResult<Vec<Claimed>> {
    let mut rows: Vec<Claimed> = diesel::sql_query(
        "WITH picked AS (
            SELECT q.id FROM mesh.message_queue q
            WHERE q.recipient_member_id = $1
              AND q.delivered_at IS NULL AND q.dead_at IS NULL
              AND (q.claim_expires_at IS NULL OR q.claim_expires_at <= now())
              AND q.not_before <= now()
              AND q.expires_at > now()
              AND q.attempts < $8
              AND NOT EXISTS (SELECT 1 FROM mesh.member r WHERE r.id = $1 AND r.revoked_at IS NOT NULL)
              AND ((q.recipient_key IS NULL AND $4) OR q.recipient_key = $3)
              AND (q.priority = 'now' OR EXISTS (
                    SELECT 1 FROM mesh.presence p WHERE p.id = $2 AND p.status = 'idle'))
            ORDER BY q.created_at, q.id
            LIMIT $5
            FOR UPDATE OF q SKIP LOCKED
         )
         UPDATE mesh.message_queue q
            SET claimed_at = now(), claim_id = gen_random_uuid(),
                claim_expires_at = now() + make_interval(secs => $6),
                claim_presence_id = $2, claim_node_id = $7, attempts = q.attempts + 1
           FROM picked, mesh.message m, mesh.member s
          WHERE q.id = picked.id AND m.id = q.message_id AND s.id = m.sender_member_id
         RETURNING q.id, q.claim_id, q.attempts, q.created_at, q.claim_expires_at,
                   m.id AS message_id, m.mesh_id, m.sender_member_id,
                   s.pubkey AS sender_member_pubkey, m.sender_session_pubkey, m.sender_name,
                   m.target_spec, m.priority, m.nonce, m.ciphertext, m.reply_to_id,
                   m.mentions, m.client_message_id, m.request_fingerprint",
    )
    .bind::<SqlUuid, _>(spec.member_id)
    .bind::<SqlUuid, _>(spec.presence_id)
    .bind::<Text, _>(spec.key)
    .bind::<Bool, _>(spec.member_wide)
    .bind::<Int8, _>(spec.limit)
    .bind::<Double, _>(secs(spec.lease))
    .bind::<SqlUuid, _>(spec.node_id)
    .bind::<Int4, _>(spec.max_attempts)
    .load(conn)
    .await?;
    rows.sort_by_key(|r| (r.created_at, r.id));
    Ok(rows)
}

/// A delivery a `client_ack` marked delivered.
#[derive(Debug, Clone, QueryableByName)]
pub struct Acked {
    #[diesel(sql_type = Int8)]
    pub id: i64,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
}

/// Marks delivered the asker's deliveries of one message, named by broker
/// message id (which wins) or client message id. Only deliveries addressed
/// to this member, unkeyed or keyed to this connection, are touched.
pub async fn ack(
    conn: &mut Conn,
    member_id: Uuid,
    key: &str,
    broker_message_id: Option<Uuid>,
    client_message_id: Option<&str>,
) -> QueryResult<Vec<Acked>> {
    diesel::sql_query(
        "UPDATE mesh.message_queue q SET delivered_at = now()
           FROM mesh.message m
          WHERE m.id = q.message_id
            AND q.recipient_member_id = $1
            AND (q.recipient_key IS NULL OR q.recipient_key = $2)
            AND q.delivered_at IS NULL
            AND CASE WHEN $3::uuid IS NOT NULL THEN m.id = $3
                     ELSE (m.client_message_id = $4 OR m.id::text = $4) END
         RETURNING q.id, q.created_at",
    )
    .bind::<SqlUuid, _>(member_id)
    .bind::<Text, _>(key)
    .bind::<Nullable<SqlUuid>, _>(broker_message_id)
    .bind::<Nullable<Text>, _>(client_message_id)
    .load(conn)
    .await
}

/// A delivery given back (nack) or whose lease was extended (in_progress).
#[derive(Debug, Clone, QueryableByName)]
pub struct Touched {
    #[diesel(sql_type = Int8)]
    pub id: i64,
}

/// Gives back the asker's claim on a message: eligible again after `delay`.
pub async fn nack(
    conn: &mut Conn,
    presence_id: Uuid,
    message_id: Uuid,
    delay: std::time::Duration,
) -> QueryResult<Vec<Touched>> {
    diesel::sql_query(
        "UPDATE mesh.message_queue SET claimed_at = NULL, claim_id = NULL, claim_expires_at = NULL,
                claim_presence_id = NULL, claim_node_id = NULL,
                not_before = now() + make_interval(secs => $3)
          WHERE claim_presence_id = $1 AND message_id = $2 AND delivered_at IS NULL
         RETURNING id",
    )
    .bind::<SqlUuid, _>(presence_id)
    .bind::<SqlUuid, _>(message_id)
    .bind::<Double, _>(secs(delay))
    .load(conn)
    .await
}

/// Extends the asker's live claim on a message by another lease.
pub async fn extend_lease(
    conn: &mut Conn,
    presence_id: Uuid,
    message_id: Uuid,
    lease: std::time::Duration,
) -> QueryResult<Vec<Touched>> {
    diesel::sql_query(
        "UPDATE mesh.message_queue SET claim_expires_at = now() + make_interval(secs => $3)
          WHERE claim_presence_id = $1 AND message_id = $2 AND delivered_at IS NULL
            AND claim_expires_at > now()
         RETURNING id",
    )
    .bind::<SqlUuid, _>(presence_id)
    .bind::<SqlUuid, _>(message_id)
    .bind::<Double, _>(secs(lease))
    .load(conn)
    .await
}

/// Releases every unacked claim one connection holds (it closed).
pub async fn release_presence_claims(conn: &mut Conn, presence_id: Uuid) -> QueryResult<usize> {
    diesel::update(
        message_queue::table
            .filter(message_queue::claim_presence_id.eq(presence_id))
            .filter(message_queue::delivered_at.is_null()),
    )
    .set(release())
    .execute(conn)
    .await
}

/// Gives back claims that were never written to their connection (it
/// left while the claim ran, or was being cut off): released as on a
/// close, and the attempt the claim counted is taken back, since an
/// attempt is a push the socket accepted. Matched by claim id, so a
/// delivery claimed again meanwhile is left alone.
pub async fn release_unpushed(conn: &mut Conn, claim_ids: &[Uuid]) -> QueryResult<usize> {
    diesel::update(
        message_queue::table
            .filter(message_queue::claim_id.eq_any(claim_ids))
            .filter(message_queue::delivered_at.is_null()),
    )
    .set((
        release(),
        message_queue::attempts.eq(message_queue::attempts - 1),
    ))
    .execute(conn)
    .await
}

/// Releases every unacked claim this broker process holds (shutdown).
pub async fn release_node_claims(conn: &mut Conn, node_id: Uuid) -> QueryResult<usize> {
    diesel::update(
        message_queue::table
            .filter(message_queue::claim_node_id.eq(node_id))
            .filter(message_queue::delivered_at.is_null()),
    )
    .set(release())
    .execute(conn)
    .await
}

#[allow(clippy::type_complexity)]
fn release() -> (
    diesel::dsl::Eq<message_queue::claimed_at, Option<DateTime<Utc>>>,
    diesel::dsl::Eq<message_queue::claim_id, Option<Uuid>>,
    diesel::dsl::Eq<message_queue::claim_expires_at, Option<DateTime<Utc>>>,
    diesel::dsl::Eq<message_queue::claim_presence_id, Option<Uuid>>,
    diesel::dsl::Eq<message_queue::claim_node_id, Option<Uuid>>,
) {
    (
        message_queue::claimed_at.eq(None),
        message_queue::claim_id.eq(None),
        message_queue::claim_expires_at.eq(None),
        message_queue::claim_presence_id.eq(None),
        message_queue::claim_node_id.eq(None),
    )
}

/// Marks every presence row of this broker process disconnected (shutdown).
pub async fn close_node_presence(
    conn: &mut Conn,
    node_id: Uuid,
    grace: std::time::Duration,
) -> QueryResult<usize> {
    let grace_until = Utc::now() + chrono::Duration::from_std(grace).unwrap_or_default();
    diesel::update(
        presence::table
            .filter(presence::broker_node_id.eq(node_id))
            .filter(presence::disconnected_at.is_null()),
    )
    .set((
        presence::disconnected_at.eq(diesel::dsl::now),
        presence::grace_until.eq(grace_until),
    ))
    .execute(conn)
    .await
}

// ---------------------------------------------------------------------------
// The sweeper

/// A lease the sweeper cleared, or a delivery it dead-lettered.
#[derive(Debug, Clone, QueryableByName)]
pub struct Swept {
    #[diesel(sql_type = Int8)]
    pub id: i64,
    #[diesel(sql_type = SqlUuid)]
    pub recipient_member_id: Uuid,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    pub claim_presence_id: Option<Uuid>,
}

/// Dead-letters deliveries that used up their attempts and are not under a
/// live lease. Bounded by `batch`.
pub async fn dead_letter(
    conn: &mut Conn,
    max_attempts: i32,
    batch: i64,
) -> QueryResult<Vec<Swept>> {
    diesel::sql_query(
        "UPDATE mesh.message_queue q
            SET dead_at = now(), dead_reason = 'max_attempts', claim_presence_id = NULL,
                claimed_at = NULL, claim_id = NULL, claim_expires_at = NULL, claim_node_id = NULL
          WHERE q.id IN (
                SELECT id FROM mesh.message_queue
                 WHERE delivered_at IS NULL AND dead_at IS NULL AND attempts >= $1
                   AND (claim_expires_at IS NULL OR claim_expires_at <= now())
                 LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING q.id, q.recipient_member_id, NULL::uuid AS claim_presence_id",
    )
    .bind::<Int4, _>(max_attempts)
    .bind::<Int8, _>(batch)
    .load(conn)
    .await
}

/// Clears leases that ran out without an ack, so the deliveries are
/// eligible again. Bounded by `batch`; returns who held them.
pub async fn expire_leases(conn: &mut Conn, batch: i64) -> QueryResult<Vec<Swept>> {
    diesel::sql_query(
        "WITH expired AS (
            SELECT id, claim_presence_id FROM mesh.message_queue
             WHERE claim_expires_at <= now() AND delivered_at IS NULL AND dead_at IS NULL
             LIMIT $1 FOR UPDATE SKIP LOCKED)
         UPDATE mesh.message_queue q
            SET claimed_at = NULL, claim_id = NULL, claim_expires_at = NULL,
                claim_presence_id = NULL, claim_node_id = NULL
           FROM expired
          WHERE q.id = expired.id
         RETURNING q.id, q.recipient_member_id, expired.claim_presence_id",
    )
    .bind::<Int8, _>(batch)
    .load(conn)
    .await
}

/// A closed connection whose grace window ended.
#[derive(Debug, Clone, QueryableByName)]
pub struct GraceEnded {
    #[diesel(sql_type = SqlUuid)]
    pub id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub mesh_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub member_id: Uuid,
    #[diesel(sql_type = Text)]
    pub display_name: String,
    #[diesel(sql_type = Text)]
    pub pubkey: String,
    #[diesel(sql_type = Text)]
    pub role: String,
}

/// Ends grace windows that have passed; the caller announces `peer_left`.
pub async fn end_grace(conn: &mut Conn) -> QueryResult<Vec<GraceEnded>> {
    diesel::sql_query(
        "UPDATE mesh.presence p SET grace_until = NULL
           FROM mesh.member m
          WHERE m.id = p.member_id AND p.grace_until <= now()
         RETURNING p.id, p.mesh_id, p.member_id, p.display_name,
                   COALESCE(p.session_pubkey, m.pubkey) AS pubkey, p.role",
    )
    .load(conn)
    .await
}

/// Presence rows that claim to be connected but whose broker stopped
/// refreshing them (it died): closed, so they stop counting as live.
pub async fn reap_stale_presence(
    conn: &mut Conn,
    silent_for: std::time::Duration,
) -> QueryResult<usize> {
    let cutoff = Utc::now() - chrono::Duration::from_std(silent_for).unwrap_or_default();
    diesel::update(
        presence::table
            .filter(presence::disconnected_at.is_null())
            .filter(presence::last_seen_at.lt(cutoff)),
    )
    .set((
        presence::disconnected_at.eq(diesel::dsl::now),
        presence::grace_until.eq(diesel::dsl::now),
    ))
    .execute(conn)
    .await
}

/// Forgets hello signatures older than the skew window (they would be
/// refused `timestamp_skew` anyway).
pub async fn forget_hellos(conn: &mut Conn, older_than: std::time::Duration) -> QueryResult<usize> {
    let cutoff = Utc::now() - chrono::Duration::from_std(older_than).unwrap_or_default();
    diesel::delete(hello_seen::table.filter(hello_seen::seen_at.lt(cutoff)))
        .execute(conn)
        .await
}

/// Frees idempotency keys whose window has closed, in a bounded batch.
pub async fn close_dedupe_windows(
    conn: &mut Conn,
    window: std::time::Duration,
    batch: i64,
) -> QueryResult<usize> {
    diesel::sql_query(
        "UPDATE mesh.message SET dedupe_key = NULL
          WHERE id IN (SELECT id FROM mesh.message
                        WHERE dedupe_key IS NOT NULL AND created_at < now() - make_interval(secs => $1)
                        LIMIT $2)",
    )
    .bind::<Double, _>(secs(window))
    .bind::<Int8, _>(batch)
    .execute(conn)
    .await
}

/// Which of `members` (this broker's members with live connections) have
/// been revoked since they said hello. A primary-key lookup per id, so the
/// sweeper can ask every pass; bounded by `batch`.
pub async fn revoked_among(
    conn: &mut Conn,
    members: &[Uuid],
    batch: i64,
) -> QueryResult<Vec<Uuid>> {
    if members.is_empty() {
        return Ok(Vec::new());
    }
    member::table
        .filter(member::id.eq_any(members))
        .filter(member::revoked_at.is_not_null())
        .select(member::id)
        .limit(batch)
        .load(conn)
        .await
}

/// Queue depth by state, for `/metrics`.
pub async fn queue_depth(conn: &mut Conn) -> QueryResult<QueueDepth> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Int8)]
        pending: i64,
        #[diesel(sql_type = Int8)]
        claimed: i64,
        #[diesel(sql_type = Int8)]
        dead: i64,
    }
    let row: Row = diesel::sql_query(
        "SELECT count(*) FILTER (WHERE dead_at IS NULL AND (claim_expires_at IS NULL OR claim_expires_at <= now())) AS pending,
                count(*) FILTER (WHERE dead_at IS NULL AND claim_expires_at > now()) AS claimed,
                count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead
           FROM mesh.message_queue WHERE delivered_at IS NULL",
    )
    .get_result(conn)
    .await?;
    Ok(QueueDepth {
        pending: row.pending,
        claimed: row.claimed,
        dead: row.dead,
    })
}
