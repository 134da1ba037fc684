//! The private PostgreSQL cluster used when no `database.url` is configured.
//!
//! It lives in `<storage.data_dir>/pg`, listens only on a Unix socket inside
//! that directory (no TCP), and trusts local connections as `postgres`.
//! Whoever starts the cluster owns it and stops it; a cluster already running
//! on the data dir is adopted instead: left alone if the process that started
//! it is still alive (a broker, while the CLI runs an admin command), taken
//! over if that process is gone (a SIGKILLed broker, a finished test binary).
//! The starter's pid is kept in `<data_dir>/embedded-postgres.owner`.
//!
//! Starting is serialized across processes by a lock on
//! `<data_dir>/embedded-postgres.lock`, so test processes starting at once
//! do not race `initdb` or `pg_ctl start`.
//!
//! A cluster that dies is brought back by [`EmbeddedPostgres::revive`] (the
//! broker's [`super::supervisor`] calls it) under the same lock and the same
//! rule: its owner restarts it; an adopter leaves it to a starter that is
//! still alive and takes over from one that is gone.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{Gid, Uid};

use crate::config::{redact_url, Config};
use crate::db::{self, Pool};

/// The database the broker uses inside the cluster.
pub const DATABASE: &str = "meshbroker";
/// The cluster's superuser; also the OS user it runs as when we are root.
const SUPERUSER: &str = "postgres";
/// Port number only names the socket file (`.s.PGSQL.5432`); there is no TCP.
const PORT: u16 = 5432;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
const OWNER_FILE: &str = "embedded-postgres.owner";
const LOCK_FILE: &str = "embedded-postgres.lock";
const LOG_FILE: &str = "postgresql.log";
const NO_INSTALLATION: &str = "no PostgreSQL installation found: install the PostgreSQL server package (e.g. apt-get install postgresql) or set database.url";

#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Off trades crash safety for speed (fsync, synchronous_commit and
    /// full_page_writes off, initdb without sync): for tests only.
    pub fsync: bool,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self { fsync: true }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("{NO_INSTALLATION}")]
    NoInstallation,
    #[error("cannot use storage.data_dir {path}: {source} (set storage.data_dir to a writable directory)")]
    DataDir { path: PathBuf, source: io::Error },
    #[error("running as root, but there is no `postgres` user to run the embedded PostgreSQL as: create it (the PostgreSQL server package does), run meshbroker as another user, or set database.url")]
    NoPostgresUser,
    #[error("directory {path} is not accessible to the `postgres` user the embedded PostgreSQL runs as: set storage.data_dir elsewhere (e.g. under /var/lib or /tmp) or make {path} world-searchable (chmod o+x)")]
    NotTraversable { path: PathBuf },
    #[error("the embedded PostgreSQL socket path {path} is {len} bytes, over the {MAX_SOCKET_PATH}-byte limit for Unix sockets: set storage.data_dir to a shorter path")]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("embedded PostgreSQL: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("embedded PostgreSQL: {what} failed: {detail}")]
    Command { what: &'static str, detail: String },
    #[error("embedded PostgreSQL failed to start: {detail} (see {log})")]
    Start { detail: String, log: PathBuf },
    #[error("embedded PostgreSQL: cannot create database {DATABASE}: {0}")]
    CreateDatabase(String),
    #[error("embedded PostgreSQL: the start-up task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why the configured database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    /// Connecting or migrating failed; the URL is shown redacted.
    #[error("database {url}: {source}")]
    Database {
        url: String,
        #[source]
        source: db::DbError,
    },
}

/// The server programs we drive, all from one installation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Binaries {
    initdb: PathBuf,
    pg_ctl: PathBuf,
}

/// The unprivileged account the cluster runs as when we are root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: Uid,
    gid: Gid,
}

/// A running private cluster; stops it on drop if this process started it
/// (or took it over).
#[derive(Debug)]
pub struct EmbeddedPostgres {
    /// `storage.data_dir`, absolute: holds the owner, lock and log files.
    storage_dir: PathBuf,
    /// PGDATA, also the socket directory.
    pgdata: PathBuf,
    bins: Binaries,
    run_as: Option<RunAs>,
    /// What it was started with, to restart it the same way.
    opts: EmbeddedOptions,
    /// Only the owner stops the cluster: the CLI must not stop a broker's.
    owned: bool,
    stopped: bool,
}

/// What [`EmbeddedPostgres::revive`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revived {
    /// It was down; this process started it and now owns it.
    Restarted,
    /// It is running again: another process restarted it first.
    AlreadyRunning,
    /// It is down, and its starter (this pid) is alive: restarting it is
    /// that process's job, as stopping it would be.
    LeftToOwner(u32),
}

impl EmbeddedPostgres {
    /// Blocking. Finds the server binaries, initdb on first use, starts it (or adopts a cluster
    /// already running on this data dir, e.g. left by a SIGKILLed broker), creates database "meshbroker" if missing.
    pub fn start(data_dir: &Path, opts: &EmbeddedOptions) -> Result<Self, EmbeddedError> {
        let bins = find_binaries()?;
        let run_as = run_as()?;
        let data_dir = prepare_data_dir(data_dir, run_as.is_some())?;
        if let Some(user) = run_as {
            check_traversable(&data_dir, user)?;
        }
        let pgdata = data_dir.join("pg");
        let socket = socket_path(&pgdata);
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(EmbeddedError::SocketPathTooLong { path: socket, len });
        }

        let _lock = lock_start(&data_dir)?;

        let mut pg = EmbeddedPostgres {
            storage_dir: data_dir,
            pgdata,
            bins,
            run_as,
            opts: opts.clone(),
            owned: false,
            stopped: false,
        };
        if !pg.pgdata.join("PG_VERSION").exists() {
            pg.initdb(opts)?;
        }
        if pg.is_running()? {
            let owner = read_pid(&pg.storage_dir.join(OWNER_FILE));
            if owner.is_some_and(|pid| pid == std::process::id() || process_exists(pid)) {
                tracing::info!(
                    "adopted running cluster in {} (its starter is still running and will stop it)",
                    pg.pgdata.display()
                );
            } else {
                pg.take_ownership()?;
                tracing::info!("adopted running cluster in {} (its starter is gone; this process will stop it)", pg.pgdata.display());
            }
        } else {
            pg.remove_stale_pid_file()?;
            pg.pg_start(opts)?;
            pg.take_ownership()?;
            tracing::info!("started embedded PostgreSQL in {}", pg.pgdata.display());
        }
        drop(_lock);
        // On error `pg` is dropped, which stops the cluster if we own it.
        pg.create_database()?;
        Ok(pg)
    }

    /// URL of database "meshbroker" over the Unix socket.
    pub fn url(&self) -> String {
        self.url_for(DATABASE)
    }

    pub fn url_for(&self, database: &str) -> String {
        socket_url(&self.pgdata, database)
    }

    /// The PGDATA dir (also the socket directory).
    pub fn data_dir(&self) -> &Path {
        &self.pgdata
    }

    /// The server's log file, `<storage.data_dir>/postgresql.log`.
    pub fn log_path(&self) -> PathBuf {
        self.storage_dir.join(LOG_FILE)
    }

    /// True while this process owns the cluster (and will stop it).
    pub fn is_owned(&self) -> bool {
        self.owned
    }

    /// Cheap enough to poll: is the postmaster named in `postmaster.pid`
    /// alive? (No pid file means a stopped cluster.)
    pub fn postmaster_alive(&self) -> bool {
        read_pid(&self.pgdata.join("postmaster.pid")).is_some_and(is_live_postgres)
    }

    /// Blocking. Brings a dead cluster back, under the start lock: restarts
    /// it (taking ownership) unless another process already did, or its
    /// starter is another process that is still alive (then it is left to
    /// that process, like stopping it). Keeps `owned` true to the owner file,
    /// so only the process that last started the cluster stops it.
    pub fn revive(&mut self) -> Result<Revived, EmbeddedError> {
        let _lock = lock_start(&self.storage_dir)?;
        let me = std::process::id();
        let owner = read_pid(&self.storage_dir.join(OWNER_FILE));
        if self.is_running()? {
            self.owned = owner == Some(me);
            return Ok(Revived::AlreadyRunning);
        }
        if let Some(pid) = owner.filter(|&pid| pid != me && process_exists(pid)) {
            self.owned = false;
            return Ok(Revived::LeftToOwner(pid));
        }
        self.remove_stale_pid_file()?;
        self.pg_start(&self.opts)?;
        self.take_ownership()?;
        self.stopped = false;
        Ok(Revived::Restarted)
    }

    /// The last `n` lines of the server's log, for the broker's own log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Spawns a detached watcher that stops this cluster (pg_ctl stop -m immediate) once the current process has exited. For test binaries, whose statics are never dropped.
    ///
    /// A no-op for an adopted cluster this process does not own. The
    /// watcher stands down if another process took the cluster over first.
    pub fn stop_when_process_exits(&self) -> Result<(), EmbeddedError> {
        if !self.owned || self.stopped {
            return Ok(());
        }
        // `kill -0` cannot probe a root process from the `postgres` user
        // (EPERM), so watch /proc instead. Paths are passed as positional
        // arguments to stay clear of shell quoting.
        let script = r#"
            while [ -d "/proc/$1" ]; do sleep 1; done
            stop() { [ "$(cat "$3" 2>/dev/null)" = "$1" ] && "$2" -D "$4" stop -m immediate >/dev/null 2>&1; }
            if command -v flock >/dev/null 2>&1; then
                exec 9<"$5" && flock 9
            fi
            stop "$@"
        "#;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg("meshbroker-pg-watcher")
            .arg(std::process::id().to_string())
            .arg(&self.bins.pg_ctl)
            .arg(self.storage_dir.join(OWNER_FILE))
            .arg(&self.pgdata)
            .arg(self.storage_dir.join(LOCK_FILE))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        self.as_server_user(&mut cmd);
        cmd.spawn()
            .map_err(|source| io_err("cannot spawn stop watcher", Path::new("sh"), source))?;
        Ok(())
    }

    /// pg_ctl stop -m fast -w; idempotent; also called from Drop. Leaves
    /// alone a cluster this process adopted but does not own.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if !self.owned {
            return;
        }
        let mut cmd = self.pg_ctl();
        cmd.args(["stop", "-m", "fast", "-w", "-t", "60"]);
        match run(cmd, "pg_ctl stop") {
            Ok(_) => tracing::info!("stopped embedded PostgreSQL in {}", self.pgdata.display()),
            Err(e) => tracing::warn!("{e}"),
        }
        let owner = self.storage_dir.join(OWNER_FILE);
        if read_pid(&owner) == Some(std::process::id()) {
            let _ = fs::remove_file(owner);
        }
    }

    fn initdb(&self, opts: &EmbeddedOptions) -> Result<(), EmbeddedError> {
        tracing::info!(
            "initializing embedded PostgreSQL in {} (first use; this takes a few seconds)",
            self.pgdata.display()
        );
        match fs::create_dir(&self.pgdata) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(io_err("cannot create", &self.pgdata, source)),
        }
        fs::set_permissions(&self.pgdata, fs::Permissions::from_mode(0o700))
            .map_err(|source| io_err("cannot set mode 0700 on", &self.pgdata, source))?;
        self.chown(&self.pgdata)?;
        let mut cmd = Command::new(&self.bins.initdb);
        cmd.arg("-D").arg(&self.pgdata).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if !opts.fsync {
            cmd.arg("--no-sync");
        }
        self.as_server_user(&mut cmd);
        run(cmd, "initdb")?;
        Ok(())
    }

    /// `pg_ctl status`: 0 running, 3 not running, 4 no usable data dir.
    fn is_running(&self) -> Result<bool, EmbeddedError> {
        let mut cmd = self.pg_ctl();
        cmd.arg("status");
        let out = output(cmd, "pg_ctl status")?;
        if out.status.success() {
            // pg_ctl trusts any live pid; after a reboot that pid may be some
            // other program, which postgres itself would also ignore.
            return Ok(read_pid(&self.pgdata.join("postmaster.pid")).is_none_or(is_live_postgres));
        }
        match out.status.code() {
            Some(3) => Ok(false),
            _ => Err(EmbeddedError::Command {
                what: "pg_ctl status",
                detail: last_line(&out),
            }),
        }
    }

    /// The lock files a killed cluster leaves (`postmaster.pid`, the
    /// socket's `.lock`) are normally handled by postgres, which refuses to
    /// start while their pid lives. It takes a zombie (a killed postmaster
    /// not yet reaped) or, after a reboot, another program for its old
    /// postmaster, so remove them here when their pid is certainly gone.
    /// Never while a process still works in PGDATA (backends orphaned by a
    /// killed postmaster do until they notice): postgres's own check that
    /// no one uses the old shared memory needs `postmaster.pid`.
    fn remove_stale_pid_file(&self) -> Result<(), EmbeddedError> {
        let files = [
            self.pgdata.join("postmaster.pid"),
            self.pgdata.join(format!(".s.PGSQL.{PORT}.lock")),
        ];
        let stale: Vec<(&PathBuf, u32)> = files
            .iter()
            .filter_map(|f| read_pid(f).map(|pid| (f, pid)))
            .filter(|(_, pid)| !is_live_postgres(*pid))
            .collect();
        if stale.is_empty() || self.orphans_alive() {
            return Ok(());
        }
        for (file, pid) in stale {
            tracing::warn!(pid, "removing stale {}", file.display());
            fs::remove_file(file).map_err(|source| io_err("cannot remove stale", file, source))?;
        }
        Ok(())
    }

    /// A live `postgres` process whose working directory is PGDATA (every
    /// server process chdirs there).
    fn orphans_alive(&self) -> bool {
        let Ok(procs) = fs::read_dir("/proc") else {
            return false;
        };
        procs.flatten().any(|entry| {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                return false;
            };
            is_live_postgres(pid)
                && fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd == self.pgdata)
        })
    }

    fn pg_start(&self, opts: &EmbeddedOptions) -> Result<(), EmbeddedError> {
        let log = self.storage_dir.join(LOG_FILE);
        // pg_ctl opens the log as the server user, which cannot create files
        // in a root-owned data_dir.
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|source| io_err("cannot open log file", &log, source))?;
        self.chown(&log)?;
        let mut cmd = self.pg_ctl();
        cmd.args(["-w", "-t", "60", "-l"])
            .arg(&log)
            .arg("-o")
            .arg(server_options(&self.pgdata, opts))
            .arg("start");
        let out = output(cmd, "pg_ctl start")?;
        if !out.status.success() {
            // Another process may have started it meanwhile without taking
            // our lock (a broker from an older build, a manual pg_ctl).
            if self.is_running().unwrap_or(false) {
                return Ok(());
            }
            let detail = last_log_line(&log).unwrap_or_else(|| last_line(&out));
            return Err(EmbeddedError::Start { detail, log });
        }
        Ok(())
    }

    fn take_ownership(&mut self) -> Result<(), EmbeddedError> {
        let owner = self.storage_dir.join(OWNER_FILE);
        fs::write(&owner, format!("{}\n", std::process::id()))
            .map_err(|source| io_err("cannot write", &owner, source))?;
        let _ = fs::set_permissions(&owner, fs::Permissions::from_mode(0o644));
        self.owned = true;
        Ok(())
    }

    /// `CREATE DATABASE meshbroker` unless it exists. A cluster just adopted
    /// may still be starting up, so connecting is retried for a while.
    fn create_database(&self) -> Result<(), EmbeddedError> {
        let url = self.url_for(SUPERUSER);
        // Our caller may be inside a runtime; a fresh thread may block_on.
        use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
        let task = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let mut attempt = 0;
                let mut conn = loop {
                    match AsyncPgConnection::establish(&url).await {
                        Ok(conn) => break conn,
                        Err(e) if attempt < 50 => {
                            attempt += 1;
                            tracing::debug!("waiting for the embedded PostgreSQL: {e}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(one_line(&e.to_string())),
                    }
                };
                match diesel::sql_query(format!("CREATE DATABASE {DATABASE}"))
                    .execute(&mut conn)
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(e) if e.to_string().contains("already exists") => Ok(()),
                    Err(e) => Err(one_line(&e.to_string())),
                }
            })
        });
        task.join()
            .map_err(|_| EmbeddedError::CreateDatabase("setup thread panicked".into()))?
            .map_err(EmbeddedError::CreateDatabase)
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = Command::new(&self.bins.pg_ctl);
        cmd.arg("-D").arg(&self.pgdata);
        self.as_server_user(&mut cmd);
        cmd
    }

    fn as_server_user(&self, cmd: &mut Command) {
        // A root cwd such as /root may be unreadable to the server user.
        cmd.current_dir("/");
        if let Some(user) = self.run_as {
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
    }

    fn chown(&self, path: &Path) -> Result<(), EmbeddedError> {
        if let Some(user) = self.run_as {
            std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .map_err(|source| io_err("cannot chown to postgres", path, source))?;
        }
        Ok(())
    }
}

/// A cluster of a unit test's own, in a temp dir, with fsync off.
#[cfg(test)]
pub(crate) struct Throwaway {
    /// Declared first: stopped before its directory is removed.
    pub pg: EmbeddedPostgres,
    /// Where its data directory lives (`data` inside it).
    pub root: tempfile::TempDir,
}

/// A temp dir a cluster running as `postgres` (when we are root) can reach.
#[cfg(test)]
pub(crate) fn searchable_tempdir() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).unwrap();
    root
}

#[cfg(test)]
impl Throwaway {
    /// Starts one; `None` (said on stderr) where no PostgreSQL is installed.
    pub(crate) fn start() -> Option<Throwaway> {
        let root = searchable_tempdir();
        match EmbeddedPostgres::start(&root.path().join("data"), &EmbeddedOptions { fsync: false })
        {
            Ok(pg) => Some(Throwaway { pg, root }),
            Err(EmbeddedError::NoInstallation) => {
                eprintln!("skipped: {NO_INSTALLATION}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// Runs `fut` to completion on a runtime of its own.
    pub(crate) fn block_on<T>(&self, fut: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(fut)
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Resolves the database URL: `database.url` if set, else the embedded
/// cluster under `storage.data_dir` (started or adopted).
pub async fn resolve(config: &Config) -> Result<(String, Option<EmbeddedPostgres>), EmbeddedError> {
    if let Some(url) = &config.database.url {
        return Ok((url.clone(), None));
    }
    let dir = config.storage.data_dir.clone();
    let pg = tokio::task::spawn_blocking(move || {
        EmbeddedPostgres::start(&dir, &EmbeddedOptions::default())
    })
    .await??;
    Ok((pg.url(), Some(pg)))
}

/// Opens the configured database (embedded when `database.url` is unset),
/// runs pending migrations and builds the pool. Keep the returned cluster
/// alive as long as the pool: dropping it stops a cluster this process owns.
pub async fn open(config: &Config) -> Result<(Pool, Option<EmbeddedPostgres>), OpenError> {
    let (url, embedded) = resolve(config).await?;
    let failed = |source| OpenError::Database {
        url: redact_url(&url),
        source,
    };
    let ran = db::migrate(&url).await.map_err(failed)?;
    if ran > 0 {
        tracing::info!(count = ran, "applied database migrations");
    }
    let pool = db::connect(&url, config.database.pool_size)
        .await
        .map_err(failed)?;
    Ok((pool, embedded))
}

fn find_binaries() -> Result<Binaries, EmbeddedError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut candidates: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Some(dir) = pg_config_bindir() {
        candidates.push(dir);
    }
    candidates.extend(debian_bindirs(Path::new("/usr/lib/postgresql")));
    candidates
        .iter()
        .find_map(|dir| binaries_in(dir))
        .ok_or(EmbeddedError::NoInstallation)
}

/// initdb and pg_ctl from one directory, with `postgres` beside them (a
/// PATH holding only client tools does not count). Symlinks are resolved so
/// pg_ctl finds the matching `postgres` next to its real location.
fn binaries_in(dir: &Path) -> Option<Binaries> {
    let found = |name: &str| {
        let path = dir.join(name);
        is_executable(&path).then(|| fs::canonicalize(&path).unwrap_or(path))
    };
    let initdb = found("initdb")?;
    let pg_ctl = found("pg_ctl")?;
    found("postgres")?;
    Some(Binaries { initdb, pg_ctl })
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    let dir = dir.trim();
    (out.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Debian's `/usr/lib/postgresql/<major>/bin`, highest major first.
fn debian_bindirs(root: &Path) -> Vec<PathBuf> {
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

fn run_as() -> Result<Option<RunAs>, EmbeddedError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match nix::unistd::User::from_name(SUPERUSER) {
        Ok(Some(user)) => Ok(Some(RunAs {
            uid: user.uid,
            gid: user.gid,
        })),
        _ => Err(EmbeddedError::NoPostgresUser),
    }
}

/// Creates `data_dir` if missing and returns it absolute. One we create
/// gets mode 0755 when running as root, so the server user can reach PGDATA.
fn prepare_data_dir(data_dir: &Path, as_root: bool) -> Result<PathBuf, EmbeddedError> {
    let fail = |source| EmbeddedError::DataDir {
        path: data_dir.to_owned(),
        source,
    };
    let existed = data_dir.is_dir();
    fs::create_dir_all(data_dir).map_err(fail)?;
    if !existed && as_root {
        fs::set_permissions(data_dir, fs::Permissions::from_mode(0o755)).map_err(fail)?;
    }
    fs::canonicalize(data_dir).map_err(fail)
}

/// Fails on the first directory from `/` down to `dir` that `user` cannot
/// search.
fn check_traversable(dir: &Path, user: RunAs) -> Result<(), EmbeddedError> {
    let groups = nix::unistd::User::from_uid(user.uid)
        .ok()
        .flatten()
        .and_then(|u| {
            let name = std::ffi::CString::new(u.name).ok()?;
            nix::unistd::getgrouplist(&name, user.gid).ok()
        })
        .unwrap_or_else(|| vec![user.gid]);
    let mut ancestors: Vec<&Path> = dir.ancestors().collect();
    ancestors.reverse();
    for path in ancestors {
        let meta = fs::metadata(path).map_err(|source| io_err("cannot inspect", path, source))?;
        let mode = meta.mode();
        let ok = if meta.uid() == user.uid.as_raw() {
            mode & 0o100 != 0
        } else if groups.iter().any(|g| g.as_raw() == meta.gid()) {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            return Err(EmbeddedError::NotTraversable {
                path: path.to_owned(),
            });
        }
    }
    Ok(())
}

/// Takes the lock that serializes starting the cluster across processes.
fn lock_start(storage_dir: &Path) -> Result<Flock<fs::File>, EmbeddedError> {
    let lock_path = storage_dir.join(LOCK_FILE);
    let lock_file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| io_err("cannot open lock file", &lock_path, source))?;
    // Readable by the watcher, which takes the same lock as `postgres`.
    let _ = fs::set_permissions(&lock_path, fs::Permissions::from_mode(0o644));
    Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| io_err("cannot lock", &lock_path, io::Error::from(errno)))
}

fn socket_path(pgdata: &Path) -> PathBuf {
    pgdata.join(format!(".s.PGSQL.{PORT}"))
}

/// `postgresql://postgres@/DB?host=/SOCKET/DIR`: the empty URL host matters,
/// as tokio-postgres would try a named host (e.g. localhost over TCP) first.
fn socket_url(socket_dir: &Path, database: &str) -> String {
    format!(
        "postgresql://{SUPERUSER}@/{}?host={}&port={PORT}",
        percent_encode(database.as_bytes(), false),
        percent_encode(socket_dir.as_os_str().as_encoded_bytes(), true)
    )
}

fn percent_encode(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `-o` string pg_ctl hands to the server through a shell.
fn server_options(pgdata: &Path, opts: &EmbeddedOptions) -> String {
    let mut o = format!(
        "-k {} -c listen_addresses='' -c port={PORT}",
        shell_quote(pgdata.as_os_str())
    );
    if !opts.fsync {
        o.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
    }
    o.push_str(" -c max_connections=200");
    o
}

fn shell_quote(s: &OsStr) -> String {
    format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"))
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Alive as far as `kill(pid, 0)` can tell (EPERM means it exists), and
/// not a zombie: a killed postmaster is reparented to init, which may be
/// slow to reap it (or, in a container, never do so), and a zombie still
/// answers `kill(pid, 0)`.
fn process_exists(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    let exists = match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Ok(()) => true,
        Err(e) => e == nix::errno::Errno::EPERM,
    };
    exists && !is_zombie(pid)
}

/// `/proc/<pid>/stat`'s state field (after the parenthesized command name,
/// which may itself hold spaces or parentheses) is `Z`.
fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

fn is_live_postgres(pid: u32) -> bool {
    process_exists(pid) && is_postgres(pid)
}

/// False only when /proc shows `pid` running some other program.
fn is_postgres(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => comm.trim().starts_with("postgres"),
        Err(_) => process_exists(pid),
    }
}

fn output(mut cmd: Command, what: &'static str) -> Result<Output, EmbeddedError> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|e| EmbeddedError::Command {
            what,
            detail: e.to_string(),
        })
}

fn run(cmd: Command, what: &'static str) -> Result<Output, EmbeddedError> {
    let out = output(cmd, what)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(EmbeddedError::Command {
            what,
            detail: last_line(&out),
        })
    }
}

/// The most telling line of a failed command: its last stderr line.
fn last_line(out: &Output) -> String {
    let pick = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .map(str::to_owned)
    };
    pick(&out.stderr)
        .or_else(|| pick(&out.stdout))
        .unwrap_or_else(|| format!("exited with {}", out.status))
}

/// The last FATAL/ERROR line the server logged, else its last line.
fn last_log_line(log: &Path) -> Option<String> {
    let text = fs::read_to_string(log).ok()?;
    let lines: Vec<&str> = text.lines().rev().take(50).collect();
    lines
        .iter()
        .find(|l| l.contains("FATAL") || l.contains("ERROR"))
        .or_else(|| <[&str]>::first(&lines))
        .map(|l| l.trim().to_owned())
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn io_err(what: &'static str, path: &Path, source: io::Error) -> EmbeddedError {
    EmbeddedError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel_async::RunQueryDsl;

    #[test]
    fn url_names_the_socket_directory_and_no_tcp_host() {
        let url = socket_url(Path::new("/srv/mesh broker/pg"), "meshbroker");
        assert_eq!(
            url,
            "postgresql://postgres@/meshbroker?host=/srv/mesh%20broker/pg&port=5432"
        );
        assert_eq!(redact_url(&url), url);
    }

    #[test]
    fn options_quote_the_socket_dir_and_relax_durability_only_without_fsync() {
        let safe = server_options(Path::new("/d/it's"), &EmbeddedOptions::default());
        assert!(
            safe.starts_with(r"-k '/d/it'\''s' -c listen_addresses=''"),
            "{safe}"
        );
        assert!(!safe.contains("fsync=off"));
        let fast = server_options(Path::new("/d"), &EmbeddedOptions { fsync: false });
        assert!(fast.contains("-c fsync=off -c synchronous_commit=off -c full_page_writes=off"));
        assert!(fast.ends_with("-c max_connections=200"));
    }

    #[test]
    fn debian_layout_prefers_the_highest_major() {
        let root = tempfile::tempdir().unwrap();
        for v in ["9.6", "13", "16", "notaversion"] {
            fs::create_dir_all(root.path().join(v).join("bin")).unwrap();
        }
        let dirs = debian_bindirs(root.path());
        let names: Vec<_> = dirs
            .iter()
            .map(|d| d.parent().unwrap().file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["16", "13", "9.6"]);
    }

    #[test]
    fn a_bindir_needs_all_three_programs() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["initdb", "pg_ctl"] {
            let p = dir.path().join(name);
            fs::write(&p, "#!/bin/sh\n").unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        assert_eq!(binaries_in(dir.path()), None);
        let p = dir.path().join("postgres");
        fs::write(&p, "").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(binaries_in(dir.path()).is_some());
    }

    #[test]
    fn long_socket_path_is_refused_before_anything_runs() {
        if find_binaries().is_err() {
            return;
        }
        let root = searchable_tempdir();
        let deep = root.path().join("d".repeat(100));
        let err = EmbeddedPostgres::start(&deep, &EmbeddedOptions::default()).unwrap_err();
        assert!(
            matches!(err, EmbeddedError::SocketPathTooLong { .. }),
            "{err}"
        );
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn unreachable_data_dir_is_named_when_root() {
        if run_as().ok().flatten().is_none() || find_binaries().is_err() {
            return;
        }
        let root = tempfile::tempdir().unwrap();
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let err = EmbeddedPostgres::start(&root.path().join("data"), &EmbeddedOptions::default())
            .unwrap_err();
        assert!(matches!(err, EmbeddedError::NotTraversable { .. }), "{err}");
        assert!(err.to_string().contains(&root.path().display().to_string()));
    }

    #[test]
    fn a_zombie_is_not_a_live_process() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        assert!(process_exists(pid) && !is_zombie(pid));
        child.kill().unwrap();
        // Not reaped yet: a zombie until `wait`.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !is_zombie(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "{pid} never became a zombie"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !process_exists(pid),
            "a zombie answers kill(pid, 0) but is dead"
        );
        child.wait().unwrap();
    }

    /// Really kills a cluster's postmaster: revive leaves it to a live
    /// starter, and restarts it (taking ownership) once that one is gone.
    #[test]
    fn revive_restarts_a_killed_cluster_unless_its_live_starter_will() {
        if find_binaries().is_err() {
            eprintln!("skipped: {NO_INSTALLATION}");
            return;
        }
        let root = searchable_tempdir();
        let dir = root.path().join("data");
        let mut pg = EmbeddedPostgres::start(&dir, &EmbeddedOptions { fsync: false }).unwrap();
        assert!(pg.postmaster_alive());
        assert_eq!(pg.revive().unwrap(), Revived::AlreadyRunning);
        assert!(pg.owned);

        let postmaster = read_pid(&pg.data_dir().join("postmaster.pid")).unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(postmaster as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pg.postmaster_alive() {
            assert!(
                std::time::Instant::now() < deadline,
                "the postmaster outlived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        // Another process, alive, claims to have started it.
        let mut starter = Command::new("sleep").arg("60").spawn().unwrap();
        let owner_file = pg.storage_dir.join(OWNER_FILE);
        fs::write(&owner_file, format!("{}\n", starter.id())).unwrap();
        assert_eq!(pg.revive().unwrap(), Revived::LeftToOwner(starter.id()));
        assert!(!pg.owned && !pg.postmaster_alive());
        starter.kill().unwrap();
        starter.wait().unwrap();

        // Backends orphaned by the kill may hold its shared memory a moment.
        let revived = loop {
            match pg.revive() {
                Ok(r) => break r,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("revive, retrying: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(revived, Revived::Restarted);
        assert!(pg.owned && pg.postmaster_alive());
        assert_eq!(read_pid(&owner_file), Some(std::process::id()));
        assert!(
            pg.log_tail(50).contains("database system was interrupted"),
            "{}",
            pg.log_tail(50)
        );
        pg.stop();
        assert!(!pg.postmaster_alive(), "the new owner stops it");
    }

    /// Really starts a cluster: initdb, start, adopt, connect, stop, restart.
    #[test]
    fn starts_adopts_and_stops_a_cluster() {
        if find_binaries().is_err() {
            eprintln!("skipped: {NO_INSTALLATION}");
            return;
        }
        let root = searchable_tempdir();
        let dir = root.path().join("data");
        let fast = EmbeddedOptions { fsync: false };

        let mut first = EmbeddedPostgres::start(&dir, &fast).unwrap();
        assert!(first.owned);
        assert_eq!(first.data_dir(), fs::canonicalize(&dir).unwrap().join("pg"));
        let url = first.url();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let query = |url: String| {
            rt.block_on(async move {
                use diesel_async::{AsyncConnection, AsyncPgConnection};
                let mut conn = AsyncPgConnection::establish(&url).await?;
                diesel::sql_query("SELECT 1").execute(&mut conn).await?;
                anyhow::Ok(())
            })
        };
        query(url.clone()).unwrap();

        // Nothing but the Unix socket in PGDATA, and PGDATA private.
        let settings = rt
            .block_on(async {
                use diesel_async::{AsyncConnection, AsyncPgConnection};
                #[derive(diesel::QueryableByName)]
                struct Settings {
                    #[diesel(sql_type = diesel::sql_types::Text)]
                    listen: String,
                    #[diesel(sql_type = diesel::sql_types::Text)]
                    sockets: String,
                    #[diesel(sql_type = diesel::sql_types::Bool)]
                    over_tcp: bool,
                }
                let mut conn = AsyncPgConnection::establish(&url).await?;
                let s: Settings = diesel::sql_query(
                    "SELECT current_setting('listen_addresses') AS listen,
                            current_setting('unix_socket_directories') AS sockets,
                            inet_server_addr() IS NOT NULL AS over_tcp",
                )
                .get_result(&mut conn)
                .await?;
                anyhow::Ok(s)
            })
            .unwrap();
        assert_eq!(
            settings.listen, "",
            "listen_addresses must be empty: no TCP port"
        );
        assert!(
            !settings.over_tcp,
            "the broker's connection must use the socket"
        );
        assert_eq!(
            Path::new(&settings.sockets),
            first.data_dir(),
            "the socket lives in PGDATA"
        );
        let mode = fs::metadata(first.data_dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "PGDATA mode {mode:o}");

        // Same process, so its starter (us) is "alive": adopted, not owned.
        let mut second = EmbeddedPostgres::start(&dir, &fast).unwrap();
        assert!(!second.owned);
        second.stop();
        query(url.clone()).expect("adopter must not stop the cluster");

        first.stop();
        first.stop();
        assert!(query(url.clone()).is_err(), "cluster should be stopped");

        // A killed cluster's leftover pid file does not block a restart.
        let pid_file = first.data_dir().join("postmaster.pid");
        fs::write(&pid_file, "999999999\n").unwrap();
        let third = EmbeddedPostgres::start(&dir, &fast).unwrap();
        assert!(third.owned);
        query(third.url()).unwrap();
        drop(third);
        assert!(query(url).is_err(), "drop should stop the cluster");
    }
}
