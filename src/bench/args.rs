//! The command line of `meshbroker bench`, and its checks.

use std::path::PathBuf;

use anyhow::bail;
use clap::ValueEnum;

use crate::config::Dur;

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
    pub(super) fn name(self) -> &'static str {
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
    /// idle: members the connections belong to [default: one per
    /// connection]. A member's first connection says `hello`, the rest are
    /// its sessions (`session_hello`). Presence events go to the other
    /// members' connections, so K connections of K members receive
    /// K(K-1)/2 `peer_joined` pushes; `--members 1` measures the hellos
    /// and the idle connections alone.
    #[arg(long)]
    pub members: Option<usize>,
    /// Hellos in progress at once while connecting.
    #[arg(long, default_value_t = 100)]
    pub hello_concurrency: usize,
    /// Once nothing new arrives for this long, stop waiting for the rest
    /// (what is still missing then is reported lost).
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub drain_timeout: Dur,
    /// Our own brokers: `meshbroker serve` processes on one database (the
    /// first one's embedded PostgreSQL), peer i on broker i % N, so that
    /// traffic crosses nodes.
    #[arg(long, default_value_t = 1, conflicts_with = "url")]
    pub brokers: usize,
    /// With several brokers: send to peers on the sender's own broker, so
    /// nothing crosses nodes (the control for a cross-node run: the same
    /// processes on the same machine).
    #[arg(long)]
    pub same_node: bool,
    /// A running broker's WebSocket URL (ws://host:port/ws) instead of a
    /// broker of our own; needs --provision. Repeat it for brokers of one
    /// cluster: peer i connects to the (i % N)-th.
    #[arg(long, requires = "provision")]
    pub url: Vec<String>,
    /// Members to connect as with --url: what `meshbroker member add --json`
    /// prints, one JSON object per line or one array.
    #[arg(long, value_name = "FILE", requires = "url")]
    pub provision: Option<PathBuf>,
    /// With wss:// URLs: a PEM file of the authority that signed the
    /// brokers' certificates [default: the system's bundle]
    #[arg(long, value_name = "PATH", env = "MESHBROKER_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Serve this meshbroker executable instead of this one (our own
    /// brokers only, all of them): one load generator against two builds,
    /// to compare them in one sitting.
    #[arg(long, value_name = "PATH", conflicts_with = "url")]
    pub broker_exe: Option<PathBuf>,
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
    pub(super) fn steady_secs(&self) -> f64 {
        self.duration.unwrap_or(30.0)
    }

    pub(super) fn hold_secs(&self) -> f64 {
        self.duration.unwrap_or(1.0)
    }

    /// Members the run needs: idle mode connects as one member per
    /// connection unless `--members` says fewer.
    pub(super) fn members_needed(&self) -> usize {
        match self.mode {
            Mode::Idle => self
                .members
                .unwrap_or(self.connections)
                .min(self.connections),
            _ => self.peers,
        }
    }

    /// Brokers the peers are spread over: ours, or the `--url`s.
    pub(super) fn broker_count(&self) -> usize {
        if self.url.is_empty() {
            self.brokers
        } else {
            self.url.len()
        }
    }

    pub(super) fn check(&self) -> anyhow::Result<()> {
        if self.same_node && self.peers < 2 * self.broker_count() {
            bail!(
                "--same-node needs at least 2 peers per broker ({} peers, {} brokers)",
                self.peers,
                self.broker_count()
            );
        }
        if self.brokers == 0 {
            bail!("--brokers must be at least 1");
        }
        // A broker without peers would be started or named for nothing.
        if self.mode != Mode::Idle && self.peers < self.broker_count() {
            bail!(
                "--peers ({}) must be at least the number of brokers ({}): each broker serves a peer",
                self.peers,
                self.broker_count()
            );
        }
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
        if self.members == Some(0) {
            bail!("--members must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: BenchArgs,
    }

    /// `meshbroker bench ARGV…` as its arguments; also for other modules' tests.
    pub(in crate::bench) fn parse(argv: &[&str]) -> Result<BenchArgs, clap::Error> {
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
        assert!(parse(&["--mode", "idle", "--members", "0"])
            .unwrap()
            .check()
            .is_err());
        let a = parse(&["--mode", "idle", "--connections", "50", "--members", "3"]).unwrap();
        assert_eq!(a.members_needed(), 3);
        assert_eq!(
            parse(&["--mode", "idle", "--connections", "50"])
                .unwrap()
                .members_needed(),
            50
        );
        assert!(parse(&["--mode", "sideways"]).is_err());
    }

    #[test]
    fn brokers_default_to_one_and_zero_is_refused() {
        let a = parse(&[]).unwrap();
        assert_eq!((a.brokers, a.broker_count()), (1, 1));
        let a = parse(&["--brokers", "3"]).unwrap();
        assert_eq!(a.broker_count(), 3);
        a.check().unwrap();
        let zero = parse(&["--brokers", "0"]).unwrap().check().unwrap_err();
        assert!(zero.to_string().contains("--brokers"), "{zero}");
        // Every broker gets a peer; idle mode spreads connections instead.
        assert!(parse(&["--brokers", "3", "--peers", "2"])
            .unwrap()
            .check()
            .is_err());
        assert!(
            parse(&["--brokers", "3", "--mode", "idle", "--connections", "2"])
                .unwrap()
                .check()
                .is_ok()
        );
    }

    #[test]
    fn urls_repeat_and_exclude_brokers_of_our_own() {
        let a = parse(&[
            "--url",
            "ws://a:1/ws",
            "--url",
            "ws://b:2/ws",
            "--provision",
            "m.jsonl",
        ])
        .unwrap();
        assert_eq!(a.url, ["ws://a:1/ws", "ws://b:2/ws"]);
        assert_eq!(a.broker_count(), 2);
        a.check().unwrap();
        let e = parse(&[
            "--brokers",
            "2",
            "--url",
            "ws://a:1/ws",
            "--provision",
            "m.jsonl",
        ])
        .expect_err("--brokers with --url is a conflict");
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        // Stated as the default, it still names brokers of our own.
        assert!(parse(&[
            "--brokers",
            "1",
            "--url",
            "ws://a:1/ws",
            "--provision",
            "m.jsonl"
        ])
        .is_err());
    }
}
