//! `meshbroker bench`: a load generator and report, like `nats bench` or
//! `redis-benchmark`, for the whole path send → store → push → client_ack.
//!
//! By default it starts its own broker: `meshbroker serve` of this very
//! executable as a child process, with its embedded PostgreSQL in a temp
//! directory, durable as in production (fsync and synchronous_commit on).
//! With `--url` and `--provision` it loads a broker that is already running.
//!
//! Every client runs on this process's one actix thread: a connection is a
//! cheap local task, and the two cores of a small machine stay with the
//! broker and PostgreSQL.
//!
//! - [`local`]: the child broker, its config and the mesh provisioned for it.
//! - [`provision`]: the members file of `--provision`.
//! - [`load`]: the peers' tasks and what they count.
//! - [`procstat`]: RSS and CPU of the broker and PostgreSQL from `/proc`.
//! - [`progress`]: the line on stderr while it runs.
//! - [`report`]: the figures, as text or one JSON object.
//! - [`stats`]: latency percentiles.

mod args;
mod batches;
mod load;
mod local;
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
    ws_url: String,
    members: Vec<Credentials>,
    /// Our own broker, when we started it.
    local: Option<local::LocalBroker>,
}

/// Runs `meshbroker bench`; prints the report on stdout.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    args.check()?;
    raise_fd_limit();
    let progress = Rc::new(progress::Progress::new(args.quiet));
    let mut target = match (&args.url, &args.provision) {
        (Some(url), Some(file)) => {
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
                ws_url: crate::client::ws_url(url),
                members,
                local: None,
            }
        }
        _ => {
            progress
                .note("starting a broker (meshbroker serve, embedded PostgreSQL with fsync on)");
            let mut broker = local::LocalBroker::start(&args).await?;
            progress.note(&format!("provisioning {} members", args.members_needed()));
            let members = match broker.provision(args.members_needed()).await {
                Ok(m) => m,
                Err(e) => {
                    broker.stop(args.keep).await;
                    return Err(e.context("cannot provision the bench mesh"));
                }
            };
            Target {
                ws_url: broker.ws_url.clone(),
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
        .map(|l| procstat::Monitor::start(l.pid(), l.pgdata()));
    let bench_cpu = procstat::self_cpu_secs();
    let batches_before = batches::snapshot(&target.ws_url).await;
    let mut report = Report::new(args, &target.ws_url);
    if let Some(local) = &target.local {
        report.durability = Some(local.durability.clone());
    }
    match args.mode {
        Mode::Idle => {
            let members = &target.members[..args.members_needed().min(target.members.len())];
            let idle =
                load::idle(args, &target.ws_url, members, &progress, monitor.as_ref()).await?;
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
            let ran = load::traffic(args, &target.ws_url, peers, &progress).await?;
            report.fill_traffic(ran);
        }
    }
    if let Some(m) = monitor {
        let (broker, postgres) = m.finish();
        report.broker = broker;
        report.postgres = postgres;
    }
    report.bench_cpu_s = procstat::self_cpu_secs() - bench_cpu;
    if let (Some(before), Some(after)) = (batches_before, batches::snapshot(&target.ws_url).await) {
        report.batches = batches::between(&before, &after);
    }
    Ok(report)
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
