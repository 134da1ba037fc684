//! The janitor's queries: what is deleted once it can no longer matter, and
//! which members have deliveries a drain could claim right now.
//!
//! Every delete takes at most `batch` rows, chosen by an index in a
//! subquery (`… LIMIT $n FOR UPDATE SKIP LOCKED`), so no statement grows
//! with the table and two brokers' janitors never wait on each other. The
//! caller decides how many statements one pass runs.
//!
//! What stays, and why:
//! - a delivery not yet delivered and not expired (pending or dead-lettered):
//!   it may still be pushed, or requeued by an operator;
//! - a delivered delivery younger than `delivery.retention`;
//! - a message while any delivery refers to it, while its idempotency key is
//!   held (`dedupe_key IS NOT NULL`: a resend must still be answered as a
//!   duplicate), and until it is older than `delivery.retention`;
//! - a presence row until its connection closed more than `message_ttl` ago
//!   and nothing pending is keyed to it, so a session key stays addressable
//!   as long as a message to it can still be delivered.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, Double, Int4, Int8, Nullable, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::rules;

type Conn = AsyncPgConnection;

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

#[derive(QueryableByName)]
struct MessageIdRow {
    #[diesel(sql_type = SqlUuid)]
    message_id: Uuid,
}

/// Deletes up to `batch` delivered deliveries delivered more than
/// `retention` ago, oldest first; returns their message ids (with repeats).
pub async fn delete_delivered(
    conn: &mut Conn,
    retention: std::time::Duration,
    batch: i64,
) -> QueryResult<Vec<Uuid>> {
    let rows: Vec<MessageIdRow> = diesel::sql_query(
        "DELETE FROM mesh.message_queue q
          WHERE q.id IN (
                SELECT id FROM mesh.message_queue
                 WHERE delivered_at < now() - make_interval(secs => $1)
                 ORDER BY delivered_at
                 LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING q.message_id",
    )
    .bind::<Double, _>(secs(retention))
    .bind::<Int8, _>(batch)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.message_id).collect())
}

/// Deletes up to `batch` deliveries past their `expires_at`, whatever their
/// state (pending, leased, dead-lettered, delivered); returns their message
/// ids (with repeats).
pub async fn delete_expired_deliveries(conn: &mut Conn, batch: i64) -> QueryResult<Vec<Uuid>> {
    let rows: Vec<MessageIdRow> = diesel::sql_query(
        "DELETE FROM mesh.message_queue q
          WHERE q.id IN (
                SELECT id FROM mesh.message_queue
                 WHERE expires_at <= now()
                 ORDER BY expires_at
                 LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING q.message_id",
    )
    .bind::<Int8, _>(batch)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.message_id).collect())
}

/// Of the messages `ids`, deletes those no delivery refers to any more,
/// whose idempotency key is released, and (with `created_before`) that are
/// older than that. Returns how many were deleted. Callers pass at most a
/// batch of ids.
pub async fn delete_orphan_messages(
    conn: &mut Conn,
    ids: &[Uuid],
    created_before: Option<std::time::Duration>,
) -> QueryResult<usize> {
    if ids.is_empty() {
        return Ok(0);
    }
    diesel::sql_query(
        "DELETE FROM mesh.message m
          WHERE m.id = ANY($1)
            AND m.dedupe_key IS NULL
            AND ($2::float8 IS NULL OR m.created_at < now() - make_interval(secs => $2))
            AND NOT EXISTS (SELECT 1 FROM mesh.message_queue q WHERE q.message_id = m.id)",
    )
    .bind::<Array<SqlUuid>, _>(ids)
    .bind::<Nullable<Double>, _>(created_before.map(secs))
    .execute(conn)
    .await
}

/// Deletes up to `batch` messages past their `expires_at` that no delivery
/// refers to (their deliveries expired with them and go first) and whose
/// idempotency key is released.
pub async fn delete_expired_messages(conn: &mut Conn, batch: i64) -> QueryResult<usize> {
    diesel::sql_query(
        "DELETE FROM mesh.message m
          WHERE m.id IN (
                SELECT id FROM mesh.message x
                 WHERE x.expires_at <= now() AND x.dedupe_key IS NULL
                   AND NOT EXISTS (SELECT 1 FROM mesh.message_queue q WHERE q.message_id = x.id)
                 ORDER BY x.expires_at, x.id
                 LIMIT $1 FOR UPDATE SKIP LOCKED)",
    )
    .bind::<Int8, _>(batch)
    .execute(conn)
    .await
}

/// Where the walk over all messages resumes: `(expires_at, id)` of the last
/// message looked at.
pub type WalkCursor = (DateTime<Utc>, Uuid);

/// One step of the walk over all messages in `(expires_at, id)` order:
/// looks at the next `batch` messages after `after` and deletes those that
/// [`delete_orphan_messages`] would (no deliveries, key released, older
/// than `retention`). It catches what the delivery deletes cannot hand
/// over: messages sent to nobody, and messages whose idempotency key was
/// still held when their last delivery went. Returns how many it deleted
/// and where to resume (`None`: the walk reached the end; start over).
pub async fn walk_orphan_messages(
    conn: &mut Conn,
    after: Option<WalkCursor>,
    retention: std::time::Duration,
    batch: i64,
) -> QueryResult<(usize, Option<WalkCursor>)> {
    #[derive(QueryableByName)]
    struct Step {
        #[diesel(sql_type = Int8)]
        deleted: i64,
        #[diesel(sql_type = Int8)]
        seen: i64,
        #[diesel(sql_type = Nullable<Timestamptz>)]
        last_expires_at: Option<DateTime<Utc>>,
        #[diesel(sql_type = Nullable<SqlUuid>)]
        last_id: Option<Uuid>,
    }
    // Every message expires after it was created, so after the epoch.
    let (from_expires, from_id) = after.unwrap_or((DateTime::UNIX_EPOCH, Uuid::nil()));
    let step: Step = diesel::sql_query(
        "WITH chunk AS (
            SELECT id, expires_at FROM mesh.message
             WHERE (expires_at, id) > ($1, $2)
             ORDER BY expires_at, id
             LIMIT $4),
         gone AS (
            DELETE FROM mesh.message m USING chunk
             WHERE m.id = chunk.id
               AND m.dedupe_key IS NULL
               AND m.created_at < now() - make_interval(secs => $3)
               AND NOT EXISTS (SELECT 1 FROM mesh.message_queue q WHERE q.message_id = m.id)
            RETURNING m.id),
         last AS (SELECT expires_at, id FROM chunk ORDER BY expires_at DESC, id DESC LIMIT 1)
         SELECT (SELECT count(*) FROM gone) AS deleted,
                (SELECT count(*) FROM chunk) AS seen,
                (SELECT expires_at FROM last) AS last_expires_at,
                (SELECT id FROM last) AS last_id",
    )
    .bind::<Timestamptz, _>(from_expires)
    .bind::<SqlUuid, _>(from_id)
    .bind::<Double, _>(secs(retention))
    .bind::<Int8, _>(batch)
    .get_result(conn)
    .await?;
    let next = match (step.last_expires_at, step.last_id) {
        (Some(at), Some(id)) if step.seen == batch => Some((at, id)),
        _ => None,
    };
    Ok((step.deleted as usize, next))
}

/// Deletes up to `batch` presence rows of connections closed more than
/// `closed_for` ago (out of any grace window) to whose key nothing
/// undelivered is still queued.
pub async fn delete_closed_presence(
    conn: &mut Conn,
    closed_for: std::time::Duration,
    batch: i64,
) -> QueryResult<usize> {
    diesel::sql_query(format!(
        "DELETE FROM mesh.presence p
          WHERE p.id IN (
                SELECT x.id FROM mesh.presence x
                 WHERE x.disconnected_at < now() - make_interval(secs => $1)
                   AND (x.grace_until IS NULL OR x.grace_until <= now())
                   AND NOT EXISTS (
                         SELECT 1 FROM mesh.message_queue q
                          WHERE q.recipient_member_id = x.member_id
                            AND q.delivered_at IS NULL AND q.dead_at IS NULL
                            AND q.recipient_key = {key})
                 ORDER BY x.disconnected_at
                 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        key = rules::connection_key("x"),
    ))
    .bind::<Double, _>(secs(closed_for))
    .bind::<Int8, _>(batch)
    .execute(conn)
    .await
}

/// Members with a live connection on broker `node_id` and a delivery that
/// connection could claim now (unkeyed or keyed to it, unleased or lease
/// run out, not dead, not delayed, not expired, attempts left), and whether
/// one of those has waited longer than `late_after` (a wake-up that never
/// came). Waking their drains is the safety net behind the notices: for
/// one that was lost, and for changes made outside any broker such as
/// `meshbroker dead-letters requeue`.
pub async fn members_to_wake(
    conn: &mut Conn,
    node_id: Uuid,
    max_attempts: i32,
    late_after: std::time::Duration,
) -> QueryResult<Vec<(Uuid, bool)>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = SqlUuid)]
        member_id: Uuid,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        late: bool,
    }
    let claimable_here = |extra: &str| {
        format!(
            "EXISTS (SELECT 1 FROM mesh.message_queue q
                      WHERE q.recipient_member_id = p.member_id
                        AND {claimable}
                        AND (q.recipient_key IS NULL OR q.recipient_key = {key}){extra})",
            claimable = rules::claimable("q", "$2"),
            key = rules::connection_key("p"),
        )
    };
    let rows: Vec<Row> = diesel::sql_query(format!(
        "SELECT p.member_id, bool_or({late}) AS late FROM mesh.presence p
          WHERE p.disconnected_at IS NULL AND p.broker_node_id = $1 AND {any}
          GROUP BY p.member_id",
        late = claimable_here(" AND q.created_at < now() - make_interval(secs => $3)"),
        any = claimable_here(""),
    ))
    .bind::<SqlUuid, _>(node_id)
    .bind::<Int4, _>(max_attempts)
    .bind::<Double, _>(secs(late_after))
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.member_id, r.late)).collect())
}
