//! `meshbroker bench`: a load generator and report, like `nats bench` or
//! `redis-benchmark`, for the whole path send → store → push → client_ack.
//!
//! By default it starts its own broker: `meshbroker serve` of this very
//! executable as a child process, with its embedded PostgreSQL in a temp
//! directory, durable as in production (fsync and synchronous_commit on);
//! `--brokers N` starts N of them on that one database. With `--url` (once
//! per broker) and `--provision` it loads brokers that are already running.
//! Peer i connects to broker i % N, and direct messages go to peers on
//! another broker, so with N > 1 every message crosses nodes.
//!
//! Every client runs on this process's one actix thread: a connection is a
//! cheap local task, and the two cores of a small machine stay with the
//! broker and PostgreSQL.
//!
//! - [`local`]: a child broker, its config and the mesh provisioned for it.
//! - [`nodes`]: `--brokers N`, the child brokers on one database.
//! - [`provision`]: the members file of `--provision`.
//! - [`load`]: the peers' tasks and what they count.
//! - [`procstat`]: RSS and CPU of the brokers and PostgreSQL from `/proc`.
//! - [`progress`]: the line on stderr while it runs.
//! - [`report`]: the figures, as text or one JSON object.
//! - [`stats`]: latency percentiles.

mod args;
mod batches;
mod load;
mod local;
mod nodes;
mod procstat;
mod progress;
mod provision;
mod report;
mod stats;

use std::rc::Rc;

use anyhow::bail;

use crate::client::Credentials;

pub use args::{BenchArgs, Mode};
pub use report::Report;

/// Where the load goes, and what the peers connect as.
struct Target {
    /// One per broker, peer i on `ws_urls[i % N]`.
    ws_urls: Vec<String>,
    members: Vec<Credentials>,
    /// Our own brokers, when we started them.
    local: Option<nodes::LocalNodes>,
}

/// Runs `meshbroker bench`; prints the report on stdout.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    args.check()?;
    raise_fd_limit();
    let progress = Rc::new(progress::Progress::new(args.quiet));
    let mut target = match (args.url.is_empty(), &args.provision) {
        (false, Some(file)) => {
            if let Some(ca_file) = &args.ca_file {
                crate::client::trust(ca_file)?;
            }
            let members = provision::load(file)?;
            // Idle mode makes the missing connections sessions of the members.
            let least = if args.mode == Mode::Idle { 1 } else { 2 };
            if members.len() < least {
                bail!(
                    "{} holds {} member(s); the run needs at least {least}",
                    file.display(),
                    members.len()
                );
            }
            Target {
                ws_urls: args.url.iter().map(|u| crate::client::ws_url(u)).collect(),
                members,
                local: None,
            }
        }
        _ => {
            progress.note(&if args.brokers > 1 {
                format!("starting {} brokers (meshbroker serve; the first with embedded PostgreSQL with fsync on, the others on its database)", args.brokers)
            } else {
                "starting a broker (meshbroker serve, embedded PostgreSQL with fsync on)".into()
            });
            let mut broker = nodes::LocalNodes::start(&args).await?;
            progress.note(&format!("provisioning {} members", args.members_needed()));
            let members = match broker.provision(args.members_needed()).await {
                Ok(m) => m,
                Err(e) => {
                    broker.stop(args.keep).await;
                    return Err(e.context("cannot provision the bench mesh"));
                }
            };
            Target {
                ws_urls: broker.ws_urls(),
                members,
                local: Some(broker),
            }
        }
    };
    let outcome = {
        let work = workload(&args, &target, progress.clone());
        tokio::select! {
            r = work => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    };
    progress.clear();
    if let Some(local) = target.local.take() {
        local.stop(args.keep).await;
    }
    let report = outcome?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.render());
    }
    if report.lost > 0 {
        eprintln!(
            "meshbroker bench: warning: {} accepted deliveries were lost",
            report.lost
        );
    }
    Ok(())
}

/// Connects, runs the mode, and gathers every figure into a report.
async fn workload(
    args: &BenchArgs,
    target: &Target,
    progress: Rc<progress::Progress>,
) -> anyhow::Result<Report> {
    let monitor = target
        .local
        .as_ref()
        .map(|l| procstat::Monitor::start(l.pids(), l.pgdata()));
    let bench_cpu = procstat::self_cpu_secs();
    let batches_before = batch_snapshots(&target.ws_urls).await;
    let mut report = Report::new(args, &target.ws_urls);
    if let Some(local) = &target.local {
        report.durability = Some(local.durability().clone());
    }
    match args.mode {
        Mode::Idle => {
            let members = &target.members[..args.members_needed().min(target.members.len())];
            report.place(args.connections);
            let idle =
                load::idle(args, &target.ws_urls, members, &progress, monitor.as_ref()).await?;
            report.idle = Some(idle);
        }
        _ => {
            let peers = &target.members[..args.peers.min(target.members.len())];
            if peers.len() < args.peers {
                progress.note(&format!(
                    "the provision file holds {} members: running with {} peers",
                    target.members.len(),
                    peers.len()
                ));
            }
            report.peers = peers.len();
            report.place(peers.len());
            let ran = load::traffic(args, &target.ws_urls, peers, &progress).await?;
            report.fill_traffic(ran);
        }
    }
    if let Some(m) = monitor {
        let used = m.finish();
        for (b, usage) in report.brokers.iter_mut().zip(used.brokers) {
            b.usage = usage;
        }
        report.broker = used.total;
        report.postgres = used.postgres;
    }
    report.bench_cpu_s = procstat::self_cpu_secs() - bench_cpu;
    let batches_after = batch_snapshots(&target.ws_urls).await;
    let mut read_all = true;
    for ((b, before), after) in report
        .brokers
        .iter_mut()
        .zip(batches_before)
        .zip(batches_after)
    {
        match (before, after) {
            (Some(before), Some(after)) => b.batches = batches::between(&before, &after),
            _ => read_all = false,
        }
    }
    // A broker whose /metrics could not be read would make the sum look
    // like a lighter load: no sum then, as with one broker.
    if read_all {
        report.batches = batches::sum(report.brokers.iter().map(|b| &b.batches));
    }
    Ok(report)
}

/// Every broker's `/metrics` at once, in broker order.
async fn batch_snapshots(ws_urls: &[String]) -> Vec<Option<batches::Snapshot>> {
    futures_util::future::join_all(ws_urls.iter().map(|u| batches::snapshot(u))).await
}

/// Idle mode holds thousands of sockets, the broker's among them (it
/// inherits the limit): take the hard limit as the soft one.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
