//! Delivery: claim, ack, nack, lease extension and the releases.

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{
    Array, Bool, Double, Int4, Int8, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel_async::RunQueryDsl;
use serde_json::Value;
use uuid::Uuid;

use super::cached::cached;
use super::common::{secs, Conn};
use crate::db::rules::{claimable, member_wide_rank, CLAIM_RESET};
use crate::ids::{ClaimId, MemberId, MessageId, NodeId, PresenceId, Priority, Status};

/// A delivery claimed for one connection, with what its push needs.
#[derive(Debug, Clone, QueryableByName)]
pub struct Claimed {
    /// The connection it was claimed for.
    #[diesel(sql_type = SqlUuid)]
    pub presence_id: Uuid,
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

/// Joined into a claim or ack statement, makes its own (implicit)
/// transaction commit without waiting for the WAL flush: a claim or ack
/// lost to a PostgreSQL crash only makes its delivery eligible again,
/// which at-least-once delivery allows, and the wait for the flush was what
/// bounded the claimer's and acker's rounds under load. One round trip, no
/// `BEGIN; SET LOCAL …; COMMIT` around it. (`set_config` is volatile, so
/// the planner keeps the one-row join; the setting is read at commit.)
macro_rules! relaxed_commit {
    () => {
        "(SELECT set_config('synchronous_commit', 'off', true))"
    };
}
const RELAXED_COMMIT: &str = relaxed_commit!();

/// Claims up to `limit` deliveries for one connection, oldest first.
pub async fn claim(conn: &mut Conn, spec: &ClaimSpec<'_>) -> QueryResult<Vec<Claimed>> {
    let mut all = claim_many(conn, std::slice::from_ref(spec)).await?;
    Ok(all.pop().unwrap_or_default())
}

/// Claims for many connections (of one drain, or of every drain that
/// claims at this moment) in one statement: for each spec, up to its
/// `limit` deliveries, oldest first; rows locked by another claimer are
/// skipped, leases run out are taken over, and the status gate is read
/// from each connection's presence row. One result per spec, in order.
/// `lease`, `node_id` and `max_attempts` are the broker's and are taken
/// from the first spec.
pub async fn claim_many(
    conn: &mut Conn,
    specs: &[ClaimSpec<'_>],
) -> QueryResult<Vec<Vec<Claimed>>> {
    // Built once: the claim is the hottest statement.
    static CLAIM: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH spec AS (
                -- A member-wide spec stands down while the member has a
                -- better connection on another node (the same rank as the
                -- drain's own choice, oldest first across nodes), so one
                -- connection in the cluster takes the member's unkeyed
                -- deliveries, as on one node.
                SELECT s.member_id, s.presence_id, s.key, s.lim,
                       s.member_wide AND NOT EXISTS (
                         SELECT 1 FROM mesh.presence me
                           JOIN mesh.presence o ON o.member_id = me.member_id
                                AND o.disconnected_at IS NULL
                                AND o.broker_node_id <> me.broker_node_id
                          WHERE me.id = s.presence_id
                            AND ({rank_o}, o.connected_at, o.id) < ({rank_me}, me.connected_at, me.id)
                       ) AS member_wide
                  FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bool[], $5::int8[])
                    AS s(member_id, presence_id, key, member_wide, lim),
                    {relaxed} AS relaxed
             ), picked AS (
                -- DISTINCT: two specs of one member never share a row
                -- (their keys differ), but a row taken twice would be
                -- claimed for one and pushed to both.
                SELECT DISTINCT ON (c.id) c.id, s.presence_id
                  FROM spec s CROSS JOIN LATERAL (
                    SELECT q.id FROM mesh.message_queue q
                     WHERE q.recipient_member_id = s.member_id
                       AND {claimable}
                       AND NOT EXISTS (SELECT 1 FROM mesh.member r
                                        WHERE r.id = s.member_id AND r.revoked_at IS NOT NULL)
                       AND ((q.recipient_key IS NULL AND s.member_wide) OR q.recipient_key = s.key)
                       AND (q.priority = '{now}' OR EXISTS (
                             SELECT 1 FROM mesh.presence p
                              WHERE p.id = s.presence_id AND p.status = '{idle}'))
                     ORDER BY q.created_at, q.id
                     LIMIT s.lim
                     FOR UPDATE OF q SKIP LOCKED
                  ) c
             )
             UPDATE mesh.message_queue q
                SET claimed_at = now(), claim_id = gen_random_uuid(),
                    claim_expires_at = now() + make_interval(secs => $6),
                    claim_presence_id = picked.presence_id, claim_node_id = $7,
                    attempts = q.attempts + 1
               FROM picked, mesh.message m, mesh.member s
              WHERE q.id = picked.id AND m.id = q.message_id AND s.id = m.sender_member_id
             RETURNING picked.presence_id, q.id, q.claim_id, q.attempts, q.created_at,
                       q.claim_expires_at, m.id AS message_id, m.mesh_id, m.sender_member_id,
                       s.pubkey AS sender_member_pubkey, m.sender_session_pubkey, m.sender_name,
                       m.target_spec, m.priority, m.nonce, m.ciphertext, m.reply_to_id,
                       m.mentions, m.client_message_id, m.request_fingerprint",
            claimable = claimable("q", "$8"),
            relaxed = RELAXED_COMMIT,
            rank_o = member_wide_rank("o"),
            rank_me = member_wide_rank("me"),
            now = Priority::Now.as_str(),
            idle = Status::Idle.as_str(),
        )
    });
    let Some(first) = specs.first() else {
        return Ok(Vec::new());
    };
    let members: Vec<Uuid> = specs.iter().map(|s| s.member_id.0).collect();
    let presences: Vec<Uuid> = specs.iter().map(|s| s.presence_id.0).collect();
    let keys: Vec<&str> = specs.iter().map(|s| s.key).collect();
    let wide: Vec<bool> = specs.iter().map(|s| s.member_wide).collect();
    let limits: Vec<i64> = specs.iter().map(|s| s.limit).collect();
    let rows: Vec<Claimed> = cached(CLAIM.as_str())
        .bind::<Array<SqlUuid>, _>(&members)
        .bind::<Array<SqlUuid>, _>(&presences)
        .bind::<Array<Text>, _>(&keys)
        .bind::<Array<Bool>, _>(&wide)
        .bind::<Array<Int8>, _>(&limits)
        .bind::<Double, _>(secs(first.lease))
        .bind::<SqlUuid, _>(first.node_id.0)
        .bind::<Int4, _>(first.max_attempts)
        .load(conn)
        .await?;
    let index: HashMap<Uuid, usize> = presences.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    let mut out: Vec<Vec<Claimed>> = vec![Vec::new(); specs.len()];
    for row in rows {
        out[index[&row.presence_id]].push(row);
    }
    for rows in &mut out {
        rows.sort_by_key(|r| (r.created_at, r.id));
    }
    Ok(out)
}

/// A delivery a `client_ack` marked delivered.
#[derive(Debug, Clone, QueryableByName)]
pub struct Acked {
    #[diesel(sql_type = Int8)]
    pub id: i64,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
}

/// One `client_ack`: the asker (a member, through one of its connections)
/// and the message it names, by broker message id (which wins) or client
/// message id.
#[derive(Debug, Clone)]
pub struct AckSpec {
    pub member_id: MemberId,
    /// The connection's key: only deliveries addressed to this member,
    /// unkeyed or keyed to this connection, are touched.
    pub key: String,
    pub broker_message_id: Option<MessageId>,
    pub client_message_id: Option<String>,
}

#[derive(QueryableByName)]
struct AckedRow {
    #[diesel(sql_type = Int8)]
    i: i64,
    #[diesel(sql_type = Int8)]
    id: i64,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
}

/// Hands each row to the ack it answers: `i` counts from 1 within `which`.
fn place(out: &mut [Vec<Acked>], which: &[usize], rows: Vec<AckedRow>) {
    for r in rows {
        out[which[r.i as usize - 1]].push(Acked {
            id: r.id,
            created_at: r.created_at,
        });
    }
}

/// Marks delivered what each ack names, in two statements whatever the
/// number of acks (one for acks by broker id, one for acks by client id).
/// One result per ack, in order.
pub async fn ack_many(conn: &mut Conn, acks: &[AckSpec]) -> QueryResult<Vec<Vec<Acked>>> {
    let mut out: Vec<Vec<Acked>> = vec![Vec::new(); acks.len()];
    let (by_broker, by_client): (Vec<usize>, Vec<usize>) =
        (0..acks.len()).partition(|&i| acks[i].broker_message_id.is_some());
    let members =
        |which: &[usize]| -> Vec<Uuid> { which.iter().map(|&i| acks[i].member_id.0).collect() };
    let keys =
        |which: &[usize]| -> Vec<&str> { which.iter().map(|&i| acks[i].key.as_str()).collect() };
    if !by_broker.is_empty() {
        let ids: Vec<Uuid> = by_broker
            .iter()
            .map(|&i| acks[i].broker_message_id.map(|m| m.0).unwrap_or_default())
            .collect();
        // Each ack finds its rows through the message_id index (LATERAL);
        // the target rows are then updated by primary key. (An `= ANY`
        // filter planned as a nested loop probes the index once per ack per
        // element: quadratic in the batch. A plain join planned a hash join
        // over a sequential scan of the queue.)
        let rows: Vec<AckedRow> = cached(concat!(
            "WITH hit AS (
                SELECT DISTINCT ON (c.id) c.id, a.i
                  FROM unnest($1::uuid[], $2::text[], $3::uuid[]) WITH ORDINALITY
                       AS a(member_id, key, message_id, i)
                 CROSS JOIN LATERAL (
                    SELECT q.id FROM mesh.message_queue q
                     WHERE q.message_id = a.message_id
                       AND q.recipient_member_id = a.member_id
                       AND (q.recipient_key IS NULL OR q.recipient_key = a.key)
                       AND q.delivered_at IS NULL
                 ) c
             )
             UPDATE mesh.message_queue q SET delivered_at = now()
               FROM hit, ",
            relaxed_commit!(),
            " AS relaxed
              WHERE q.id = hit.id
             RETURNING hit.i, q.id, q.created_at"
        ))
        .bind::<Array<SqlUuid>, _>(members(&by_broker))
        .bind::<Array<Text>, _>(keys(&by_broker))
        .bind::<Array<SqlUuid>, _>(&ids)
        .load(conn)
        .await?;
        place(&mut out, &by_broker, rows);
    }
    if !by_client.is_empty() {
        let ids: Vec<&str> = by_client
            .iter()
            .map(|&i| acks[i].client_message_id.as_deref().unwrap_or(""))
            .collect();
        let rows: Vec<AckedRow> = cached(concat!(
            "UPDATE mesh.message_queue q SET delivered_at = now()
               FROM mesh.message m,
                    unnest($1::uuid[], $2::text[], $3::text[]) WITH ORDINALITY
                    AS a(member_id, key, client_id, i),
                    ",
            relaxed_commit!(),
            " AS relaxed
              WHERE m.id = q.message_id
                AND q.recipient_member_id = a.member_id
                AND (q.recipient_key IS NULL OR q.recipient_key = a.key)
                AND q.delivered_at IS NULL
                AND (m.client_message_id = a.client_id OR m.id::text = a.client_id)
             RETURNING a.i, q.id, q.created_at"
        ))
        .bind::<Array<SqlUuid>, _>(members(&by_client))
        .bind::<Array<Text>, _>(keys(&by_client))
        .bind::<Array<Text>, _>(&ids)
        .load(conn)
        .await?;
        place(&mut out, &by_client, rows);
    }
    Ok(out)
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

/// Releases every unacked claim one connection of `member_id` holds (it
/// closed). Found through the member's undelivered rows (the claim's
/// index): the queue keeps no index on the claim's holder, which every
/// claim would have to update.
pub async fn release_presence_claims(
    conn: &mut Conn,
    member_id: MemberId,
    presence_id: PresenceId,
) -> QueryResult<usize> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE mesh.message_queue SET {CLAIM_RESET}
              WHERE recipient_member_id = $2 AND claim_presence_id = $1
                AND delivered_at IS NULL AND dead_at IS NULL"
        )
    });
    diesel::sql_query(SQL.as_str())
        .bind::<SqlUuid, _>(presence_id.0)
        .bind::<SqlUuid, _>(member_id.0)
        .execute(conn)
        .await
}

/// Gives back claims that were never written to their connection (it
/// left while the claim ran, or was being cut off): released as on a
/// close, and the attempt the claim counted is taken back, since an
/// attempt is a push the socket accepted. Matched by claim id, so a
/// delivery claimed again meanwhile is left alone.
/// Found, like a close's release, through the member's undelivered rows.
pub async fn release_unpushed(
    conn: &mut Conn,
    member_id: MemberId,
    claim_ids: &[ClaimId],
) -> QueryResult<usize> {
    let claim_ids: Vec<Uuid> = claim_ids.iter().map(|c| c.0).collect();
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE mesh.message_queue SET {CLAIM_RESET}, attempts = attempts - 1
              WHERE recipient_member_id = $2 AND claim_id = ANY($1)
                AND delivered_at IS NULL AND dead_at IS NULL"
        )
    });
    diesel::sql_query(SQL.as_str())
        .bind::<Array<SqlUuid>, _>(&claim_ids)
        .bind::<SqlUuid, _>(member_id.0)
        .execute(conn)
        .await
}

/// Releases every unacked claim broker process `node_id` holds (at its
/// shutdown, or when another node found it dead); returns the members they
/// were for, whose drains elsewhere may claim them now. Found among the
/// leased rows (the sweeper's index).
pub async fn release_node_claims(conn: &mut Conn, node_id: NodeId) -> QueryResult<Vec<Uuid>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = SqlUuid)]
        recipient_member_id: Uuid,
    }
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH released AS (
                UPDATE mesh.message_queue SET {CLAIM_RESET}
                 WHERE claim_expires_at IS NOT NULL AND delivered_at IS NULL
                   AND claim_node_id = $1
                RETURNING recipient_member_id)
             SELECT DISTINCT recipient_member_id FROM released"
        )
    });
    let rows: Vec<Row> = diesel::sql_query(SQL.as_str())
        .bind::<SqlUuid, _>(node_id.0)
        .load(conn)
        .await?;
    Ok(rows.into_iter().map(|r| r.recipient_member_id).collect())
}
