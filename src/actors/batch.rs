//! Self-clocking batching: many actors' requests of one kind share one
//! database round.
//!
//! One statement per request costs a round trip, a parse and plan, and —
//! for writes — a commit each; PostgreSQL spends its time on those, not on
//! the rows. A [`Batcher`] queues the requests it is sent and runs them as
//! one batch; while a batch runs, new requests queue, and the next batch
//! starts the moment the previous one returns. No timer: an idle broker
//! answers a lone request after one round, a busy one batches as many as
//! arrived during the last round (up to [`Job::MAX_BATCH`]).
//!
//! The writer (sends), the claimer and the acker are batchers. Each is
//! supervised: if one stops, the requests it held are answered as failed
//! (their reply channels drop) and a fresh one takes the mailbox.

use std::sync::Arc;

use actix::prelude::*;
use futures_util::future::LocalBoxFuture;
use tokio::sync::oneshot;

use super::Shared;
use crate::db::QueryError;
use crate::metrics::ActorKind;

/// Requests the mailbox holds before a sender's `send` waits for room.
const MAILBOX: usize = 1 << 16;

/// One kind of batched database work.
pub trait Job: Clone + Unpin + 'static {
    /// One request.
    type In: Send + Unpin + 'static;
    /// Its answer when the round succeeded.
    type Done: Send + Unpin + 'static;
    /// The kind the actor is counted as in `meshbroker_actors`.
    const KIND: ActorKind;
    /// Most requests one batch takes: bounds a round's length and the wait
    /// of its first request.
    const MAX_BATCH: usize;

    /// Runs one batch: one answer per request, in order. `Err` only when
    /// the round failed as a whole (nothing of it happened).
    fn run(
        &self,
        shared: Arc<Shared>,
        batch: Vec<Self::In>,
    ) -> LocalBoxFuture<'static, Result<Vec<Out<Self>>, QueryError>>;

    /// The weight of one request against [`Job::MAX_BATCH`] (rows, not
    /// requests, where one request carries many).
    fn weight(_: &Self::In) -> usize {
        1
    }
}

/// One request's answer: what the job made of it, or why there is none.
pub type Out<J> = Result<<J as Job>::Done, BatchFailed>;

/// Why a request got no answer of its job's; to a sender, `unavailable`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchFailed {
    /// Its round failed as a whole: nothing of it happened.
    #[error("{0}")]
    Query(Arc<QueryError>),
    /// The batcher stopped (and was restarted) before answering.
    #[error("the batcher stopped before answering")]
    Stopped,
}

/// A request to a [`Batcher`].
pub struct Submit<J: Job>(pub J::In);

impl<J: Job> Message for Submit<J> {
    type Result = Out<J>;
}

struct Pending<J: Job> {
    input: J::In,
    reply: oneshot::Sender<Out<J>>,
}

pub struct Batcher<J: Job> {
    shared: Arc<Shared>,
    job: J,
    queue: std::collections::VecDeque<Pending<J>>,
    /// A batch is running.
    running: bool,
}

impl<J: Job> Batcher<J> {
    pub fn new(shared: Arc<Shared>, job: J) -> Self {
        Batcher {
            shared,
            job,
            queue: Default::default(),
            running: false,
        }
    }

    /// Starts a supervised batcher on `arbiter` (one off the threads that
    /// serve sockets, so its rounds' encoding and decoding do not delay them).
    pub fn start_supervised(arbiter: &ArbiterHandle, shared: Arc<Shared>, job: J) -> Addr<Self>
    where
        J: Send,
    {
        Supervisor::start_in_arbiter(arbiter, move |_| Batcher::new(shared, job))
    }

    fn run_next(&mut self, ctx: &mut Context<Self>) {
        if self.running || self.queue.is_empty() {
            return;
        }
        self.running = true;
        let mut weight = 0;
        let mut batch = Vec::new();
        while let Some(p) = self.queue.front() {
            let w = J::weight(&p.input);
            if !batch.is_empty() && weight + w > J::MAX_BATCH {
                break;
            }
            weight += w;
            batch.push(self.queue.pop_front().expect("front exists"));
        }
        let metrics = self.shared.metrics.clone();
        metrics.batch_run(J::KIND, batch.len());
        let (inputs, replies): (Vec<J::In>, Vec<_>) =
            batch.into_iter().map(|p| (p.input, p.reply)).unzip();
        let round = self.job.run(self.shared.clone(), inputs);
        let began = std::time::Instant::now();
        let fut = async move {
            match round.await {
                Ok(outs) => {
                    debug_assert_eq!(outs.len(), replies.len(), "one answer per request");
                    for (reply, out) in replies.into_iter().zip(outs) {
                        let _ = reply.send(out);
                    }
                }
                Err(e) => {
                    tracing::warn!(kind = ?J::KIND, requests = replies.len(), error = %e, "batch failed");
                    let e = Arc::new(e);
                    for reply in replies {
                        let _ = reply.send(Err(BatchFailed::Query(e.clone())));
                    }
                }
            }
            metrics.batch_done(J::KIND, began.elapsed().as_secs_f64());
        };
        ctx.spawn(fut.into_actor(self).map(|(), act, ctx| {
            act.running = false;
            act.run_next(ctx);
        }));
    }
}

impl<J: Job> Actor for Batcher<J> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Requests arrive from every socket thread, many per round: room
        // for all of them, so senders wait on the round, not the mailbox.
        ctx.set_mailbox_capacity(MAILBOX);
        self.shared.metrics.actor_started(J::KIND);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.shared.metrics.actor_stopped(J::KIND);
    }
}

impl<J: Job> Supervised for Batcher<J> {
    fn restarting(&mut self, _: &mut Self::Context) {
        self.shared.metrics.actor_restarted(J::KIND);
        self.running = false;
        self.queue.clear();
    }
}

impl<J: Job> Handler<Submit<J>> for Batcher<J> {
    type Result = ResponseFuture<Out<J>>;

    fn handle(&mut self, msg: Submit<J>, ctx: &mut Self::Context) -> Self::Result {
        self.shared.metrics.actor_message(J::KIND);
        let (reply, answer) = oneshot::channel();
        self.queue.push_back(Pending {
            input: msg.0,
            reply,
        });
        self.run_next(ctx);
        Box::pin(async move { answer.await.unwrap_or(Err(BatchFailed::Stopped)) })
    }
}
