//! What SIGHUP may change in a running broker, decided on two
//! configurations alone: [`plan`] takes the one in force and the one just
//! read, and says which configuration to run with and which changed keys
//! wait for a restart.
//!
//! Reloadable are the settings every use reads afresh: `limits.*` (a
//! connection's frame limit and backlog are fixed when it opens, so those
//! reach new connections), `delivery.*` (the next claim, push, ack or pass
//! reads them), `presence.grace`, `log.level`, `server.trusted_proxies`, and
//! the certificate files of `server.tls`. Everything else is bound to
//! something made once at start: the listener, the pool, the data
//! directory, the timers of the sweeper, janitor, bus and pings, the log
//! format, and whether the listener speaks TLS at all.

use std::collections::BTreeMap;

use crate::config::Config;

/// The outcome of comparing the running configuration with a new one.
#[derive(Debug)]
pub struct Plan {
    /// What the broker runs with from now on: the old configuration with
    /// the new values of the reloadable keys.
    pub effective: Config,
    /// Keys whose value changes now, with the old and new value.
    pub applied: Vec<Change>,
    /// Keys that changed in the file but keep their old value until a
    /// restart.
    pub need_restart: Vec<String>,
}

/// One key's value before and after, as TOML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub old: String,
    pub new: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = {} (was {})", self.key, self.new, self.old)
    }
}

/// Compares `running` with `fresh` (both already validated).
pub fn plan(running: &Config, fresh: &Config) -> Plan {
    let mut effective = running.clone();
    effective.limits = fresh.limits.clone();
    effective.delivery = fresh.delivery.clone();
    effective.presence.grace = fresh.presence.grace;
    effective.log.level = fresh.log.level.clone();
    effective.server.trusted_proxies = fresh.server.trusted_proxies.clone();
    // New files for a listener that already speaks TLS; turning TLS on or
    // off changes the listener itself.
    if running.server.tls.is_some() && fresh.server.tls.is_some() {
        effective.server.tls = fresh.server.tls.clone();
    }
    let applied = differences(running, &effective)
        .into_iter()
        .map(|(key, (old, new))| Change { key, old, new })
        .collect();
    let need_restart = differences(&effective, fresh).into_keys().collect();
    Plan {
        effective,
        applied,
        need_restart,
    }
}

/// Every key (dotted path to a leaf) whose value differs, with both values
/// rendered as TOML; a key present on one side only shows as `(unset)` on
/// the other. Secrets are redacted before comparison output is made.
fn differences(a: &Config, b: &Config) -> BTreeMap<String, (String, String)> {
    let (a, b) = (leaves(a), leaves(b));
    let unset = || "(unset)".to_owned();
    let mut out = BTreeMap::new();
    for (key, old) in &a {
        match b.get(key) {
            Some(new) if new == old => {}
            new => {
                out.insert(
                    key.clone(),
                    (old.clone(), new.cloned().unwrap_or_else(unset)),
                );
            }
        }
    }
    for (key, new) in b {
        if !a.contains_key(&key) {
            out.insert(key, (unset(), new));
        }
    }
    out
}

fn leaves(config: &Config) -> BTreeMap<String, String> {
    let mut shown = config.clone();
    shown.database.url = shown.database.url.as_deref().map(crate::config::redact_url);
    let value = toml::Value::try_from(&shown).expect("config serializes");
    let mut out = BTreeMap::new();
    flatten("", &value, &mut out);
    out
}

fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, value, out);
            }
        }
        leaf => {
            out.insert(prefix.to_owned(), leaf.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, Path::new("test.toml")).unwrap()
    }

    fn keys(changes: &[Change]) -> Vec<&str> {
        changes.iter().map(|c| c.key.as_str()).collect()
    }

    #[test]
    fn same_file_changes_nothing() {
        let running = config("[limits]\nmax_message_bytes = 1000\n");
        let plan = plan(&running, &running.clone());
        assert!(plan.applied.is_empty(), "{:?}", plan.applied);
        assert!(plan.need_restart.is_empty(), "{:?}", plan.need_restart);
    }

    #[test]
    fn reloadable_keys_apply_and_the_rest_wait_for_a_restart() {
        let running = config("");
        let fresh = config(
            "[server]\nlisten = \"127.0.0.1:7999\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n\
             [limits]\nmax_message_bytes = 1000\nsend_burst = 5\n\
             [delivery]\nlease = \"5s\"\n\
             [presence]\ngrace = \"10s\"\nping_interval = \"10s\"\n\
             [sweeper]\ninterval = \"1s\"\n\
             [log]\nlevel = \"debug\"\nformat = \"json\"\n\
             [database]\nurl = \"postgres://u:secret@db/x\"\n",
        );
        let plan = plan(&running, &fresh);
        assert_eq!(
            keys(&plan.applied),
            [
                "delivery.lease",
                "limits.max_message_bytes",
                "limits.send_burst",
                "log.level",
                "presence.grace",
                "server.trusted_proxies",
            ]
        );
        assert_eq!(
            plan.need_restart,
            [
                "database.url",
                "log.format",
                "presence.ping_interval",
                "server.listen",
                "sweeper.interval",
            ]
        );
        let e = &plan.effective;
        assert_eq!(e.limits.max_message_bytes, 1000);
        assert_eq!(e.delivery.lease.get().as_secs(), 5);
        assert_eq!(e.log.level, "debug");
        assert_eq!(e.server.listen, running.server.listen);
        assert_eq!(e.presence.ping_interval, running.presence.ping_interval);
        assert!(e.database.url.is_none());
        let lease = &plan.applied[0];
        assert_eq!(lease.to_string(), "delivery.lease = \"5s\" (was \"30s\")");
    }

    #[test]
    fn a_database_password_is_never_shown() {
        let fresh = config("[database]\nurl = \"postgres://u:hunter2@db/x\"\n");
        let shown = format!("{:?}", differences(&config(""), &fresh));
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn certificate_files_reload_but_tls_on_or_off_needs_a_restart() {
        let tls = |cert: &str| format!("[server.tls]\ncert = \"{cert}\"\nkey = \"k.pem\"\n");
        let running = config(&tls("a.pem"));
        let plan1 = plan(&running, &config(&tls("b.pem")));
        assert_eq!(keys(&plan1.applied), ["server.tls.cert"]);
        assert!(plan1.need_restart.is_empty());
        assert_eq!(plan1.effective.server.tls.unwrap().cert, Path::new("b.pem"));

        let off = plan(&running, &config(""));
        assert!(off.applied.is_empty());
        assert_eq!(off.need_restart, ["server.tls.cert", "server.tls.key"]);
        assert!(off.effective.server.tls.is_some());

        let on = plan(&config(""), &running);
        assert_eq!(on.need_restart, ["server.tls.cert", "server.tls.key"]);
        assert!(on.effective.server.tls.is_none());
    }
}
