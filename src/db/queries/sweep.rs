//! The sweeper's queries: dead letters, expired leases, grace windows,
//! stale presence, old hellos, idempotency windows, revocations, and the
//! queue depth `/metrics` reads.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Double, Int4, Int8, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use super::common::{secs, Conn};
use crate::db::rules::CLAIM_RESET;
use crate::db::schema::mesh::member;
use crate::ids::Role;

/// A lease the sweeper cleared, or a delivery it dead-lettered.
#[derive(Debug, Clone, QueryableByName)]
pub struct Swept {
    #[diesel(sql_type = Int8)]
    pub id: i64,
    #[diesel(sql_type = SqlUuid)]
    pub recipient_member_id: Uuid,
    /// When the cleared lease ran out (`None`: dead-lettered). A drain
    /// forgets the delivery only if what it holds is that lease or an
    /// older one: it may have claimed the delivery again since.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub lease_until: Option<DateTime<Utc>>,
}

/// Dead-letters deliveries that used up their attempts and are not under a
/// live lease. Bounded by `batch`.
pub async fn dead_letter(
    conn: &mut Conn,
    max_attempts: i32,
    batch: i64,
) -> QueryResult<Vec<Swept>> {
    diesel::sql_query(format!(
        "UPDATE mesh.message_queue q
            SET dead_at = now(), dead_reason = 'max_attempts', {CLAIM_RESET}
          WHERE q.id IN (
                SELECT id FROM mesh.message_queue
                 WHERE delivered_at IS NULL AND dead_at IS NULL AND attempts >= $1
                   AND (claim_expires_at IS NULL OR claim_expires_at <= now())
                 LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING q.id, q.recipient_member_id, NULL::timestamptz AS lease_until"
    ))
    .bind::<Int4, _>(max_attempts)
    .bind::<Int8, _>(batch)
    .load(conn)
    .await
}

/// Clears leases that ran out without an ack, so the deliveries are
/// eligible again. Bounded by `batch`; returns whose they were.
pub async fn expire_leases(conn: &mut Conn, batch: i64) -> QueryResult<Vec<Swept>> {
    diesel::sql_query(format!(
        "WITH expired AS (
            SELECT id, claim_expires_at FROM mesh.message_queue
             WHERE claim_expires_at <= now() AND delivered_at IS NULL AND dead_at IS NULL
             LIMIT $1 FOR UPDATE SKIP LOCKED)
         UPDATE mesh.message_queue q
            SET {CLAIM_RESET}
           FROM expired
          WHERE q.id = expired.id
         RETURNING q.id, q.recipient_member_id, expired.claim_expires_at AS lease_until"
    ))
    .bind::<Int8, _>(batch)
    .load(conn)
    .await
}

/// A connection as a system event (`peer_left`, …) names it: a closed
/// one whose grace window ended, or one another node's notice named.
#[derive(Debug, Clone, QueryableByName)]
pub struct Subject {
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
    pub role: Role,
}

/// Ends grace windows that have passed; the caller announces `peer_left`.
pub async fn end_grace(conn: &mut Conn) -> QueryResult<Vec<Subject>> {
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
    diesel::sql_query(
        "UPDATE mesh.presence SET disconnected_at = now(), grace_until = now()
          WHERE disconnected_at IS NULL AND last_seen_at < now() - make_interval(secs => $1)",
    )
    .bind::<Double, _>(secs(silent_for))
    .execute(conn)
    .await
}

/// Forgets hello signatures older than the skew window (they would be
/// refused `timestamp_skew` anyway).
pub async fn forget_hellos(conn: &mut Conn, older_than: std::time::Duration) -> QueryResult<usize> {
    diesel::sql_query(
        "DELETE FROM mesh.hello_seen WHERE seen_at < now() - make_interval(secs => $1)",
    )
    .bind::<Double, _>(secs(older_than))
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

/// One mesh's undelivered backlog, for the alert gauges.
#[derive(Debug, Clone, QueryableByName)]
pub struct MeshBacklog {
    #[diesel(sql_type = SqlUuid)]
    pub mesh_id: Uuid,
    /// Age of its oldest delivery neither delivered nor dead, in seconds.
    #[diesel(sql_type = Nullable<Double>)]
    pub oldest_undelivered_s: Option<f64>,
    #[diesel(sql_type = Int8)]
    pub dead_letters: i64,
}

/// The `limit` meshes with the oldest undelivered deliveries (then the
/// most dead letters): a bounded label set for `/metrics`.
pub async fn mesh_backlog(conn: &mut Conn, limit: i64) -> QueryResult<Vec<MeshBacklog>> {
    diesel::sql_query(
        "SELECT mesh_id,
                extract(epoch FROM now() - min(created_at) FILTER (WHERE dead_at IS NULL))::float8
                    AS oldest_undelivered_s,
                count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead_letters
           FROM mesh.message_queue WHERE delivered_at IS NULL
          GROUP BY mesh_id
          ORDER BY oldest_undelivered_s DESC NULLS LAST, dead_letters DESC, mesh_id
          LIMIT $1",
    )
    .bind::<Int8, _>(limit)
    .load(conn)
    .await
}

/// Queue depth by state, read from the database at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueDepth {
    pub pending: i64,
    pub claimed: i64,
    pub dead: i64,
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
