//! The real `meshbroker serve` executable as a child process, and a ledger
//! of what the fault tests sent, got pushed and acked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_meshbroker");

/// Config overrides for a broker process: `section.key` → TOML value.
#[derive(Clone, Debug, Default)]
pub struct ProcessConfig(BTreeMap<String, String>);

impl ProcessConfig {
    /// The defaults the process tests use: a 60 s lease, a 200 ms sweeper,
    /// a pool of 4, warn-level logs.
    pub fn new() -> Self {
        ProcessConfig::default()
            .set("database.pool_size", "4")
            .set("delivery.lease", "\"60s\"")
            .set("sweeper.interval", "\"200ms\"")
            .set("log.level", "\"warn\"")
    }

    /// Sets `dotted` (e.g. `"delivery.lease"`) to a TOML value (`"\"2s\""`).
    pub fn set(mut self, dotted: &str, toml_value: &str) -> Self {
        self.0.insert(dotted.to_owned(), toml_value.to_owned());
        self
    }

    fn render(&self) -> String {
        let mut sections: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (dotted, value) in &self.0 {
            let (section, key) = dotted.split_once('.').expect("section.key");
            sections
                .entry(section)
                .or_default()
                .push(format!("{key} = {value}"));
        }
        sections
            .into_iter()
            .map(|(s, lines)| format!("[{s}]\n{}\n", lines.join("\n")))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A `meshbroker serve` child process on a free port; killed on drop.
pub struct BrokerProcess {
    pub child: Child,
    pub config_path: PathBuf,
    /// What `config_path` holds.
    config: ProcessConfig,
    dir: tempfile::TempDir,
    pub http_url: String,
    pub ws_url: String,
    /// Environment variables set for this process only.
    env: Vec<(String, std::ffi::OsString)>,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl BrokerProcess {
    pub async fn spawn(db_url: &str) -> BrokerProcess {
        Self::spawn_config(db_url, ProcessConfig::new()).await
    }

    pub async fn spawn_with_lease(db_url: &str, lease: &str) -> BrokerProcess {
        Self::spawn_config(
            db_url,
            ProcessConfig::new().set("delivery.lease", &format!("{lease:?}")),
        )
        .await
    }

    /// A broker on `db_url` with `config` (listen and database.url are set here).
    pub async fn spawn_config(db_url: &str, config: ProcessConfig) -> BrokerProcess {
        Self::spawn_toml(
            config.set("database.url", &format!("{db_url:?}")),
            Vec::new(),
        )
        .await
    }

    /// As [`Self::spawn`], with environment variables for this process only.
    pub async fn spawn_with_env(
        db_url: &str,
        env: Vec<(String, std::ffi::OsString)>,
    ) -> BrokerProcess {
        let config = ProcessConfig::new().set("database.url", &format!("{db_url:?}"));
        Self::spawn_toml(config, env).await
    }

    /// A broker without `database.url`: it starts (or adopts) the embedded
    /// PostgreSQL in `data_dir` (`storage.data_dir`) itself.
    pub async fn spawn_embedded(
        data_dir: &std::path::Path,
        config: ProcessConfig,
    ) -> BrokerProcess {
        Self::spawn_toml(
            config.set("storage.data_dir", &format!("{data_dir:?}")),
            Vec::new(),
        )
        .await
    }

    async fn spawn_toml(
        config: ProcessConfig,
        env: Vec<(String, std::ffi::OsString)>,
    ) -> BrokerProcess {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("meshbroker.toml");
        let config = config.set("server.listen", &format!("\"127.0.0.1:{port}\""));
        std::fs::write(&config_path, config.render()).expect("write config");
        let tls = config.0.contains_key("server.tls.cert");
        let (http, ws) = if tls {
            ("https", "wss")
        } else {
            ("http", "ws")
        };
        let mut p = BrokerProcess {
            child: Command::new("true").spawn().expect("placeholder child"),
            config_path,
            config,
            dir,
            http_url: format!("{http}://127.0.0.1:{port}"),
            ws_url: format!("{ws}://127.0.0.1:{port}/ws"),
            env,
        };
        let _ = p.child.wait();
        p.start().await;
        p
    }

    /// Starts (again) `meshbroker serve` with this process's config and
    /// port, appending to the same log; waits until `/health` answers.
    pub async fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("broker.log"))
            .expect("log file");
        self.child = Command::new(BIN)
            .arg("--config")
            .arg(&self.config_path)
            .arg("serve")
            .env_remove("MESHBROKER_DATABASE_URL")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn meshbroker serve");
        self.wait_healthy().await;
    }

    /// Rewrites the config file with `change` applied to what it holds
    /// (for a SIGHUP to read).
    pub fn rewrite_config(&mut self, change: impl FnOnce(ProcessConfig) -> ProcessConfig) {
        self.config = change(self.config.clone());
        self.write_config_text(&self.config.render());
    }

    /// Replaces the config file with `text` as it is (a broken file).
    pub fn write_config_text(&self, text: &str) {
        std::fs::write(&self.config_path, text).expect("write config");
    }

    /// Sends SIGHUP and waits until the log has one more line containing
    /// `marker` than before; returns the log.
    pub async fn sighup_until(&self, marker: &str) -> String {
        let before = self.log().matches(marker).count();
        self.signal(Signal::SIGHUP);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.matches(marker).count() > before {
                return log;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("no {marker:?} in the log after SIGHUP:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A connection to this broker with a completed `hello` as `m`.
    pub async fn hello(&self, m: &crate::support::Member) -> meshbroker::client::Connection {
        use crate::support::Must as _;
        meshbroker::client::hello(&self.ws_url, &m.creds, &Default::default())
            .await
            .must()
            .0
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    async fn wait_healthy(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("meshbroker serve exited early ({status}):\n{}", self.log());
            }
            let url = format!("{}/health", self.http_url);
            let ok = meshbroker::client::http_client(&url)
                .expect("HTTP client")
                .get(url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("meshbroker serve did not become healthy:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).unwrap_or_else(|e| panic!("send {signal}: {e}"));
    }

    pub fn sigterm(&self) {
        self.signal(Signal::SIGTERM);
    }

    /// SIGKILL, and wait until the process is gone.
    pub async fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL the broker");
        let _ = self.wait_exit(Duration::from_secs(10)).await;
    }

    /// Resident memory of the broker process, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_child(&mut self.child, timeout)
            .await
            .unwrap_or_else(|| panic!("meshbroker did not exit in {timeout:?}:\n{}", self.log()))
    }
}

/// Runs `meshbroker --config <config> <args…>` to completion (off the
/// runtime's thread), without any `MESHBROKER_DATABASE_URL` of our own.
pub async fn run_cli(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env_remove("MESHBROKER_DATABASE_URL");
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("run meshbroker {args:?}: {e}"))
}

pub async fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a fault test sent and what came back: the messages the broker
/// answered `queued:true`, every push of them, and the acks sent.
#[derive(Debug, Default)]
pub struct Ledger {
    accepted: HashSet<String>,
    refused: HashMap<String, u32>,
    pushes: HashMap<String, u32>,
    acked: HashSet<String>,
}

/// What [`Ledger::report`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub accepted: usize,
    pub refused: u32,
    /// Accepted messages never pushed, or pushed but never acked.
    pub lost: Vec<String>,
    /// Accepted messages pushed more than once.
    pub duplicated: usize,
    /// Pushes beyond the first, summed.
    pub extra_pushes: u32,
}

impl Ledger {
    /// Records a send's `ack`: accepted when `queued:true`, else counted by
    /// its error code.
    pub fn sent(&mut self, ack: &Value) {
        if ack["queued"] == true {
            let id = ack["messageId"].as_str().expect("queued ack has messageId");
            self.accepted.insert(id.to_owned());
        } else {
            let code = meshbroker::client::refusal_code(ack).to_owned();
            *self.refused.entry(code).or_default() += 1;
        }
    }

    /// Records a push.
    pub fn pushed(&mut self, push: &Value) {
        let id = push["messageId"].as_str().expect("push has messageId");
        *self.pushes.entry(id.to_owned()).or_default() += 1;
    }

    /// Records that the recipient acked this push.
    pub fn acked(&mut self, push: &Value) {
        let id = push["messageId"].as_str().expect("push has messageId");
        self.acked.insert(id.to_owned());
    }

    /// Accepted messages not yet acked.
    pub fn outstanding(&self) -> usize {
        self.accepted.difference(&self.acked).count()
    }

    pub fn refused(&self, code: &str) -> u32 {
        self.refused.get(code).copied().unwrap_or(0)
    }

    pub fn report(&self) -> Report {
        let mut lost: Vec<String> = self.accepted.difference(&self.acked).cloned().collect();
        lost.sort();
        let dups: Vec<u32> = self
            .pushes
            .iter()
            .filter(|(id, n)| **n > 1 && self.accepted.contains(*id))
            .map(|(_, n)| n - 1)
            .collect();
        Report {
            accepted: self.accepted.len(),
            refused: self.refused.values().sum(),
            lost,
            duplicated: dups.len(),
            extra_pushes: dups.iter().sum(),
        }
    }

    /// Prints the test's one `FIGURES` line (`cargo test -- --nocapture`
    /// shows it): the ledger's counts, then `extra`; and asserts nothing
    /// accepted was lost.
    pub fn assert_nothing_lost(&self, test: &str, extra: &str) -> Report {
        let r = self.report();
        println!(
            "FIGURES {test}: messages={} refused={} (unavailable={}, rate_limit={}) lost={} \
             duplicated={} extra_pushes={} {extra}",
            r.accepted,
            r.refused,
            self.refused("unavailable"),
            self.refused("rate_limit"),
            r.lost.len(),
            r.duplicated,
            r.extra_pushes,
        );
        assert!(
            r.lost.is_empty(),
            "{test}: {} accepted messages never acked: {:?}",
            r.lost.len(),
            r.lost
        );
        r
    }
}
