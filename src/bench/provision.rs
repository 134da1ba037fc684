//! The members file of `--provision`: who the peers of a run against a
//! running broker connect as.
//!
//! Exactly what `meshbroker member add --json` prints, so a file is made by
//! appending its output: one JSON object per line, or one JSON array of
//! them. Each needs `id`, `mesh_id` and `secret_key` (members added with
//! `--pubkey` have none and cannot be used); `pubkey`, when present, must
//! match the secret key. Other fields are ignored.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _};
use serde::Deserialize;

use crate::client::Credentials;

#[derive(Debug, Deserialize)]
struct Entry {
    #[serde(alias = "member_id")]
    id: String,
    mesh_id: String,
    #[serde(default)]
    pubkey: Option<String>,
    #[serde(default)]
    secret_key: Option<String>,
}

pub fn load(path: &Path) -> anyhow::Result<Vec<Credentials>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --provision file {}", path.display()))?;
    parse(&text).with_context(|| format!("--provision file {}", path.display()))
}

fn parse(text: &str) -> anyhow::Result<Vec<Credentials>> {
    let entries: Vec<Entry> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text).context("not a JSON array of members")?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("line {}", i + 1)))
            .collect::<anyhow::Result<_>>()?
    };
    if entries.is_empty() {
        bail!("holds no members");
    }
    entries
        .into_iter()
        .map(|e| {
            let secret = e.secret_key.ok_or_else(|| {
                anyhow!("member {} has no secret_key (added with --pubkey?)", e.id)
            })?;
            let creds = Credentials::from_secret_hex(&e.mesh_id, &e.id, &secret)
                .with_context(|| format!("member {}", e.id))?;
            if let Some(pubkey) = e.pubkey {
                if !pubkey.eq_ignore_ascii_case(&creds.pubkey()) {
                    bail!("member {}: pubkey does not match its secret_key", e.id);
                }
            }
            Ok(creds)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto;

    fn line(id: &str) -> (String, String) {
        let (public, secret) = crypto::generate_keypair();
        let json = serde_json::json!({
            "id": id, "mesh_id": "m1", "name": id, "pubkey": public,
            "admin": false, "secret_key": secret,
        });
        (json.to_string(), public)
    }

    #[test]
    fn lines_and_arrays_of_member_add_output() {
        let (a, a_pub) = line("a");
        let (b, _) = line("b");
        let members = parse(&format!("{a}\n\n{b}\n")).unwrap();
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].member_id, "a");
        assert_eq!(members[0].mesh_id, "m1");
        assert_eq!(members[0].pubkey(), a_pub);
        let members = parse(&format!("[{a},{b}]")).unwrap();
        assert_eq!(members[1].member_id, "b");
    }

    #[test]
    fn unusable_entries_are_named() {
        let (public, _) = crypto::generate_keypair();
        let no_secret =
            format!(r#"{{"id":"x","mesh_id":"m","pubkey":"{public}","secret_key":null}}"#);
        let err = format!("{:#}", parse(&no_secret).unwrap_err());
        assert!(err.contains("member x has no secret_key"), "{err}");
        let (_, secret) = crypto::generate_keypair();
        let mismatch =
            format!(r#"{{"id":"y","mesh_id":"m","pubkey":"{public}","secret_key":"{secret}"}}"#);
        let err = format!("{:#}", parse(&mismatch).unwrap_err());
        assert!(err.contains("does not match"), "{err}");
        assert!(parse("\n").is_err());
        assert!(format!("{:#}", parse("{}\nnot json").unwrap_err()).contains("line 1"));
    }
}
