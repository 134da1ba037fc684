//! Operator actions on dead letters: deliveries the sweeper gave up on after
//! `delivery.max_attempts` pushes without an ack (`dead_at` set). Used by
//! `meshbroker dead-letters list|requeue|purge`.
//!
//! Like [`crate::admin`], they work on any connection to the broker's
//! database, with or without a running broker. A requeued delivery is
//! claimable at once; the brokers where its recipient is connected are
//! notified and push it then (their poll, every `cluster.poll_interval`,
//! is the safety net), and otherwise at the recipient's next connection.
//!
//! Large selections are handled in statements of at most [`BATCH`] rows,
//! so an operator never holds locks on the whole queue at once.

use diesel_async::AsyncPgConnection;
use serde::Serialize;
use uuid::Uuid;

use crate::db::dead_letters::{self as db, Action, SelectError};
use crate::db::{lifecycle, queries};
use crate::ids::MeshId;

pub use crate::db::dead_letters::{DeadLetter, BATCH};

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
    Ok(db::list(conn, mesh_id, limit).await?)
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
    // Best effort: the brokers' poll wakes the recipients anyway.
    let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
    if let Ok(members) = queries::recipients_of(conn, &ids).await {
        let _ = queries::wake_everywhere(conn, &members).await;
    }
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

/// Runs `action` over the selection; with ids, all or nothing.
async fn run_selected(
    conn: &mut AsyncPgConnection,
    mesh_id: MeshId,
    selection: &Selection,
    action: Action,
) -> Result<Vec<(i64, Uuid)>, DeadLetterError> {
    db::run_selected(conn, mesh_id, &selection.ids, selection.older_than, action)
        .await
        .map_err(|e| match e {
            SelectError::Missing(ids) => DeadLetterError::NotFound {
                mesh_id,
                ids,
                requeue: action == Action::Requeue,
            },
            SelectError::Db(e) => DeadLetterError::Db(e),
        })
}

async fn ensure_mesh(conn: &mut AsyncPgConnection, mesh_id: MeshId) -> Result<(), DeadLetterError> {
    if crate::db::admin::mesh_exists(conn, mesh_id).await? {
        Ok(())
    } else {
        Err(DeadLetterError::MeshNotFound(mesh_id))
    }
}
