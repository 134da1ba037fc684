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

mod load;
mod local;
mod procstat;
mod progress;
mod provision;
mod report;
mod stats;

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use anyhow::bail;
use clap::ValueEnum;

use crate::client::Credentials;
use crate::config::Dur;

pub use report::Report;

/// What the peers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each peer sends `--messages` direct messages as fast as `--window` allows.
    Burst,
    /// `--rate` messages/s over all peers for `--duration` s, open loop.
    Steady,
    /// `--senders` peers each broadcast `--messages` times to `*`.
    Fanout,
    /// `--connections` sessions say hello and then do nothing.
    Idle,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Burst => "burst",
            Mode::Steady => "steady",
            Mode::Fanout => "fanout",
            Mode::Idle => "idle",
        }
    }
}

/// The flags of `meshbroker bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value_t = Mode::Burst)]
    pub mode: Mode,
    /// Peers: members, each with a signed hello and a connection of its own.
    #[arg(long, default_value_t = 100)]
    pub peers: usize,
    /// burst: messages each peer sends; fanout: broadcasts each sender makes.
    #[arg(long, default_value_t = 1000)]
    pub messages: usize,
    /// Bytes of ciphertext per message (at least its 20-odd bytes of stamp).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// burst, fanout: sends a peer keeps unanswered at once.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// steady: messages per second, over all peers.
    #[arg(long, default_value_t = 2000)]
    pub rate: u64,
    /// steady: seconds of sending [default 30]; idle: seconds to hold the
    /// connections after the last hello [default 1].
    #[arg(long)]
    pub duration: Option<f64>,
    /// fanout: peers that broadcast.
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// idle: connected sessions.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Hellos in progress at once while connecting.
    #[arg(long, default_value_t = 100)]
    pub hello_concurrency: usize,
    /// Once nothing new arrives for this long, stop waiting for the rest
    /// (what is still missing then is reported lost).
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub drain_timeout: Dur,
    /// A running broker's WebSocket URL (ws://host:port/ws) instead of a
    /// broker of our own; needs --provision.
    #[arg(long, requires = "provision")]
    pub url: Option<String>,
    /// Members to connect as with --url: what `meshbroker member add --json`
    /// prints, one JSON object per line or one array.
    #[arg(long, value_name = "FILE", requires = "url")]
    pub provision: Option<PathBuf>,
    /// Seed of the random choice of recipients.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep the temp dir of our own broker (config, log, PostgreSQL data).
    #[arg(long)]
    pub keep: bool,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    fn steady_secs(&self) -> f64 {
        self.duration.unwrap_or(30.0)
    }

    fn hold_secs(&self) -> f64 {
        self.duration.unwrap_or(1.0)
    }

    /// Members the run needs: idle mode connects as one member per
    /// connection.
    fn members_needed(&self) -> usize {
        match self.mode {
            Mode::Idle => self.connections,
            _ => self.peers,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.mode != Mode::Idle && self.peers < 2 {
            bail!("--peers must be at least 2 (a peer sends to the others)");
        }
        if self.mode == Mode::Fanout && !(1..=self.peers).contains(&self.senders) {
            bail!("--senders must be 1 to --peers ({})", self.peers);
        }
        if self.window == 0 || self.hello_concurrency == 0 {
            bail!("--window and --hello-concurrency must be at least 1");
        }
        if self.mode == Mode::Steady && (self.rate == 0 || self.steady_secs() <= 0.0) {
            bail!("--rate and --duration must be positive");
        }
        if self.mode == Mode::Idle && self.connections == 0 {
            bail!("--connections must be at least 1");
        }
        Ok(())
    }
}

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
    let mut report = Report::new(args, &target.ws_url);
    if let Some(local) = &target.local {
        report.durability = Some(local.durability.clone());
    }
    match args.mode {
        Mode::Idle => {
            let members = &target.members[..args.connections.min(target.members.len())];
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

/// Microseconds between two instants, saturating, as the u32 samples hold
/// (71 minutes at most).
fn micros_between(from: Instant, to: Instant) -> u32 {
    u32::try_from(to.saturating_duration_since(from).as_micros()).unwrap_or(u32::MAX)
}

/// For errors that carry a child's log.
fn context_log(log: &str) -> String {
    let tail: Vec<&str> = log.lines().rev().take(20).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(argv: &[&str]) -> Result<BenchArgs, clap::Error> {
        Wrap::try_parse_from(std::iter::once("bench").chain(argv.iter().copied())).map(|w| w.args)
    }

    #[test]
    fn defaults_are_the_issue_workload() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.mode, Mode::Burst);
        assert_eq!(
            (a.peers, a.messages, a.size, a.window),
            (100, 1000, 256, 256)
        );
        assert_eq!(a.steady_secs(), 30.0);
        assert_eq!(a.drain_timeout, Dur::secs(30));
        a.check().unwrap();
    }

    #[test]
    fn url_and_provision_go_together_and_nonsense_is_refused() {
        assert!(parse(&["--url", "ws://h:1/ws"]).is_err());
        assert!(parse(&["--provision", "m.jsonl"]).is_err());
        assert!(parse(&["--url", "ws://h:1/ws", "--provision", "m.jsonl"]).is_ok());
        assert!(parse(&["--mode", "fanout", "--senders", "101"])
            .unwrap()
            .check()
            .is_err());
        assert!(parse(&["--peers", "1"]).unwrap().check().is_err());
        assert!(parse(&["--mode", "idle", "--peers", "1"])
            .unwrap()
            .check()
            .is_ok());
        assert!(parse(&["--window", "0"]).unwrap().check().is_err());
        assert!(parse(&["--mode", "sideways"]).is_err());
    }
}
