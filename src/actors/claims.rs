//! The claimer and the acker: batchers that let every drain's claim pass
//! and every `client_ack` of the moment share one statement.
//!
//! A drain still decides what each of its connections may claim (its
//! plan) and waits for the rows; the claimer only runs the plans of all
//! drains that asked during the last round as one `UPDATE`. Likewise each
//! ack is the drain's, answered with what it marked delivered.
//!
//! Each round is one statement in a transaction of its own (one round
//! trip), committed without waiting for the WAL flush (see
//! `queries::claim_many`): a claim or ack lost to a PostgreSQL crash only
//! makes a delivery eligible again, which at-least-once delivery allows. A
//! send's store, which `queued:true` promises, always waits for the flush.

use std::sync::Arc;

use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;

use super::batch::{Batcher, Job, Out};
use super::Shared;
use crate::db::queries::{self, AckSpec, Acked, ClaimSpec, Claimed};
use crate::db::QueryError;
use crate::ids::MemberId;
use crate::metrics::ActorKind;
use crate::routing::ClaimPlan;

/// One drain's claim pass: its member and what each connection may take.
pub struct ClaimPass {
    pub member_id: MemberId,
    pub plans: Vec<ClaimPlan>,
}

#[derive(Clone)]
pub struct ClaimJob;

pub type Claimer = Batcher<ClaimJob>;

impl Job for ClaimJob {
    type In = ClaimPass;
    /// Per plan, in order, the rows claimed.
    type Done = Vec<Vec<Claimed>>;
    const KIND: ActorKind = ActorKind::Claimer;
    /// Plans, each up to `delivery.claim_batch` rows.
    const MAX_BATCH: usize = 256;

    fn weight(pass: &ClaimPass) -> usize {
        pass.plans.len().max(1)
    }

    fn run(
        &self,
        shared: Arc<Shared>,
        passes: Vec<ClaimPass>,
    ) -> LocalBoxFuture<'static, Result<Vec<Out<Self>>, QueryError>> {
        async move {
            let cfg = &shared.config().delivery;
            let specs: Vec<ClaimSpec<'_>> = passes
                .iter()
                .flat_map(|pass| {
                    pass.plans.iter().map(|plan| ClaimSpec {
                        member_id: pass.member_id,
                        presence_id: plan.presence_id,
                        key: plan.key.as_deref().unwrap_or(""),
                        member_wide: plan.member_wide,
                        limit: plan.limit,
                        lease: cfg.lease.get(),
                        node_id: shared.node_id,
                        max_attempts: cfg.max_attempts as i32,
                    })
                })
                .collect();
            let mut conn = shared.pool.get().await?;
            let rows = queries::claim_many(&mut conn, &specs).await?;
            let mut rows = rows.into_iter();
            Ok(passes
                .iter()
                .map(|pass| Ok(rows.by_ref().take(pass.plans.len()).collect()))
                .collect())
        }
        .boxed_local()
    }
}

#[derive(Clone)]
pub struct AckJob;

pub type Acker = Batcher<AckJob>;

impl Job for AckJob {
    type In = AckSpec;
    /// What the ack marked delivered.
    type Done = Vec<Acked>;
    const KIND: ActorKind = ActorKind::Acker;
    const MAX_BATCH: usize = 1024;

    fn run(
        &self,
        shared: Arc<Shared>,
        acks: Vec<AckSpec>,
    ) -> LocalBoxFuture<'static, Result<Vec<Out<Self>>, QueryError>> {
        async move {
            let mut conn = shared.pool.get().await?;
            let rows = queries::ack_many(&mut conn, &acks).await?;
            Ok(rows.into_iter().map(Ok).collect())
        }
        .boxed_local()
    }
}
