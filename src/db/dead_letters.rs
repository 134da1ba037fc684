//! The dead-letter statements behind `meshbroker dead-letters
//! list|requeue|purge` ([`crate::dead_letters`] checks the mesh and turns
//! what they return into the operator's errors).
//!
//! Large selections are handled in statements of at most [`BATCH`] rows,
//! so an operator never holds locks on the whole queue at once.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, Double, Int8, Nullable, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::Serialize;
use uuid::Uuid;

use super::rules::CLAIM_RESET;
use crate::ids::MeshId;

/// Rows one statement touches at most.
pub const BATCH: i64 = 1000;

/// Why a selection by ids did nothing.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// These ids are not live dead letters of the mesh; nothing changed.
    #[error("not dead letters of the mesh: {0:?}")]
    Missing(Vec<i64>),
    #[error("database query failed: {0}")]
    Db(#[from] diesel::result::Error),
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

/// A mesh's dead letters, oldest death first, at most `limit`.
pub async fn list(
    conn: &mut AsyncPgConnection,
    mesh_id: MeshId,
    limit: i64,
) -> QueryResult<Vec<DeadLetter>> {
    diesel::sql_query(
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
    .await
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Int8)]
    id: i64,
    #[diesel(sql_type = SqlUuid)]
    message_id: Uuid,
}

/// What to do with the selected dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
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
                format!(
                    "UPDATE mesh.message_queue q
                        SET dead_at = NULL, dead_reason = NULL, attempts = 0,
                            not_before = '-infinity', {CLAIM_RESET}"
                ),
                "AND expires_at > now()",
            ),
            Action::Purge => ("DELETE FROM mesh.message_queue q".to_owned(), ""),
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

/// Runs `action` over the mesh's dead letters with these `ids` (none: all)
/// dead-lettered longer ago than `older_than`: ids in one transaction that
/// fails unless every id matched; otherwise batch after batch until one
/// comes back short. Returns `(delivery id, message id)` of each.
pub async fn run_selected(
    conn: &mut AsyncPgConnection,
    mesh_id: MeshId,
    ids: &[i64],
    older_than: Option<std::time::Duration>,
    action: Action,
) -> Result<Vec<(i64, Uuid)>, SelectError> {
    let older_than = older_than.map(|d| d.as_secs_f64());
    let sql = action.sql();
    let statement = |ids: Option<Vec<i64>>, limit: i64| {
        diesel::sql_query(sql.clone())
            .bind::<SqlUuid, _>(mesh_id.0)
            .bind::<Nullable<Array<Int8>>, _>(ids)
            .bind::<Nullable<Double>, _>(older_than)
            .bind::<Int8, _>(limit)
    };
    if !ids.is_empty() {
        let mut wanted = ids.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let query = statement(Some(wanted.clone()), wanted.len() as i64);
        return conn
            .transaction::<_, SelectError, _>(async move |conn| {
                let rows: Vec<Row> = query.load(conn).await?;
                let found: Vec<i64> = rows.iter().map(|r| r.id).collect();
                let missing: Vec<i64> = wanted
                    .into_iter()
                    .filter(|id| !found.contains(id))
                    .collect();
                if !missing.is_empty() {
                    return Err(SelectError::Missing(missing));
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
