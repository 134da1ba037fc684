//! `meshbroker client listen|send`: the command line's face of
//! [`crate::client`]. What it prints lives here, so the client stays a
//! library that knows nothing of the command line.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;

use crate::client::{
    generate_session_key, hello, is_system_push, session_hello, Connection, Credentials, Event,
    HelloOptions,
};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub(super) enum ClientCommand {
    /// Print each message pushed to this member as a JSON line.
    Listen(ClientFlags),
    /// Send one message and print its ack.
    Send {
        #[command(flatten)]
        flags: ClientFlags,
        /// Recipient: a pubkey, or a target spec such as `*` or `@group`.
        #[arg(long, value_name = "PUBKEY_OR_SPEC")]
        to: String,
        #[arg(long)]
        text: String,
        #[arg(long, value_enum, default_value_t = Priority::Next)]
        priority: Priority,
        #[arg(long, value_name = "ID")]
        client_message_id: Option<String>,
    },
}

#[derive(Debug, Args)]
pub(super) struct ClientFlags {
    #[arg(long, value_name = "MESH_ID")]
    mesh: String,
    #[arg(long, value_name = "MEMBER_ID")]
    member_id: String,
    /// The member's secret key, 64 or 128 hex chars. Better kept off the
    /// command line (other users see it in `ps`): use the environment
    /// variable or --secret-key-file.
    #[arg(
        long,
        value_name = "HEX",
        env = "MESHBROKER_SECRET_KEY",
        hide_env_values = true,
        required_unless_present = "secret_key_file"
    )]
    secret_key: Option<String>,
    /// A file holding the member's secret key (surrounding whitespace is
    /// ignored), e.g. one only its owner may read.
    #[arg(long, value_name = "PATH", conflicts_with = "secret_key")]
    secret_key_file: Option<std::path::PathBuf>,
    /// Broker WebSocket URL [default: ws://<server.listen>/ws]
    #[arg(long)]
    url: Option<String>,
    /// For wss://: a PEM file of the authority that signed the broker's
    /// certificate (or the certificate itself) [default: the system's
    /// bundle, or SSL_CERT_FILE]
    #[arg(long, value_name = "PATH", env = "MESHBROKER_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Connect as a fresh session attested by the member (session_hello).
    #[arg(long)]
    session: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum Priority {
    Now,
    Next,
    Low,
}

impl Priority {
    fn as_str(self) -> &'static str {
        match self {
            Priority::Now => "now",
            Priority::Next => "next",
            Priority::Low => "low",
        }
    }
}

/// What `client listen|send` connect with.
#[derive(Debug, Clone)]
struct ClientArgs {
    /// `ws://…/ws` of the broker.
    url: String,
    mesh_id: String,
    member_id: String,
    /// 64 or 128 hex chars.
    secret_key: String,
    /// Use session_hello with a fresh session key instead of hello.
    session: bool,
}

pub(super) async fn client_command(config: &Config, cmd: ClientCommand) -> anyhow::Result<()> {
    match cmd {
        ClientCommand::Listen(flags) => {
            let args = client_args(config, flags)?;
            listen(&args).await
        }
        ClientCommand::Send {
            flags,
            to,
            text,
            priority,
            client_message_id,
        } => {
            let args = client_args(config, flags)?;
            send(
                &args,
                &to,
                &text,
                priority.as_str(),
                client_message_id.as_deref(),
            )
            .await
        }
    }
}

fn client_args(config: &Config, flags: ClientFlags) -> anyhow::Result<ClientArgs> {
    let secret_key = match (flags.secret_key, &flags.secret_key_file) {
        (Some(key), _) => key,
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read --secret-key-file {}: {e}", path.display()))?
            .trim()
            .to_owned(),
        (None, None) => anyhow::bail!("give --secret-key-file, or MESHBROKER_SECRET_KEY"),
    };
    if let Some(ca_file) = &flags.ca_file {
        crate::client::trust(ca_file)?;
    }
    Ok(ClientArgs {
        url: flags
            .url
            .unwrap_or_else(|| default_ws_url(config.server.listen, config.server.tls.is_some())),
        mesh_id: flags.mesh,
        member_id: flags.member_id,
        secret_key,
        session: flags.session,
    })
}

/// `ws://<server.listen>/ws` (`wss://` with TLS), with a wildcard listen
/// address replaced by loopback (one cannot connect to 0.0.0.0 portably).
fn default_ws_url(listen: SocketAddr, tls: bool) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let scheme = if tls { "wss" } else { "ws" };
    format!("{scheme}://{}/ws", SocketAddr::new(ip, listen.port()))
}

async fn connect(args: &ClientArgs) -> anyhow::Result<Connection> {
    let creds = Credentials::from_secret_hex(&args.mesh_id, &args.member_id, &args.secret_key)?;
    let opts = HelloOptions::default();
    let (conn, _ack) = if args.session {
        session_hello(&args.url, &creds, &generate_session_key(), &opts).await?
    } else {
        hello(&args.url, &creds, &opts).await?
    };
    Ok(conn)
}

fn print_line(value: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}")?;
    out.flush()?;
    Ok(())
}

/// `meshbroker client listen`: prints each pushed message as one JSON line
/// and acknowledges it; returns when the broker closes with 1000 or 1001.
async fn listen(args: &ClientArgs) -> anyhow::Result<()> {
    let mut conn = connect(args).await?;
    loop {
        match conn.recv(Duration::from_secs(3600)).await? {
            Event::Frame(frame) => {
                if frame["type"] == "push" && !is_system_push(&frame) {
                    print_line(&frame)?;
                    conn.ack(&frame).await?;
                } else if frame["type"] == "error" {
                    eprintln!("broker error: {frame}");
                }
            }
            Event::Timeout => {}
            Event::Closed {
                code: Some(1000 | 1001),
                ..
            } => return Ok(()),
            Event::Closed { code, reason } => {
                bail!("broker closed the connection (code {code:?}, reason {reason:?})")
            }
        }
    }
}

/// `meshbroker client send`: sends one message, prints its `ack` as one JSON
/// line, and fails with the ack's error when it was not queued.
async fn send(
    args: &ClientArgs,
    to: &str,
    text: &str,
    priority: &str,
    client_message_id: Option<&str>,
) -> anyhow::Result<()> {
    let mut conn = connect(args).await?;
    let ack = conn
        .send_message(to, text, priority, client_message_id)
        .await?;
    print_line(&ack)?;
    let _ = conn.close().await;
    if ack["queued"] != true {
        bail!("{}", ack["error"].as_str().unwrap_or("message not queued"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_url_defaults_to_the_listen_address() {
        assert_eq!(
            default_ws_url("127.0.0.1:7900".parse().unwrap(), false),
            "ws://127.0.0.1:7900/ws"
        );
        assert_eq!(
            default_ws_url("0.0.0.0:443".parse().unwrap(), true),
            "wss://127.0.0.1:443/ws"
        );
        assert_eq!(
            default_ws_url("[::]:7900".parse().unwrap(), false),
            "ws://[::1]:7900/ws"
        );
    }
}
