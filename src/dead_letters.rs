//! Operator actions on dead letters: deliveries the sweeper gave up on after
//! `delivery.max_attempts` pushes without an ack (`dead_at` set). Used by
//! `meshbroker dead-letters list|requeue|purge`.
//!
//! Like [`crate::admin`], they work on any connection to the broker's
//! database, with or without a running broker. A requeued delivery is
//! claimable at once; a running broker pushes it to a connected recipient
//! within `janitor.interval` (its janitor wakes members with claimable
//! deliveries), and otherwise at the recipient's next connection.
//!
//! Large selections are handled in statements of at most [`BATCH`] rows,
//! so an operator never holds locks on the whole queue at once.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, Double, Int8, Nullable, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;
use uuid::Uuid;

use crate::db::lifecycle;
use crate::ids::MeshId;

/// Rows one statement touches at most.
pub const BATCH: i64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("mesh {0} not found")]
    MeshNotFound(MeshId),
    #[error("no dead letter with id {} in mesh {mesh_id} (list them with `meshbroker dead-letters list`){}",
        join(.ids), if *.requeue { "; an expired one can only be purged" } else { "" })]
    NotFound {
        mesh_id: MeshId,
        ids: Vec<i64>,
        requeue: bool,
    },
    #[error("database query failed: {0}")]
    Db(#[from] diesel::result::Error),
}

fn join(ids: &[i64]) -> String {
    ids.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One dead-lettered delivery, as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize, QueryableByName)]
pub struct DeadLetter {
    /// The delivery's id (`--id`).
    #[diesel(sql_type = Int8)]
    pub id: i64,
    #[diesel(sql_type = SqlUuid)]
    pub message_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub recipient_member_id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub recipient_name: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub recipient_pubkey: String,
    /// Set when the delivery is for one connection (session key or `sid:…`).
    #[diesel(sql_type = Nullable<diesel::sql_types::Text>)]
    pub recipient_key: Option<String>,
    /// Pushes made without an ack.
    #[diesel(sql_type = diesel::sql_types::Int4)]
    pub attempts: i32,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub created_at: DateTime<Utc>,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub dead_at: DateTime<Utc>,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub dead_reason: String,
    /// After this the janitor deletes it (`message_ttl`); it cannot be requeued.
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub expires_at: DateTime<Utc>,
}

/// Which dead letters a requeue or purge is about.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    /// Only these delivery ids; every one must be a dead letter of the mesh.
    pub ids: Vec<i64>,
    /// Only those dead-lettered longer ago than this.
    pub older_than: Option<std::time::Duration>,
}

/// What `requeue` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Requeued {
    pub requeued: usize,
    pub ids: Vec<i64>,
}

/// What `purge` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Purged {
    pub purged: usize,
    /// Messages deleted with them (no delivery left, idempotency key released).
    pub messages_deleted: usize,
    pub ids: Vec<i64>,
}

/// A mesh's dead letters, oldest death first, at most `limit`.
pub async fn list(
    conn: &mut AsyncPgConnection,
    mesh_id: MeshId,
    limit: i64,
) -> Result<Vec<DeadLetter>, DeadLetterError> {
    ensure_mesh(conn, mesh_id).await?;
    Ok(diesel::sql_query(
        "SELECT q.id, q.message_id, q.recipient_member_id, m.name AS recipient_name,
                m.pubkey AS recipient_pubkey, q.recipient_key, q.attempts, q.created_at,
                q.dead_at, COALESCE(q.dead_reason, '') AS dead_reason, q.expires_at
           FROM mesh.message_queue q JOIN mesh.member m ON m.id = q.recipient_member_id
          WHERE q.mesh_id = $1 AND q.dead_at IS NOT NULL AND q.delivered_at IS NULL
          ORDER BY q.dead_at, q.id
          LIMIT $2",
    )
    .bind::<SqlUuid, _>(mesh_id.0)
    .bind::<Int8, _>(limit)
    .load(conn)
    .await?)
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Int8)]
    id: i64,
    #[diesel(sql_type = SqlUuid)]
    message_id: Uuid,
}

/// Makes the selected dead letters eligible again: `dead_at`, the reason,
/// the attempt count and any lease cleared, no delay. Expired ones are
/// left alone (the janitor deletes them). With ids, all or nothing: an id
/// that is not a live dead letter of the mesh is an error and nothing changes.
pub async fn requeue(
    conn: &mut AsyncPgConnection,
    mesh_id: MeshId,
    selection: &Selection,
) -> Result<Requeued, DeadLetterError> {
    ensure_mesh(conn, mesh_id).await?;
    let mut rows = run_selected(conn, mesh_id, selection, Action::Requeue).await?;
    rows.sort_unstable();
    Ok(Requeued {
        requeued: rows.len(),
        ids: rows.into_iter().map(|(id, _)| id).collect(),
    })
}

/// Deletes the selected dead letters, then their messages when no delivery
/// refers to them any more and their idempotency key is released (else
/// the janitor deletes them later). With ids, all or nothing.
pub async fn purge(
    conn: &mut AsyncPgConnection,
    mesh_id: MeshId,
    selection: &Selection,
) -> Result<Purged, DeadLetterError> {
    ensure_mesh(conn, mesh_id).await?;
    let mut rows = run_selected(conn, mesh_id, selection, Action::Purge).await?;
    rows.sort_unstable();
    let mut messages: Vec<Uuid> = rows.iter().map(|(_, m)| *m).collect();
    messages.sort_unstable();
    messages.dedup();
    let mut messages_deleted = 0;
    for chunk in messages.chunks(BATCH as usize) {
        messages_deleted += lifecycle::delete_orphan_messages(conn, chunk, None).await?;
    }
    Ok(Purged {
        purged: rows.len(),
        messages_deleted,
        ids: rows.into_iter().map(|(id, _)| id).collect(),
    })
}

/// What to do with the selected dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Eligible again: `dead_at`, the reason, the attempt count and any
    /// lease cleared, no delay. Expired ones are left to the janitor.
    Requeue,
    Purge,
}

impl Action {
    /// The statement over one batch of the selection (binds: mesh, ids or
    /// NULL, older-than seconds or NULL, limit).
    fn sql(self) -> String {
        let (statement, unexpired) = match self {
            Action::Requeue => (
                "UPDATE mesh.message_queue q
                    SET dead_at = NULL, dead_reason = NULL, attempts = 0, not_before = '-infinity',
                        claimed_at = NULL, claim_id = NULL, claim_expires_at = NULL,
                        claim_presence_id = NULL, claim_node_id = NULL",
                "AND expires_at > now()",
            ),
            Action::Purge => ("DELETE FROM mesh.message_queue q", ""),
        };
        format!(
            "{statement}
              WHERE q.id IN (
                    SELECT id FROM mesh.message_queue
                     WHERE mesh_id = $1 AND dead_at IS NOT NULL AND delivered_at IS NULL
                       {unexpired}
                       AND ($2::int8[] IS NULL OR id = ANY($2))
                       AND ($3::float8 IS NULL OR dead_at < now() - make_interval(secs => $3))
                     ORDER BY id
                     LIMIT $4 FOR UPDATE)
             RETURNING q.id, q.message_id"
        )
    }
}

/// Runs `action` over the selection: ids in one transaction that fails
/// unless every id matched; otherwise batch after batch until one comes
/// back short.
async fn run_selected(
    conn: &mut AsyncPgConnection,
    mesh_id: MeshId,
    selection: &Selection,
    action: Action,
) -> Result<Vec<(i64, Uuid)>, DeadLetterError> {
    let older_than = selection.older_than.map(|d| d.as_secs_f64());
    let sql = action.sql();
    let statement = |ids: Option<Vec<i64>>, limit: i64| {
        diesel::sql_query(sql.clone())
            .bind::<SqlUuid, _>(mesh_id.0)
            .bind::<Nullable<Array<Int8>>, _>(ids)
            .bind::<Nullable<Double>, _>(older_than)
            .bind::<Int8, _>(limit)
    };
    if !selection.ids.is_empty() {
        let mut wanted = selection.ids.clone();
        wanted.sort_unstable();
        wanted.dedup();
        let query = statement(Some(wanted.clone()), wanted.len() as i64);
        return conn
            .transaction::<_, DeadLetterError, _>(async move |conn| {
                let rows: Vec<Row> = query.load(conn).await?;
                let found: Vec<i64> = rows.iter().map(|r| r.id).collect();
                let missing: Vec<i64> = wanted
                    .into_iter()
                    .filter(|id| !found.contains(id))
                    .collect();
                if !missing.is_empty() {
                    return Err(DeadLetterError::NotFound {
                        mesh_id,
                        ids: missing,
                        requeue: action == Action::Requeue,
                    });
                }
                Ok(rows.into_iter().map(|r| (r.id, r.message_id)).collect())
            })
            .await;
    }
    let mut all = Vec::new();
    loop {
        let rows: Vec<Row> = statement(None, BATCH).load(conn).await?;
        let n = rows.len();
        all.extend(rows.into_iter().map(|r| (r.id, r.message_id)));
        if (n as i64) < BATCH {
            return Ok(all);
        }
    }
}

async fn ensure_mesh(conn: &mut AsyncPgConnection, mesh_id: MeshId) -> Result<(), DeadLetterError> {
    if crate::admin::mesh_exists(conn, mesh_id).await? {
        Ok(())
    } else {
        Err(DeadLetterError::MeshNotFound(mesh_id))
    }
}
