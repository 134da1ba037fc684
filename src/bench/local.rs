//! The bench's own broker: `meshbroker serve` of this executable as a child
//! process, configured in a temp directory that also holds its log and its
//! embedded PostgreSQL cluster.
//!
//! The broker starts and owns the cluster, as it does in production, with
//! the production settings (`EmbeddedOptions::default()`: fsync and
//! synchronous_commit on). The bench adopts the running cluster only to
//! provision the mesh and to learn its URL; an adopted cluster is never
//! stopped by its adopter. Further brokers of `--brokers` are started with
//! that URL as `database.url` (see [`super::nodes`]).

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::args::BenchArgs;
use crate::admin;
use crate::client::Credentials;
use crate::db::embedded::{EmbeddedOptions, EmbeddedPostgres};

/// How long `serve` may take to answer `/health/ready`: the first start
/// runs initdb, which syncs every file with fsync on.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// SIGTERM lets the broker release leases and stop PostgreSQL cleanly.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// What the cluster says about its durability, read back rather than assumed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Durability {
    pub fsync: String,
    pub synchronous_commit: String,
}

pub struct LocalBroker {
    dir: tempfile::TempDir,
    child: Child,
    pub ws_url: String,
    data_dir: PathBuf,
    pub durability: Durability,
}

impl LocalBroker {
    /// `database`: `None` starts the broker with an embedded cluster of its
    /// own; `Some(url)` points it at another broker's.
    pub async fn start(args: &BenchArgs, database: Option<&str>) -> anyhow::Result<LocalBroker> {
        let dir = tempfile::Builder::new()
            .prefix("meshbroker-bench-")
            .tempdir()
            .context("cannot create a temp dir")?;
        // As root the cluster runs as `postgres`, which must reach its data dir.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").context("no free port")?;
            l.local_addr()?.port()
        };
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("meshbroker.toml");
        std::fs::write(&config_path, config_toml(args, port, &data_dir, database))?;
        let log = std::fs::File::create(dir.path().join("broker.log"))?;
        let exe = match &args.broker_exe {
            Some(exe) => exe.clone(),
            None => std::env::current_exe().context("cannot find this executable")?,
        };
        let child = Command::new(&exe)
            .arg("--config")
            .arg(&config_path)
            .arg("serve")
            .env_remove("MESHBROKER_DATABASE_URL")
            .env_remove("MESHBROKER_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: Ctrl-C reaches only the bench, which
            // then stops the broker in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {} serve", exe.display()))?;
        stop_when_we_exit(child.id());
        let mut broker = LocalBroker {
            dir,
            child,
            ws_url: format!("ws://127.0.0.1:{port}/ws"),
            data_dir,
            durability: Durability {
                fsync: String::new(),
                synchronous_commit: String::new(),
            },
        };
        if let Err(e) = broker.wait_ready(port).await {
            let log = broker.log();
            broker.stop(false).await;
            return Err(e.context(format!("broker log:\n{}", context_log(&log))));
        }
        Ok(broker)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// PGDATA of the broker's cluster (holds postmaster.pid).
    pub fn pgdata(&self) -> PathBuf {
        self.data_dir.join("pg")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self, port: u16) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{port}/health/ready");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("meshbroker serve exited during startup ({status})");
            }
            let ready = awc::Client::new()
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("meshbroker serve was not ready within {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A mesh with `n` fresh members, stored in one transaction (one fsync
    /// instead of `n`), through the admin functions the CLI uses.
    pub async fn provision(&mut self, n: usize) -> anyhow::Result<Vec<Credentials>> {
        let pg = self.adopt_cluster().await?;
        let mut conn = AsyncPgConnection::establish(&pg.url())
            .await
            .map_err(|e| anyhow!("cannot connect to the broker's PostgreSQL: {e}"))?;
        self.durability = durability(&mut conn).await?;
        conn.batch_execute("BEGIN").await?;
        let mesh = admin::create_mesh(&mut conn, "bench").await?;
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let m = admin::add_member(&mut conn, mesh.id, &format!("peer{i}"), None, false).await?;
            let secret = m.secret_key.expect("a generated key pair has its secret");
            members.push(Credentials::from_secret_hex(
                &mesh.id.to_string(),
                &m.id.to_string(),
                &secret,
            )?);
        }
        conn.batch_execute("COMMIT").await?;
        Ok(members)
    }

    /// The URL of the broker's embedded cluster (a Unix socket in its
    /// data dir), for other brokers to share it.
    pub async fn database_url(&self) -> anyhow::Result<String> {
        Ok(self.adopt_cluster().await?.url())
    }

    /// The broker's running cluster. Adopted, not owned: dropping it leaves
    /// the cluster running.
    async fn adopt_cluster(&self) -> anyhow::Result<EmbeddedPostgres> {
        let data_dir = self.data_dir.clone();
        let pg = tokio::task::spawn_blocking(move || {
            EmbeddedPostgres::start(&data_dir, &EmbeddedOptions::default())
        })
        .await??;
        Ok(pg)
    }

    /// SIGTERM and wait; if the broker does not exit in time, SIGKILL it and
    /// stop the cluster it left behind.
    pub async fn stop(mut self, keep: bool) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let exited = loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break true,
                Ok(None) if Instant::now() > deadline => break false,
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        if !exited {
            eprintln!(
                "meshbroker bench: the broker did not stop within {STOP_TIMEOUT:?}; killing it"
            );
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if self.pgdata().join("postmaster.pid").exists() {
            // Its starter is gone, so this takes the cluster over and the
            // drop stops it.
            let data_dir = self.data_dir.clone();
            let _ = tokio::task::spawn_blocking(move || {
                EmbeddedPostgres::start(&data_dir, &EmbeddedOptions::default())
            })
            .await;
        }
        if keep {
            let path = self.dir.keep();
            eprintln!("meshbroker bench: kept {}", path.display());
        }
    }
}

/// A bench killed outright (SIGKILL, a CI timeout) cannot stop its broker,
/// which would keep running with its cluster: a detached watcher sends it
/// SIGTERM once this process is gone. It stands down when the broker exits
/// first, and checks the pid still runs `serve` before signalling.
fn stop_when_we_exit(broker: u32) {
    let script = r#"
        while [ -d "/proc/$1" ] && [ -d "/proc/$2" ]; do sleep 1; done
        if [ ! -d "/proc/$1" ] && tr '\0' ' ' < "/proc/$2/cmdline" 2>/dev/null | grep -q ' serve'; then
            kill -TERM "$2"
        fi
    "#;
    let spawned = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("meshbroker-bench-watcher")
        .arg(std::process::id().to_string())
        .arg(broker.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    if let Err(e) = spawned {
        eprintln!("meshbroker bench: warning: no watcher for the broker ({e}); kill -9 of the bench would leave it running");
    }
}

fn config_toml(args: &BenchArgs, port: u16, data_dir: &Path, database: Option<&str>) -> String {
    // The token bucket must not set the pace; frames must fit --size.
    // The connection limit is per mesh over the whole cluster, so it counts
    // every peer whichever broker it is on.
    let connections = args.connections.max(args.peers) + 100;
    // The embedded cluster's URL is percent-encoded: no quote to escape.
    let database = database.map_or(String::new(), |url| {
        format!("[database]\nurl = {url:?}\n\n")
    });
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"

{database}[storage]
data_dir = {data_dir:?}

[limits]
send_burst = 10000000
send_per_sec = 10000000
max_connections_per_mesh = {max_conn}
max_message_bytes = {max_msg}
max_frame_bytes = {max_frame}

[log]
level = "warn"
"#,
        data_dir = data_dir.display().to_string(),
        max_conn = connections.max(1000),
        max_msg = (args.size + 1024).max(65_536),
        max_frame = (args.size + 4096).max(262_144),
    )
}

#[derive(QueryableByName)]
struct Settings {
    #[diesel(sql_type = diesel::sql_types::Text)]
    fsync: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    synchronous_commit: String,
}

async fn durability(conn: &mut AsyncPgConnection) -> anyhow::Result<Durability> {
    let s: Settings = diesel::sql_query(
        "SELECT current_setting('fsync') AS fsync, \
                current_setting('synchronous_commit') AS synchronous_commit",
    )
    .get_result(conn)
    .await?;
    Ok(Durability {
        fsync: s.fsync,
        synchronous_commit: s.synchronous_commit,
    })
}

/// For errors that carry a child's log.
fn context_log(log: &str) -> String {
    let tail: Vec<&str> = log.lines().rev().take(20).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::args::tests::parse;

    #[test]
    fn generated_config_parses_and_lifts_the_limits() {
        let args = parse(&[
            "--mode",
            "idle",
            "--connections",
            "5000",
            "--size",
            "100000",
        ])
        .unwrap();
        let text = config_toml(&args, 7911, Path::new("/tmp/b \"x\"/data"), None);
        let config = crate::config::Config::parse(&text, Path::new("bench.toml")).unwrap();
        assert_eq!(config.server.listen.port(), 7911);
        assert_eq!(
            config.database.url, None,
            "the broker must use its embedded cluster"
        );
        assert_eq!(config.storage.data_dir, Path::new("/tmp/b \"x\"/data"));
        assert_eq!(config.limits.max_connections_per_mesh, 5100);
        assert!(config.limits.send_burst >= 10_000_000);
        assert!(config.limits.max_message_bytes > 100_000 + 64);
        assert!(config.limits.max_frame_bytes > config.limits.max_message_bytes);
    }

    #[test]
    fn a_further_broker_is_pointed_at_the_first_ones_database() {
        let args = parse(&["--brokers", "2"]).unwrap();
        let url = "postgresql://postgres@/meshbroker?host=/tmp/b%20x/data/pg&port=5432";
        let text = config_toml(&args, 7912, Path::new("/tmp/c/data"), Some(url));
        let config = crate::config::Config::parse(&text, Path::new("bench.toml")).unwrap();
        assert_eq!(config.database.url.as_deref(), Some(url));
        assert_eq!(config.server.listen.port(), 7912);
        assert!(config.limits.send_burst >= 10_000_000);
    }
}
