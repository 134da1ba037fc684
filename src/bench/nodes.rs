//! `--brokers N`: the bench's own brokers as a cluster, N `meshbroker
//! serve` processes on one database, the way several nodes share one
//! `database.url` in production.
//!
//! The first starts as a lone bench broker does, owning its embedded
//! PostgreSQL; once it is ready, the others are started with that
//! cluster's URL as their `database.url`, each in a temp dir and on a port
//! of its own, with the same config otherwise. They stop in the reverse
//! order: the first broker stops the cluster, so the others go before it.

use std::path::PathBuf;

use anyhow::Context as _;
use futures_util::future::join_all;

use super::args::BenchArgs;
use super::local::{Durability, LocalBroker};
use crate::client::Credentials;

pub struct LocalNodes {
    /// The first owns the embedded PostgreSQL the others use.
    brokers: Vec<LocalBroker>,
}

impl LocalNodes {
    pub async fn start(args: &BenchArgs) -> anyhow::Result<LocalNodes> {
        let first = LocalBroker::start(args, None).await?;
        let mut nodes = LocalNodes {
            brokers: vec![first],
        };
        if args.brokers > 1 {
            if let Err(e) = nodes.start_the_others(args).await {
                nodes.stop(args.keep).await;
                return Err(e);
            }
        }
        Ok(nodes)
    }

    /// The N-1 further brokers, at once: they only connect to a database
    /// the first one has already migrated.
    async fn start_the_others(&mut self, args: &BenchArgs) -> anyhow::Result<()> {
        let url = self.brokers[0]
            .database_url()
            .await
            .context("cannot find the first broker's PostgreSQL")?;
        let started =
            join_all((1..args.brokers).map(|_| LocalBroker::start(args, Some(&url)))).await;
        let mut first_error = None;
        for (i, r) in started.into_iter().enumerate() {
            match r {
                Ok(b) => self.brokers.push(b),
                Err(e) => {
                    first_error.get_or_insert(e.context(format!("cannot start broker {}", i + 1)));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// WebSocket URLs, in broker order.
    pub fn ws_urls(&self) -> Vec<String> {
        self.brokers.iter().map(|b| b.ws_url.clone()).collect()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.brokers.iter().map(LocalBroker::pid).collect()
    }

    /// PGDATA of the one cluster they share.
    pub fn pgdata(&self) -> PathBuf {
        self.brokers[0].pgdata()
    }

    /// As the cluster reports it, once [`Self::provision`] has read it.
    pub fn durability(&self) -> &Durability {
        &self.brokers[0].durability
    }

    /// The mesh, stored once in the shared database: every broker sees it.
    pub async fn provision(&mut self, n: usize) -> anyhow::Result<Vec<Credentials>> {
        self.brokers[0].provision(n).await
    }

    /// The further brokers (at once), then the first and its cluster.
    pub async fn stop(mut self, keep: bool) {
        let others = self.brokers.split_off(1);
        join_all(others.into_iter().map(|b| b.stop(keep))).await;
        for b in self.brokers {
            b.stop(keep).await;
        }
    }
}
