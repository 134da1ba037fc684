//! The writer: stores the sends of every session, one transaction per
//! batch (group commit), and answers each after the commit.
//!
//! With `synchronous_commit` on, each commit waits for its WAL flush; one
//! commit per message caps the broker at the disk's flush rate and spends
//! PostgreSQL's time on per-statement overhead. The writer is a
//! [`Batcher`]: while one batch's transaction runs, new sends queue, and
//! the next batch starts the moment the commit returns. A batch is a fixed
//! handful of array statements ([`queries::store_batch`]) however many
//! sends it holds. If it fails as a whole, its sends are stored one by one,
//! so one bad send never fails the others; each answer is exact (stored,
//! duplicate, key reused, sender revoked, unknown target, unavailable).
//! After each commit one [`WakeMembers`] names every recipient of the batch.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;

use super::batch::{BatchFailed, Batcher, Job, Out};
use super::wake::WakeMembers;
use super::Shared;
use crate::db::queries::{self, BatchSend, NewMessage, Recipient, SendOutcome};
use crate::db::{PgConn, QueryError};
use crate::ids::{MemberId, MeshId};
use crate::metrics::ActorKind;
use crate::protocol::Group;
use crate::routing::{self, Listed, Target};

/// One send to store.
pub struct Store {
    pub msg: NewMessage,
    pub target: Target,
    pub sender: MemberId,
}

/// What storing one send came to, once its batch committed.
#[derive(Debug, Clone)]
pub enum Stored {
    Outcome(SendOutcome),
    /// A pubkey target never known in this mesh: nothing stored.
    UnknownTarget,
}

#[derive(Clone)]
pub struct WriteJob {
    /// Told after each commit which members have new deliveries.
    wake: actix::Recipient<WakeMembers>,
    /// Member pubkey → member id, per mesh. A member's id never changes
    /// and members are never deleted (only revoked, which the store checks),
    /// so what was found once is true for good; a session key is not
    /// cached (its connection may go).
    members: Arc<std::sync::Mutex<HashMap<(MeshId, String), MemberId>>>,
}

/// Most pubkeys the writer remembers; past it, it starts over.
const MEMBER_CACHE: usize = 100_000;

impl WriteJob {
    pub fn new(wake: actix::Recipient<WakeMembers>) -> Self {
        WriteJob {
            wake,
            members: Default::default(),
        }
    }
}

pub type Writer = Batcher<WriteJob>;

impl Job for WriteJob {
    type In = Store;
    type Done = Stored;
    const KIND: ActorKind = ActorKind::Writer;
    /// Bounds a transaction's length and the wait of its first send.
    const MAX_BATCH: usize = 512;

    fn run(
        &self,
        shared: Arc<Shared>,
        stores: Vec<Store>,
    ) -> LocalBoxFuture<'static, Result<Vec<Out<Self>>, QueryError>> {
        let wake = self.wake.clone();
        let members = self.members.clone();
        async move {
            let window = shared.config().delivery.dedupe_window.get();
            let mut conn = shared.pool.get().await?;
            let targets = resolve(&mut conn, &members, &stores).await?;
            let mut sends = Vec::with_capacity(stores.len());
            let mut out: Vec<Option<Out<Self>>> = Vec::with_capacity(stores.len());
            for (store, recipients) in stores.into_iter().zip(targets) {
                match recipients {
                    Some(recipients) => {
                        sends.push(BatchSend {
                            msg: store.msg,
                            recipients,
                        });
                        out.push(None);
                    }
                    None => out.push(Some(Ok(Stored::UnknownTarget))),
                }
            }
            let outcomes: Vec<Out<Self>> = match queries::store_batch(&mut conn, &sends, window).await {
                Ok(outcomes) => outcomes.into_iter().map(|o| Ok(Stored::Outcome(o))).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, sends = sends.len(), "batch not stored; storing its sends one by one");
                    one_by_one(&mut conn, &sends, window).await
                }
            };
            let mut woken: Vec<MemberId> = Vec::new();
            for (send, outcome) in sends.iter().zip(&outcomes) {
                if let Ok(Stored::Outcome(SendOutcome::Stored { .. })) = outcome {
                    woken.extend(send.recipients.iter().map(|r| MemberId(r.member_id)));
                }
            }
            if !woken.is_empty() {
                woken.sort_unstable_by_key(|m| m.0);
                woken.dedup();
                wake.do_send(WakeMembers(woken));
            }
            let mut outcomes = outcomes.into_iter();
            Ok(out
                .into_iter()
                .map(|o| o.unwrap_or_else(|| outcomes.next().expect("one outcome per send")))
                .collect())
        }
        .boxed_local()
    }
}

/// Stores each send in a transaction of its own (after a batch failed).
async fn one_by_one(
    conn: &mut PgConn,
    sends: &[BatchSend],
    window: std::time::Duration,
) -> Vec<Out<WriteJob>> {
    let mut out = Vec::with_capacity(sends.len());
    for send in sends {
        let one = queries::store_message(conn, send.msg.clone(), send.recipients.clone(), window)
            .await
            .map(Stored::Outcome)
            .map_err(|e| BatchFailed::Query(Arc::new(e.into())));
        out.push(one);
    }
    out
}

/// Who receives each send; `None` for a pubkey target never known in its
/// mesh. Pubkey targets are resolved together; a broadcast reads its
/// mesh's listed presence once per batch.
async fn resolve(
    conn: &mut PgConn,
    cache: &std::sync::Mutex<HashMap<(MeshId, String), MemberId>>,
    stores: &[Store],
) -> diesel::QueryResult<Vec<Option<Vec<Recipient>>>> {
    let mut out: Vec<Option<Vec<Recipient>>> = vec![None; stores.len()];
    let mut unknown: Vec<(usize, MeshId, &str)> = Vec::new();
    {
        let cache = cache.lock().expect("member cache");
        for (i, s) in stores.iter().enumerate() {
            let Target::Pubkey(pk) = &s.target else {
                continue;
            };
            let mesh = MeshId(s.msg.mesh_id);
            match cache.get(&(mesh, pk.clone())) {
                Some(member) => {
                    out[i] = Some(vec![Recipient {
                        member_id: member.0,
                        key: None,
                    }])
                }
                None => unknown.push((i, mesh, pk.as_str())),
            }
        }
    }
    if !unknown.is_empty() {
        let asked: Vec<(MeshId, &str)> = unknown.iter().map(|(_, m, pk)| (*m, *pk)).collect();
        let found = queries::resolve_pubkeys(conn, &asked).await?;
        let mut cache = cache.lock().expect("member cache");
        if cache.len() > MEMBER_CACHE {
            cache.clear();
        }
        for ((i, mesh, pk), recipient) in unknown.iter().zip(found) {
            if let Some(r) = &recipient {
                if r.key.is_none() {
                    cache.insert((*mesh, pk.to_string()), MemberId(r.member_id));
                }
            }
            out[*i] = recipient.map(|r| vec![r]);
        }
    }
    let mut listed: HashMap<MeshId, Vec<queries::PeerRow>> = HashMap::new();
    for (i, s) in stores.iter().enumerate() {
        if matches!(s.target, Target::Pubkey(_)) {
            continue;
        }
        let mesh_id = MeshId(s.msg.mesh_id);
        let rows = match listed.entry(mesh_id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(queries::listed_presence(conn, mesh_id.0).await?)
            }
        };
        out[i] = Some(broadcast(rows, s.sender, &s.target));
    }
    Ok(out)
}

/// The recipients of a broadcast to `target` among a mesh's listed rows.
fn broadcast(rows: &[queries::PeerRow], sender: MemberId, target: &Target) -> Vec<Recipient> {
    let groups: Vec<Vec<Group>> = rows
        .iter()
        .map(|r| serde_json::from_value(r.groups.clone()).unwrap_or_default())
        .collect();
    let listed: Vec<Listed<'_>> = rows
        .iter()
        .zip(&groups)
        .map(|(r, groups)| Listed {
            member_id: MemberId(r.member_id),
            role: r.role,
            session_pubkey: r.session_pubkey.as_deref(),
            session_id: &r.session_id,
            groups,
        })
        .collect();
    routing::broadcast_recipients(&listed, sender, target)
        .into_iter()
        .map(|r| Recipient {
            member_id: r.member_id.0,
            key: r.key,
        })
        .collect()
}
