//! The claimer and the acker: batchers that let every drain's claim pass
//! and every `client_ack` of the moment share one statement.
//!
//! A drain still decides what each of its connections may claim (its
//! plan) and waits for the rows; the claimer only runs the plans of all
//! drains that asked during the last round as one `UPDATE`. Likewise each
//! ack is the drain's, answered with what it marked delivered.
//!
//! Each round is one statement in a transaction of its own (one round
//! trip). Its commit waits for the WAL flush like any other; PostgreSQL
//! flushes the commits of concurrent rounds together.

use std::sync::Arc;

use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;

use super::batch::{Batcher, Job};
use super::Shared;
use crate::db::queries::{self, AckSpec, Acked, ClaimSpec, Claimed};
use crate::db::QueryError;
use crate::ids::MemberId;
use crate::metrics::ActorKind;
use crate::routing::ClaimPlan;

/// A batch failed as a whole; what the requester sees.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchFailed {
    #[error("{0}")]
    Query(Arc<QueryError>),
    #[error("the batcher stopped before answering")]
    Stopped,
}

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
    type Out = Result<Vec<Vec<Claimed>>, BatchFailed>;
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
    ) -> LocalBoxFuture<'static, Result<Vec<Self::Out>, QueryError>> {
        async move {
            let cfg = &shared.config.delivery;
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

    fn failed(error: &Arc<QueryError>) -> Self::Out {
        Err(BatchFailed::Query(error.clone()))
    }

    fn stopped() -> Self::Out {
        Err(BatchFailed::Stopped)
    }
}

#[derive(Clone)]
pub struct AckJob;

pub type Acker = Batcher<AckJob>;

impl Job for AckJob {
    type In = AckSpec;
    /// What the ack marked delivered.
    type Out = Result<Vec<Acked>, BatchFailed>;
    const KIND: ActorKind = ActorKind::Acker;
    const MAX_BATCH: usize = 1024;

    fn run(
        &self,
        shared: Arc<Shared>,
        acks: Vec<AckSpec>,
    ) -> LocalBoxFuture<'static, Result<Vec<Self::Out>, QueryError>> {
        async move {
            let mut conn = shared.pool.get().await?;
            let rows = queries::ack_many(&mut conn, &acks).await?;
            Ok(rows.into_iter().map(Ok).collect())
        }
        .boxed_local()
    }

    fn failed(error: &Arc<QueryError>) -> Self::Out {
        Err(BatchFailed::Query(error.clone()))
    }

    fn stopped() -> Self::Out {
        Err(BatchFailed::Stopped)
    }
}
