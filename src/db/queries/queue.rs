//! Delivery: claim, ack, nack, lease extension and the releases.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{
    Array, Bool, Double, Int4, Int8, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel_async::RunQueryDsl;
use serde_json::Value;
use uuid::Uuid;

use super::common::{secs, Conn};
use crate::db::rules::{claimable, CLAIM_RESET};
use crate::ids::{ClaimId, MemberId, MessageId, NodeId, PresenceId, Priority, Status};

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
    pub priority: Priority,
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
    pub member_id: MemberId,
    pub presence_id: PresenceId,
    /// The connection's key: deliveries addressed to exactly this key.
    pub key: &'a str,
    /// Whether this connection also takes the member's unkeyed deliveries.
    pub member_wide: bool,
    pub limit: i64,
    pub lease: std::time::Duration,
    pub node_id: NodeId,
    pub max_attempts: i32,
}

/// Claims up to `limit` deliveries for one connection, oldest first, in one
/// statement: rows locked by another claimer are skipped, leases run out
/// are taken over, and the status gate is read from the connection's
/// presence row.
pub async fn claim(conn: &mut Conn, spec: &ClaimSpec<'_>) -> QueryResult<Vec<Claimed>> {
    // Built once: the claim is the hottest statement.
    static CLAIM: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH picked AS (
                SELECT q.id FROM mesh.message_queue q
                WHERE q.recipient_member_id = $1
                  AND {claimable}
                  AND NOT EXISTS (SELECT 1 FROM mesh.member r WHERE r.id = $1 AND r.revoked_at IS NOT NULL)
                  AND ((q.recipient_key IS NULL AND $4) OR q.recipient_key = $3)
                  AND (q.priority = '{now}' OR EXISTS (
                        SELECT 1 FROM mesh.presence p WHERE p.id = $2 AND p.status = '{idle}'))
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
            claimable = claimable("q", "$8"),
            now = Priority::Now.as_str(),
            idle = Status::Idle.as_str(),
        )
    });
    let mut rows: Vec<Claimed> = diesel::sql_query(CLAIM.as_str())
        .bind::<SqlUuid, _>(spec.member_id.0)
        .bind::<SqlUuid, _>(spec.presence_id.0)
        .bind::<Text, _>(spec.key)
        .bind::<Bool, _>(spec.member_wide)
        .bind::<Int8, _>(spec.limit)
        .bind::<Double, _>(secs(spec.lease))
        .bind::<SqlUuid, _>(spec.node_id.0)
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
    member_id: MemberId,
    key: &str,
    broker_message_id: Option<MessageId>,
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
    .bind::<SqlUuid, _>(member_id.0)
    .bind::<Text, _>(key)
    .bind::<Nullable<SqlUuid>, _>(broker_message_id.map(|m| m.0))
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
    presence_id: PresenceId,
    message_id: MessageId,
    delay: std::time::Duration,
) -> QueryResult<Vec<Touched>> {
    static NACK: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE mesh.message_queue SET {CLAIM_RESET},
                    not_before = now() + make_interval(secs => $3)
              WHERE claim_presence_id = $1 AND message_id = $2 AND delivered_at IS NULL
             RETURNING id"
        )
    });
    diesel::sql_query(NACK.as_str())
        .bind::<SqlUuid, _>(presence_id.0)
        .bind::<SqlUuid, _>(message_id.0)
        .bind::<Double, _>(secs(delay))
        .load(conn)
        .await
}

/// Extends the asker's live claim on a message by another lease.
pub async fn extend_lease(
    conn: &mut Conn,
    presence_id: PresenceId,
    message_id: MessageId,
    lease: std::time::Duration,
) -> QueryResult<Vec<Touched>> {
    diesel::sql_query(
        "UPDATE mesh.message_queue SET claim_expires_at = now() + make_interval(secs => $3)
          WHERE claim_presence_id = $1 AND message_id = $2 AND delivered_at IS NULL
            AND claim_expires_at > now()
         RETURNING id",
    )
    .bind::<SqlUuid, _>(presence_id.0)
    .bind::<SqlUuid, _>(message_id.0)
    .bind::<Double, _>(secs(lease))
    .load(conn)
    .await
}

/// Releases every unacked claim one connection holds (it closed).
pub async fn release_presence_claims(
    conn: &mut Conn,
    presence_id: PresenceId,
) -> QueryResult<usize> {
    static SQL: LazyLock<String> = LazyLock::new(|| release_where("claim_presence_id"));
    diesel::sql_query(SQL.as_str())
        .bind::<SqlUuid, _>(presence_id.0)
        .execute(conn)
        .await
}

/// Gives back claims that were never written to their connection (it
/// left while the claim ran, or was being cut off): released as on a
/// close, and the attempt the claim counted is taken back, since an
/// attempt is a push the socket accepted. Matched by claim id, so a
/// delivery claimed again meanwhile is left alone.
pub async fn release_unpushed(conn: &mut Conn, claim_ids: &[ClaimId]) -> QueryResult<usize> {
    let claim_ids: Vec<Uuid> = claim_ids.iter().map(|c| c.0).collect();
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE mesh.message_queue SET {CLAIM_RESET}, attempts = attempts - 1
              WHERE claim_id = ANY($1) AND delivered_at IS NULL"
        )
    });
    diesel::sql_query(SQL.as_str())
        .bind::<Array<SqlUuid>, _>(&claim_ids)
        .execute(conn)
        .await
}

/// Releases every unacked claim this broker process holds (shutdown).
pub async fn release_node_claims(conn: &mut Conn, node_id: NodeId) -> QueryResult<usize> {
    static SQL: LazyLock<String> = LazyLock::new(|| release_where("claim_node_id"));
    diesel::sql_query(SQL.as_str())
        .bind::<SqlUuid, _>(node_id.0)
        .execute(conn)
        .await
}

/// Clears every unacked claim whose `holder` column is `$1`.
fn release_where(holder: &str) -> String {
    format!(
        "UPDATE mesh.message_queue SET {CLAIM_RESET}
          WHERE {holder} = $1 AND delivered_at IS NULL"
    )
}
