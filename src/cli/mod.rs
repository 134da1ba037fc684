//! The `meshbroker` command line: `serve`, `migrate`, the admin commands,
//! `print-config`, `client listen|send` (in `client_cmd`) and `bench`.
//!
//! Every failure ends as one line on stderr, `meshbroker: error: …`, and a
//! non-zero exit code.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use clap::{Args, Parser, Subcommand};
use diesel_async::{AsyncConnection, SimpleAsyncConnection};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

use crate::config::{redact_url, Config, Dur, LogFormat};
use crate::db::embedded::{self, EmbeddedPostgres};
use crate::db::supervisor::Supervisor;
use crate::ids::MeshId;
use crate::{admin, db, dead_letters};

mod client_cmd;

use client_cmd::ClientCommand;

/// Where `--config` points when neither the flag nor the variable is given.
pub const DEFAULT_CONFIG: &str = "config/meshbroker.toml";

#[derive(Debug, Parser)]
#[command(
    name = "meshbroker",
    version,
    about = "A message broker for meshes of AI agent sessions"
)]
struct Cli {
    /// Configuration file [default: config/meshbroker.toml; missing means defaults]
    #[arg(long, global = true, value_name = "PATH", env = "MESHBROKER_CONFIG")]
    config: Option<PathBuf>,
    /// Admin and client commands log warnings and errors only, so that
    /// their output is only the result: -v logs as `log.level` says,
    /// -vv at debug.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker until SIGTERM or SIGINT.
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Manage meshes.
    #[command(subcommand)]
    Mesh(MeshCommand),
    /// Manage a mesh's members.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Inspect, requeue or purge deliveries dead-lettered after max_attempts.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// The cluster as the database shows it (no broker needed): nodes,
    /// connections by mesh and role, the queue, dead letters.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Print the effective configuration (secrets redacted).
    PrintConfig,
    /// Talk to a running broker as a member.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Load a broker (by default one of its own, with a private PostgreSQL)
    /// and report throughput, latency, loss and resource use.
    Bench(crate::bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum MeshCommand {
    /// Create a mesh and print its id.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum MemberCommand {
    /// Add a member; without --pubkey a key pair is generated and its secret
    /// key printed once.
    Add {
        #[arg(long, value_name = "MESH_ID")]
        mesh: String,
        #[arg(long)]
        name: String,
        /// The member's ed25519 public key, 64 hex chars.
        #[arg(long, value_name = "HEX")]
        pubkey: Option<String>,
        /// May use the admin frames.
        #[arg(long)]
        admin: bool,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a member's key.
    Revoke {
        #[arg(long, value_name = "MESH_ID")]
        mesh: String,
        #[arg(long, value_name = "HEX")]
        pubkey: String,
        #[arg(long)]
        json: bool,
    },
    /// List a mesh's members, revoked ones included.
    List {
        #[arg(long, value_name = "MESH_ID")]
        mesh: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DeadLetterCommand {
    /// List a mesh's dead letters, oldest first.
    List {
        #[arg(long, value_name = "MESH_ID")]
        mesh: String,
        /// Show at most this many.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Make dead letters eligible for delivery again (attempts start over);
    /// a running broker pushes them to a connected recipient within janitor.interval.
    Requeue {
        #[command(flatten)]
        select: DeadLetterSelect,
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters (and their messages once nothing else refers to them).
    Purge {
        #[command(flatten)]
        select: DeadLetterSelect,
        #[arg(long)]
        json: bool,
    },
}

/// Which dead letters a requeue or purge touches: at least one of
/// `--id`, `--older-than` or `--all`.
#[derive(Debug, Args)]
struct DeadLetterSelect {
    #[arg(long, value_name = "MESH_ID")]
    mesh: String,
    /// Only this dead letter (its id from `dead-letters list`); repeatable.
    #[arg(long = "id", value_name = "ID")]
    ids: Vec<i64>,
    /// Only those dead-lettered longer ago than this ("30s", "10m", "7d").
    #[arg(long, value_name = "DURATION")]
    older_than: Option<Dur>,
    /// Every dead letter of the mesh (with --older-than: every older one).
    #[arg(long)]
    all: bool,
}

/// Runs the command line; the whole of `main`.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshbroker: error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    let rendered = e.render().to_string();
    let first = rendered.lines().next().unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    eprintln!("meshbroker: error: {first} (see meshbroker --help)");
    ExitCode::from(2)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let (path, explicit) = match &cli.config {
        Some(path) => (path.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let mut config = Config::load(&path, explicit)?;
    if let Command::PrintConfig = cli.command {
        print!("{}", config.to_redacted_toml());
        return Ok(());
    }
    // Only `serve` is a service whose log is its output; every other
    // command prints a result (a script reads it), and the bench's report
    // and progress line own the terminal: they log only trouble unless
    // asked.
    if !matches!(cli.command, Command::Serve) {
        match cli.verbose {
            0 => config.log.level = "warn".into(),
            1 => {}
            _ => config.log.level = "debug".into(),
        }
    }
    init_logging(&config);
    actix_web::rt::System::new().block_on(async move {
        match cli.command {
            Command::Serve => serve(config, ConfigFile { path, explicit }).await,
            Command::Migrate => migrate(&config).await,
            Command::Mesh(cmd) => mesh_command(&config, cmd).await,
            Command::Member(cmd) => member_command(&config, cmd).await,
            Command::DeadLetters(cmd) => dead_letter_command(&config, cmd).await,
            Command::Status { json } => {
                let (mut conn, _embedded) = admin_connection(&config).await?;
                let status = crate::status::read(&mut conn).await?;
                if json {
                    print_json(&status)
                } else {
                    println!("{status}");
                    Ok(())
                }
            }
            Command::Client(cmd) => client_cmd::client_command(&config, cmd).await,
            Command::Bench(args) => crate::bench::run(args).await,
            Command::PrintConfig => unreachable!("handled above"),
        }
    })
}

/// Sets the log filter of a running process (`log.level` on SIGHUP); set
/// once logging is up.
type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
static SET_LOG_LEVEL: std::sync::OnceLock<SetLogLevel> = std::sync::OnceLock::new();

/// Logs go to stderr so `--json` output on stdout stays clean.
fn init_logging(config: &Config) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(&config.log.level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // The filter is the last layer set, so that its reload handle names the
    // formatter that is installed.
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder.with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() {
                let _ = SET_LOG_LEVEL.set(Box::new(move |level| {
                    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
                    handle.reload(filter).map_err(|e| e.to_string())
                }));
            }
        }};
    }
    match config.log.format {
        LogFormat::Json => install!(builder.json()),
        LogFormat::Text => install!(builder),
    }
}

fn set_log_level(level: &str) -> Result<(), String> {
    match SET_LOG_LEVEL.get() {
        Some(set) => set(level),
        None => Err("logging was set up elsewhere".into()),
    }
}

/// Every WebSocket holds a descriptor: a soft limit of 1,024 would refuse
/// connections long before the hard limit does.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Where the configuration came from: SIGHUP reads it again.
struct ConfigFile {
    path: PathBuf,
    /// Named on the command line: a missing file is an error, not the
    /// defaults.
    explicit: bool,
}

async fn serve(config: Config, file: ConfigFile) -> anyhow::Result<()> {
    raise_fd_limit();
    // Bind first: a taken port should fail before a cluster is started.
    let listener = bind(config.server.listen)?;
    // So is a certificate that does not load (the broker loads it again).
    if let Some(tls) = &config.server.tls {
        crate::tls::load(tls)?;
    }
    let shutdown = shutdown_signal()?;
    // Installed before anything slow: SIGUSR1's default action is to kill.
    let mut drill =
        signal(SignalKind::user_defined1()).context("cannot install SIGUSR1 handler")?;
    // SIGHUP's default action is to kill, and `systemctl reload` sends it.
    let mut hangup = signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?;
    let (pool, mut embedded) = embedded::open(&config).await?;
    tracing::info!(listen = %config.server.listen, "meshbroker listening");
    let result = async {
        let mut running = config.clone();
        let broker = crate::broker::start(Arc::new(config), pool, listener).await?;
        // The cluster this broker runs on is kept alive while it serves.
        let supervisor = embedded.take().map(|pg| {
            let metrics = broker.metrics().clone();
            Supervisor::start(pg, move || metrics.embedded_postgres_restarted())
        });
        // Migrations ran and the listener is up (systemd Type=notify).
        crate::sd_notify::notify("READY=1");
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(()) = drill.recv() => {
                    tracing::warn!("SIGUSR1: fault drill, the next sweeper pass fails");
                    broker.inject_sweeper_failure();
                }
                Some(()) = hangup.recv() => reload(&broker, &mut running, &file),
            }
        }
        crate::sd_notify::notify("STOPPING=1");
        broker.shutdown().await;
        if let Some(supervisor) = supervisor {
            embedded = Some(supervisor.stop().await);
        }
        anyhow::Ok(())
    }
    .await;
    if let Some(pg) = embedded.as_mut() {
        pg.stop();
    }
    result
}

/// SIGHUP: reads the configuration file again and applies what can change
/// while serving (see `reload::plan`), certificates included. A file that
/// does not load, or certificates that do not, change nothing.
fn reload(broker: &crate::broker::Broker, running: &mut Config, file: &ConfigFile) {
    let shown = file.path.display();
    let refused = |why: &dyn std::fmt::Display| {
        tracing::error!("SIGHUP: configuration not reloaded, nothing changed: {why}");
    };
    let fresh = match Config::load(&file.path, file.explicit) {
        Ok(fresh) => fresh,
        Err(e) => return refused(&e),
    };
    let plan = crate::reload::plan(running, &fresh);
    if let Err(e) = broker.reconfigure(plan.effective.clone()) {
        return refused(&e);
    }
    if plan.effective.log.level != running.log.level {
        if let Err(e) = set_log_level(&plan.effective.log.level) {
            tracing::error!("SIGHUP: log.level not changed: {e}");
        }
    }
    *running = plan.effective;
    if !plan.need_restart.is_empty() {
        tracing::warn!(
            "SIGHUP: {} changed in {shown} but only take effect after a restart; kept as they were",
            plan.need_restart.join(", ")
        );
    }
    let certs = if running.server.tls.is_some() {
        "; TLS certificate re-read"
    } else {
        ""
    };
    if plan.applied.is_empty() {
        tracing::info!(
            "SIGHUP: configuration reloaded from {shown}, no reloadable key changed{certs}"
        );
    } else {
        let applied: Vec<String> = plan.applied.iter().map(ToString::to_string).collect();
        tracing::info!(
            "SIGHUP: configuration reloaded from {shown}: {}{certs}",
            applied.join(", ")
        );
    }
}

fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| {
        let reason = match e.kind() {
            std::io::ErrorKind::AddrInUse => "address in use".to_owned(),
            std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
            std::io::ErrorKind::AddrNotAvailable => "address not available on this host".to_owned(),
            _ => e.to_string(),
        };
        anyhow!("cannot listen on {addr}: {reason} (set server.listen)")
    })
}

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed
/// now, so a signal during startup is not lost.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name} received, shutting down");
    })
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    let (url, _embedded) = embedded::resolve(config).await?;
    let ran = db::migrate(&url)
        .await
        .map_err(|e| anyhow!("database {}: {e}", redact_url(&url)))?;
    println!("applied {ran} migration{}", if ran == 1 { "" } else { "s" });
    Ok(())
}

/// One connection to the configured database, migrated. Keep the cluster
/// handle alive while the connection is used.
async fn admin_connection(
    config: &Config,
) -> anyhow::Result<(db::PgConn, Option<EmbeddedPostgres>)> {
    let (url, embedded) = embedded::resolve(config).await?;
    let redacted = redact_url(&url);
    db::migrate(&url)
        .await
        .map_err(|e| anyhow!("database {redacted}: {e}"))?;
    let connect = async {
        let mut conn = db::PgConn::establish(&url).await?;
        // Tells operator sessions apart from the broker's in pg_stat_activity.
        conn.batch_execute("SET application_name = 'meshbroker-cli'")
            .await?;
        anyhow::Ok(conn)
    };
    let conn = connect
        .await
        .map_err(|e| anyhow!("cannot connect to database {redacted}: {e}"))?;
    Ok((conn, embedded))
}

fn parse_mesh_id(s: &str) -> anyhow::Result<MeshId> {
    s.trim().parse().map_err(|_| {
        anyhow!("--mesh {s:?} is not a mesh id (a UUID, as printed by `meshbroker mesh create`)")
    })
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

async fn mesh_command(config: &Config, cmd: MeshCommand) -> anyhow::Result<()> {
    match cmd {
        MeshCommand::Create { name, json } => {
            let (mut conn, _embedded) = admin_connection(config).await?;
            let mesh = admin::create_mesh(&mut conn, &name).await?;
            if json {
                print_json(&mesh)?;
            } else {
                println!("created mesh {:?}: {}", mesh.name, mesh.id);
            }
        }
    }
    Ok(())
}

async fn member_command(config: &Config, cmd: MemberCommand) -> anyhow::Result<()> {
    match cmd {
        MemberCommand::Add {
            mesh,
            name,
            pubkey,
            admin: is_admin,
            json,
        } => {
            let mesh_id = parse_mesh_id(&mesh)?;
            if let Some(key) = &pubkey {
                admin::normalize_pubkey(key).map_err(|e| anyhow!("--pubkey: {e}"))?;
            }
            let (mut conn, _embedded) = admin_connection(config).await?;
            let m =
                admin::add_member(&mut conn, mesh_id, &name, pubkey.as_deref(), is_admin).await?;
            if json {
                print_json(&m)?;
            } else {
                println!("added member {:?} to mesh {}", m.name, m.mesh_id);
                println!("member id:  {}", m.id);
                println!("pubkey:     {}", m.pubkey);
                println!("admin:      {}", if m.admin { "yes" } else { "no" });
                if let Some(secret) = &m.secret_key {
                    println!("secret key: {secret}");
                    eprintln!("warning: the secret key is shown only this once and is not stored by the broker; keep it safe");
                }
            }
        }
        MemberCommand::Revoke { mesh, pubkey, json } => {
            let mesh_id = parse_mesh_id(&mesh)?;
            let (mut conn, _embedded) = admin_connection(config).await?;
            let m = admin::revoke_member(&mut conn, mesh_id, &pubkey).await?;
            if json {
                print_json(&m)?;
            } else {
                let at = m.revoked_at.map(|t| t.to_rfc3339()).unwrap_or_default();
                println!(
                    "revoked member {:?} ({}) in mesh {} at {at}",
                    m.name, m.pubkey, m.mesh_id
                );
            }
        }
        MemberCommand::List { mesh, json } => {
            let mesh_id = parse_mesh_id(&mesh)?;
            let (mut conn, _embedded) = admin_connection(config).await?;
            let members = admin::list_members(&mut conn, mesh_id).await?;
            if json {
                print_json(&members)?;
            } else if members.is_empty() {
                println!("mesh {mesh_id} has no members");
            } else {
                println!(
                    "{:<36}  {:<64}  {:<5}  {:<8}  NAME",
                    "ID", "PUBKEY", "ADMIN", "STATUS"
                );
                for m in &members {
                    let status = if m.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    };
                    let admin = if m.admin { "yes" } else { "no" };
                    println!(
                        "{:<36}  {:<64}  {admin:<5}  {status:<8}  {}",
                        m.id, m.pubkey, m.name
                    );
                }
            }
        }
    }
    Ok(())
}

async fn dead_letter_command(config: &Config, cmd: DeadLetterCommand) -> anyhow::Result<()> {
    match cmd {
        DeadLetterCommand::List { mesh, limit, json } => {
            let mesh_id = parse_mesh_id(&mesh)?;
            let (mut conn, _embedded) = admin_connection(config).await?;
            let dead = dead_letters::list(&mut conn, mesh_id, limit.into()).await?;
            if json {
                print_json(&dead)?;
            } else if dead.is_empty() {
                println!("mesh {mesh_id} has no dead letters");
            } else {
                println!(
                    "{:<10}  {:<36}  {:<20}  {:>8}  {:<25}  REASON",
                    "ID", "MESSAGE", "RECIPIENT", "ATTEMPTS", "DEAD AT"
                );
                for d in &dead {
                    println!(
                        "{:<10}  {:<36}  {:<20}  {:>8}  {:<25}  {}",
                        d.id,
                        d.message_id,
                        d.recipient_name,
                        d.attempts,
                        d.dead_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        d.dead_reason
                    );
                }
            }
        }
        DeadLetterCommand::Requeue { select, json } => {
            let (mesh_id, selection) = dead_letter_selection(select)?;
            let (mut conn, _embedded) = admin_connection(config).await?;
            let done = dead_letters::requeue(&mut conn, mesh_id, &selection).await?;
            if json {
                print_json(&done)?;
            } else {
                println!(
                    "requeued {} dead letter(s) in mesh {mesh_id}",
                    done.requeued
                );
            }
        }
        DeadLetterCommand::Purge { select, json } => {
            let (mesh_id, selection) = dead_letter_selection(select)?;
            let (mut conn, _embedded) = admin_connection(config).await?;
            let done = dead_letters::purge(&mut conn, mesh_id, &selection).await?;
            if json {
                print_json(&done)?;
            } else {
                println!(
                    "purged {} dead letter(s) and {} message(s) in mesh {mesh_id}",
                    done.purged, done.messages_deleted
                );
            }
        }
    }
    Ok(())
}

fn dead_letter_selection(
    select: DeadLetterSelect,
) -> anyhow::Result<(MeshId, dead_letters::Selection)> {
    let mesh_id = parse_mesh_id(&select.mesh)?;
    if select.ids.is_empty() && select.older_than.is_none() && !select.all {
        return Err(anyhow!(
            "say which dead letters: --id ID (repeatable), --older-than DURATION or --all"
        ));
    }
    if select.all && !select.ids.is_empty() {
        return Err(anyhow!("--all and --id exclude each other"));
    }
    Ok((
        mesh_id,
        dead_letters::Selection {
            ids: select.ids,
            older_than: select.older_than.map(Dur::get),
        },
    ))
}

/// The error and its causes on one line, skipping a cause the message
/// already quotes (thiserror messages often embed their source).
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    one_line(&line)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn shipped_config_parses_to_the_defaults() {
        let mut shipped = Config::load(Path::new(DEFAULT_CONFIG), true).unwrap();
        // MESHBROKER_DATABASE_URL may be set in the environment of the tests.
        shipped.database.url = None;
        let default = Config::default();
        assert_eq!(shipped.server.listen, default.server.listen);
        assert_eq!(shipped.database.url, None);
        assert_eq!(shipped.database.pool_size, default.database.pool_size);
        assert_eq!(shipped.storage.data_dir, default.storage.data_dir);
        assert_eq!(shipped.delivery.lease, default.delivery.lease);
        assert_eq!(shipped.delivery.message_ttl, default.delivery.message_ttl);
        assert_eq!(shipped.presence.grace, default.presence.grace);
        assert_eq!(
            shipped.limits.max_frame_bytes,
            default.limits.max_frame_bytes
        );
        assert_eq!(shipped.limits.hello_timeout, default.limits.hello_timeout);
        assert_eq!(shipped.log.level, default.log.level);
        assert_eq!(shipped.log.format, default.log.format);
        // Every key is spelled out, so the file and the defaults agree fully.
        assert_eq!(shipped.to_redacted_toml(), default.to_redacted_toml());
    }

    #[test]
    fn commands_parse() {
        Cli::command_for_tests().debug_assert();
        let cli = Cli::try_parse_from([
            "meshbroker",
            "member",
            "add",
            "--mesh",
            "m",
            "--name",
            "a",
            "--admin",
            "--json",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Member(MemberCommand::Add {
                admin: true,
                json: true,
                ..
            })
        ));
        let cli = Cli::try_parse_from([
            "meshbroker",
            "client",
            "send",
            "--mesh",
            "m",
            "--member-id",
            "x",
            "--secret-key",
            "k",
            "--to",
            "*",
            "--text",
            "hi",
            "--priority",
            "now",
            "--config",
            "c.toml",
        ])
        .unwrap();
        assert_eq!(cli.config.as_deref(), Some(Path::new("c.toml")));
        assert!(
            Cli::try_parse_from(["meshbroker", "client", "send", "--priority", "soon"]).is_err()
        );
    }

    #[test]
    fn error_causes_are_not_repeated() {
        let err = Config::load(Path::new("/nonexistent/x.toml"), true).unwrap_err();
        let line = error_line(&anyhow::Error::from(err));
        assert_eq!(line.matches("No such file").count(), 1, "{line}");
        assert!(
            line.starts_with("cannot read config file /nonexistent/x.toml"),
            "{line}"
        );
    }

    #[test]
    fn dead_letter_commands_parse_and_need_a_selection() {
        let cli = Cli::try_parse_from([
            "meshbroker",
            "dead-letters",
            "purge",
            "--mesh",
            "m",
            "--id",
            "3",
            "--id",
            "4",
            "--older-than",
            "1h",
            "--json",
        ])
        .unwrap();
        let Command::DeadLetters(DeadLetterCommand::Purge { select, json }) = cli.command else {
            panic!("not a purge: {cli:?}");
        };
        assert!(json);
        assert_eq!(select.ids, [3, 4]);
        assert_eq!(select.older_than, Some(Dur::secs(3600)));
        let mesh = uuid::Uuid::new_v4().to_string();
        let none = DeadLetterSelect {
            mesh: mesh.clone(),
            ids: vec![],
            older_than: None,
            all: false,
        };
        let err = dead_letter_selection(none).unwrap_err().to_string();
        assert!(err.starts_with("say which dead letters"), "{err}");
        let all = DeadLetterSelect {
            mesh,
            ids: vec![],
            older_than: None,
            all: true,
        };
        let (_, selection) = dead_letter_selection(all).unwrap();
        assert_eq!(selection, dead_letters::Selection::default());
        assert!(Cli::try_parse_from([
            "meshbroker",
            "dead-letters",
            "purge",
            "--mesh",
            "m",
            "--older-than",
            "soon"
        ])
        .is_err());
    }

    #[test]
    fn bad_mesh_id_is_one_clear_line() {
        let err = parse_mesh_id("nope").unwrap_err().to_string();
        assert!(err.starts_with("--mesh \"nope\" is not a mesh id"), "{err}");
    }

    impl Cli {
        fn command_for_tests() -> clap::Command {
            <Cli as clap::CommandFactory>::command()
        }
    }
}
