//! The broker's configuration: a TOML file, validated once at load.
//!
//! Every key has a default, so an empty file (or none at all) is a working
//! configuration. Unknown keys are refused by name so a typo never silently
//! falls back to a default.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::client_addr::IpBlock;

/// Environment variable that overrides `database.url`.
pub const DATABASE_URL_ENV: &str = "MESHBROKER_DATABASE_URL";

/// Errors a user sees when the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: key {key} = {value}: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        value: String,
        reason: &'static str,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub storage: StorageConfig,
    pub delivery: DeliveryConfig,
    pub sweeper: SweeperConfig,
    pub janitor: JanitorConfig,
    pub presence: PresenceConfig,
    pub cluster: ClusterConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTP and WebSocket listener binds.
    pub listen: SocketAddr,
    /// Peers (addresses or CIDR blocks) whose `X-Forwarded-For` names the
    /// client: behind a load balancer every request comes from the
    /// balancer, and the hook's loopback rule and per-source rate limit
    /// must see the client instead. Empty: the header is never read.
    pub trusted_proxies: Vec<IpBlock>,
    /// Serve `wss://` and `https://` instead of `ws://` and `http://`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7900".parse().expect("valid default address"),
            trusted_proxies: Vec::new(),
            tls: None,
        }
    }
}

/// `[server.tls]`: the listener's certificate, re-read on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file: the certificate, then any intermediates.
    pub cert: PathBuf,
    /// PEM file: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// PostgreSQL URL; unset means the embedded cluster under `storage.data_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Size of the bb8 pool shared by sessions, drains and the sweeper.
    pub pool_size: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            pool_size: 16,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Runtime data; the embedded PostgreSQL cluster lives in `<data_dir>/pg`.
    pub data_dir: PathBuf,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./var"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// How long a claimed delivery waits for its `client_ack` before it is
    /// eligible again.
    pub lease: Dur,
    /// Unacknowledged pushes allowed on one connection.
    pub max_in_flight: u32,
    /// Rows one claim UPDATE takes at most.
    pub claim_batch: u32,
    /// Pushes without an ack before a delivery is dead-lettered.
    pub max_attempts: u32,
    /// A message older than this is never pushed.
    pub message_ttl: Dur,
    /// How long a `client_message_id` stays reserved for its sender.
    pub dedupe_window: Dur,
    /// How long a delivered delivery (and then its message) is kept before
    /// the janitor deletes it.
    pub retention: Dur,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            lease: Dur::secs(30),
            max_in_flight: 256,
            claim_batch: 64,
            max_attempts: 10,
            message_ttl: Dur::secs(7 * 24 * 3600),
            dedupe_window: Dur::secs(600),
            retention: Dur::secs(24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SweeperConfig {
    /// Period of the sweeper's pass over expired leases and grace windows.
    pub interval: Dur,
}

impl Default for SweeperConfig {
    fn default() -> Self {
        Self {
            interval: Dur::secs(5),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JanitorConfig {
    /// Period of the janitor's pass: retention and expiry deletes, old
    /// presence rows, and waking drains that have claimable deliveries.
    pub interval: Dur,
}

impl Default for JanitorConfig {
    fn default() -> Self {
        Self {
            interval: Dur::secs(5),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// How long a closed connection stays listed and can be taken over.
    pub grace: Dur,
    /// Period of the broker's WebSocket pings.
    pub ping_interval: Dur,
    /// Silence after which a connection is closed.
    pub pong_timeout: Dur,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            grace: Dur::secs(90),
            ping_interval: Dur::secs(30),
            pong_timeout: Dur::secs(75),
        }
    }
}

/// Many brokers on one database (docs/cluster.md). Nothing needs setting
/// for brokers to form a cluster: sharing `database.url` is enough.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Period of this node's heartbeat (and of its look for dead nodes).
    pub heartbeat_interval: Dur,
    /// A node whose heartbeat is older than this is declared dead by
    /// another: its leases are released and its connections closed with
    /// the takeover grace window.
    pub dead_after: Dur,
    /// Period of the safety-net poll for claimable deliveries of this
    /// node's members: what a lost notification costs at most.
    pub poll_interval: Dur,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Dur::secs(1),
            dead_after: Dur::secs(5),
            poll_interval: Dur::secs(1),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest WebSocket frame accepted; larger closes with 1009.
    pub max_frame_bytes: usize,
    /// Largest `nonce + ciphertext + targetSpec` of one send.
    pub max_message_bytes: usize,
    /// Token bucket size of a member's sends.
    pub send_burst: u32,
    /// Token bucket refill rate of a member's sends.
    pub send_per_sec: u32,
    /// Sends one connection may have waiting for their store; at this many
    /// the broker stops reading the connection until the oldest is
    /// answered (back-pressure, not a refusal).
    pub send_window: u32,
    /// Live connections one mesh may hold.
    pub max_connections_per_mesh: u32,
    /// Allowed clock difference of a hello's timestamp.
    pub hello_skew: Dur,
    /// How long a connection may stay open without a successful hello:
    /// unauthenticated sockets must not pile up (pings keep them alive).
    pub hello_timeout: Dur,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 262_144,
            max_message_bytes: 65_536,
            send_burst: 200,
            send_per_sec: 100,
            send_window: 64,
            max_connections_per_mesh: 1000,
            hello_skew: Dur::secs(60),
            hello_timeout: Dur::secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug` or `trace` (or a tracing filter).
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Loads `path`; a missing file at the default path yields the defaults,
    /// a missing file that was asked for explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let mut config = Config::parse(&text, path)?;
        if let Ok(url) = std::env::var(DATABASE_URL_ENV) {
            if !url.is_empty() {
                config.database.url = Some(url);
            }
        }
        Ok(config)
    }

    /// Parses and validates TOML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: one_line(&e, text),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    pub(crate) fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, value: String, reason: &'static str| {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                key,
                value,
                reason,
            })
        };
        let positive: [(&'static str, u64); 8] = [
            ("database.pool_size", self.database.pool_size.into()),
            ("delivery.max_in_flight", self.delivery.max_in_flight.into()),
            ("delivery.claim_batch", self.delivery.claim_batch.into()),
            ("delivery.max_attempts", self.delivery.max_attempts.into()),
            ("limits.send_burst", self.limits.send_burst.into()),
            ("limits.send_per_sec", self.limits.send_per_sec.into()),
            ("limits.send_window", self.limits.send_window.into()),
            (
                "limits.max_connections_per_mesh",
                self.limits.max_connections_per_mesh.into(),
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return invalid(key, value.to_string(), "must be at least 1");
            }
        }
        let durations: [(&'static str, Dur); 14] = [
            (
                "cluster.heartbeat_interval",
                self.cluster.heartbeat_interval,
            ),
            ("cluster.dead_after", self.cluster.dead_after),
            ("cluster.poll_interval", self.cluster.poll_interval),
            ("delivery.lease", self.delivery.lease),
            ("limits.hello_timeout", self.limits.hello_timeout),
            ("delivery.message_ttl", self.delivery.message_ttl),
            ("delivery.dedupe_window", self.delivery.dedupe_window),
            ("delivery.retention", self.delivery.retention),
            ("sweeper.interval", self.sweeper.interval),
            ("janitor.interval", self.janitor.interval),
            ("presence.ping_interval", self.presence.ping_interval),
            ("presence.pong_timeout", self.presence.pong_timeout),
            ("limits.hello_skew", self.limits.hello_skew),
            ("presence.grace", self.presence.grace),
        ];
        for (key, value) in durations {
            if value.0.is_zero() && key != "presence.grace" {
                return invalid(key, value.to_string(), "must be longer than zero");
            }
        }
        if self.cluster.dead_after.0 < self.cluster.heartbeat_interval.0 * 3 {
            return invalid(
                "cluster.dead_after",
                self.cluster.dead_after.to_string(),
                "must be at least 3 × cluster.heartbeat_interval (one late heartbeat must not kill a node)",
            );
        }
        if self.presence.pong_timeout.0 <= self.presence.ping_interval.0 {
            return invalid(
                "presence.pong_timeout",
                self.presence.pong_timeout.to_string(),
                "must be longer than presence.ping_interval",
            );
        }
        if self.limits.max_frame_bytes <= self.limits.max_message_bytes {
            return invalid(
                "limits.max_frame_bytes",
                self.limits.max_frame_bytes.to_string(),
                "must be larger than limits.max_message_bytes, so an oversized message is refused by its ack",
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return invalid(
                "log.level",
                self.log.level.clone(),
                "not a log level (error, warn, info, debug, trace)",
            );
        }
        if let Some(url) = &self.database.url {
            if !(url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.contains('='))
            {
                return invalid(
                    "database.url",
                    redact_url(url),
                    "expected postgres://… or postgresql://…",
                );
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML, with secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database.url = shown.database.url.as_deref().map(redact_url);
        let body = toml::to_string_pretty(&shown).expect("config serializes");
        if self.database.url.is_none() {
            format!("# database.url is unset: the embedded PostgreSQL under storage.data_dir is used\n{body}")
        } else {
            body
        }
    }
}

/// Replaces every password in a database URL with `***`: the userinfo's
/// (`postgres://user:secret@host/db`), a `password=` / `sslpassword=` query
/// parameter, and the same keys of a key/value connection string
/// (`host=/tmp password='a b'`). When in doubt it hides more, never less.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", redact_uri_rest(rest)),
        None => redact_conninfo(url),
    }
}

fn is_password_key(key: &str) -> bool {
    key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("sslpassword")
}

/// The part of a URI after `scheme://`.
fn redact_uri_rest(rest: &str) -> String {
    // A password may hold `@`, `/` or `?` unencoded, and parsers disagree
    // on which `@` ends it (tokio-postgres takes the first, libpq the first
    // before a `/`): everything up to the last `@` is hidden.
    let (auth, tail) = match rest.rfind('@') {
        Some(at) => rest.split_at(at),
        None => ("", rest),
    };
    let auth = match auth.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None => auth.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if is_password_key(k) => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{auth}{tail}")
}

/// A libpq key/value string: `key = value` pairs, values bare or in single
/// quotes with backslash escapes. Unparseable text is hidden whole.
fn redact_conninfo(s: &str) -> String {
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::CharIndices>| {
        while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            chars.next();
        }
    };
    loop {
        skip_ws(&mut chars);
        let Some(&(key_start, _)) = chars.peek() else {
            break;
        };
        let mut key_end = s.len();
        while let Some(&(i, c)) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                key_end = i;
                break;
            }
            chars.next();
        }
        let key = &s[key_start..key_end];
        skip_ws(&mut chars);
        if chars.next().map(|(_, c)| c) != Some('=') {
            return "***".to_owned();
        }
        skip_ws(&mut chars);
        let value_start = chars.peek().map_or(s.len(), |&(i, _)| i);
        let mut value_end = s.len();
        let quoted = chars.peek().is_some_and(|&(_, c)| c == '\'');
        if quoted {
            chars.next();
        }
        let mut closed = !quoted;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '\'' if quoted => {
                    value_end = i + 1;
                    closed = true;
                    break;
                }
                c if !quoted && c.is_whitespace() => {
                    value_end = i;
                    break;
                }
                _ => {}
            }
        }
        if !closed {
            return "***".to_owned();
        }
        if is_password_key(key) {
            out.push(format!("{key}=***"));
        } else {
            out.push(format!("{key}={}", &s[value_start..value_end]));
        }
    }
    out.join(" ")
}

/// toml's message on one line, led by the dotted key it is about (found
/// from the error's position: the key on that line and the table above it).
fn one_line(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().replace('\n', " ");
    let Some(span) = e.span() else {
        return message;
    };
    let upto = &text[..span.start.min(text.len())];
    let line_start = upto.rfind('\n').map_or(0, |i| i + 1);
    let line_no = upto.matches('\n').count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let table = upto[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match (table, key) {
        (Some(t), Some(k)) => format!("key {t}.{k} (line {line_no}): {message}"),
        (None, Some(k)) => format!("key {k} (line {line_no}): {message}"),
        _ => format!("line {line_no}: {message}"),
    }
}

/// A duration written as `"250ms"`, `"30s"`, `"10m"`, `"1h"` or `"7d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
    pub const fn millis(ms: u64) -> Dur {
        Dur(Duration::from_millis(ms))
    }
    pub fn get(self) -> Duration {
        self.0
    }
    /// As a chrono duration, for arithmetic with timestamps.
    pub fn chrono(self) -> chrono::Duration {
        chrono::Duration::from_std(self.0).unwrap_or(chrono::Duration::MAX)
    }
}

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("duration {s:?} has no unit (use ms, s, m, h or d)"))?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("duration {s:?} must start with a whole number"))?;
        let ms = match unit {
            "ms" => Some(n),
            "s" => n.checked_mul(1_000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            "d" => n.checked_mul(86_400_000),
            _ => {
                return Err(format!(
                    "duration {s:?} has unknown unit {unit:?} (use ms, s, m, h or d)"
                ))
            }
        }
        .ok_or_else(|| format!("duration {s:?} is too long"))?;
        Ok(Dur(Duration::from_millis(ms)))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let units = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1_000, "s"),
        ];
        for (size, unit) in units {
            if ms >= size && ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip() {
        for (text, ms) in [
            ("250ms", 250),
            ("30s", 30_000),
            ("10m", 600_000),
            ("7d", 604_800_000),
        ] {
            let d: Dur = text.parse().unwrap();
            assert_eq!(d.0.as_millis(), ms);
            assert_eq!(d.to_string(), text);
        }
        assert!("30".parse::<Dur>().is_err());
        assert!("30x".parse::<Dur>().is_err());
        assert!("-1s".parse::<Dur>().is_err());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[delivery]\nleas = \"1s\"\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("leas"), "{err}");
    }

    #[test]
    fn bad_value_names_key_and_value() {
        let err = Config::parse("[delivery]\nlease = \"soon\"\n", Path::new("c.toml")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("soon") && text.contains("delivery.lease"),
            "{text}"
        );
        let err =
            Config::parse("[delivery]\nmax_in_flight = 0\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("delivery.max_in_flight"), "{err}");
    }

    #[test]
    fn retention_and_janitor_interval_are_checked() {
        let c = Config::parse(
            "[delivery]\nretention = \"2s\"\n[janitor]\ninterval = \"250ms\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(c.delivery.retention, Dur::secs(2));
        assert_eq!(c.janitor.interval, Dur::millis(250));
        assert_eq!(Config::default().delivery.retention, Dur::secs(24 * 3600));
        let err = Config::parse("[delivery]\nretention = \"0s\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "config file c.toml: key delivery.retention = 0ms: must be longer than zero"
        );
        let err = Config::parse("[delivery]\nretention = \"1 day\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("delivery.retention"), "{err}");
        let err = Config::parse("[janitor]\ninterval = \"0ms\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("janitor.interval"), "{err}");
    }

    #[test]
    fn a_node_is_not_declared_dead_after_one_late_heartbeat() {
        let c = Config::default().cluster;
        assert!(c.dead_after.0 >= c.heartbeat_interval.0 * 3);
        let err = Config::parse(
            "[cluster]\nheartbeat_interval = \"1s\"\ndead_after = \"2s\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cluster.dead_after") && err.contains("3 ×"),
            "{err}"
        );
        let ok = Config::parse(
            "[cluster]\nheartbeat_interval = \"200ms\"\ndead_after = \"1s\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(ok.cluster.dead_after, Dur::secs(1));
    }

    #[test]
    fn trusted_proxies_are_parsed_and_bad_ones_named() {
        assert!(Config::default().server.trusted_proxies.is_empty());
        let c = Config::parse(
            "[server]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\", \"2001:db8::/32\"]\n",
            Path::new("c.toml"),
        )
        .unwrap();
        let shown: Vec<String> = c
            .server
            .trusted_proxies
            .iter()
            .map(|b| b.to_string())
            .collect();
        assert_eq!(shown, ["127.0.0.1", "10.0.0.0/8", "2001:db8::/32"]);
        assert!(
            c.to_redacted_toml().contains("\"10.0.0.0/8\""),
            "{}",
            c.to_redacted_toml()
        );
        for (entry, says) in [
            ("10.0.0.0/33", "from 0 to 32"),
            ("foo", "not an IP address"),
        ] {
            let text = format!("[server]\ntrusted_proxies = [\"{entry}\"]\n");
            let err = Config::parse(&text, Path::new("c.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("server.trusted_proxies") && err.contains(entry) && err.contains(says),
                "{err}"
            );
        }
    }

    #[test]
    fn password_is_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact_url("host=/tmp password=x user=u"),
            "host=/tmp password=*** user=u"
        );
        let mut c = Config::default();
        c.database.url = Some("postgres://u:secret@h/db".into());
        assert!(!c.to_redacted_toml().contains("secret"));
    }

    #[test]
    fn every_form_of_password_is_redacted() {
        let cases = [
            // `@`, `/`, `?` and `:` inside an unencoded password.
            ("postgres://u:s3cr@t@h/db", "postgres://u:***@h/db"),
            ("postgres://u:a/b?c@h:5432/db", "postgres://u:***@h:5432/db"),
            (
                "postgres://u:s3cr@t/x?y@h/db?a=1",
                "postgres://u:***@h/db?a=1",
            ),
            ("postgres://u:x:y@h/db", "postgres://u:***@h/db"),
            (
                "postgresql://u:p%40ss@h/db?sslmode=disable",
                "postgresql://u:***@h/db?sslmode=disable",
            ),
            // Query parameters.
            (
                "postgres://u@h/db?password=s3cr",
                "postgres://u@h/db?password=***",
            ),
            (
                "postgres://h/db?sslmode=require&PASSWORD=s3cr&sslpassword=k3y",
                "postgres://h/db?sslmode=require&PASSWORD=***&sslpassword=***",
            ),
            (
                "postgresql://postgres@/db?host=/tmp/x&port=5432",
                "postgresql://postgres@/db?host=/tmp/x&port=5432",
            ),
            // Key/value strings, quoted values with spaces and escapes.
            (
                "host=/tmp password='s3 cr' user=u",
                "host=/tmp password=*** user=u",
            ),
            (
                "host=h password = s3cr dbname=d",
                "host=h password=*** dbname=d",
            ),
            (r"password='a\'b s3cr' host=h", "password=*** host=h"),
            ("host=h password='unterminated s3cr", "***"),
        ];
        for (url, want) in cases {
            let got = redact_url(url);
            assert_eq!(got, want, "redact_url({url:?})");
            assert!(!got.contains("s3cr") && !got.contains("k3y"), "{got}");
        }
    }
}
