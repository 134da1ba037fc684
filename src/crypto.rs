//! ed25519 keys in the forms claudemesh uses: 64-hex public keys, 128-hex
//! detached signatures, and secret keys either as libsodium's 128-hex layout
//! (32-byte seed, then the public key) or as the bare 64-hex seed.
//!
//! Also the exact strings each handshake signs, so the broker and its client
//! cannot drift apart.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("secret key must be 64 hex chars (seed) or 128 hex chars (seed then public key)")]
    SecretFormat,
    #[error("secret key's public half does not match its seed")]
    SecretMismatch,
    #[error("public key must be 64 lowercase hex chars")]
    PublicFormat,
}

/// True for exactly `len` lowercase hex characters.
pub fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// True for exactly `len` hex characters of either case.
pub fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A fresh key pair; returns (public key hex, libsodium secret key hex).
pub fn generate_keypair() -> (String, String) {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    (public_hex(&key), secret_hex(&key))
}

/// Parses a secret key in either accepted layout.
pub fn parse_secret_key(hex_key: &str) -> Result<SigningKey, KeyError> {
    let hex_key = hex_key.trim();
    if !(is_hex(hex_key, 64) || is_hex(hex_key, 128)) {
        return Err(KeyError::SecretFormat);
    }
    let bytes = hex::decode(hex_key).map_err(|_| KeyError::SecretFormat)?;
    let seed: [u8; 32] = bytes[..32].try_into().map_err(|_| KeyError::SecretFormat)?;
    let key = SigningKey::from_bytes(&seed);
    if bytes.len() == 64 && key.verifying_key().as_bytes()[..] != bytes[32..] {
        return Err(KeyError::SecretMismatch);
    }
    Ok(key)
}

pub fn parse_public_key(hex_key: &str) -> Result<VerifyingKey, KeyError> {
    if !is_hex(hex_key, 64) {
        return Err(KeyError::PublicFormat);
    }
    let bytes: [u8; 32] = hex::decode(hex_key)
        .map_err(|_| KeyError::PublicFormat)?
        .try_into()
        .map_err(|_| KeyError::PublicFormat)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::PublicFormat)
}

pub fn public_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().as_bytes())
}

/// libsodium layout: seed then public key, 128 hex chars.
pub fn secret_hex(key: &SigningKey) -> String {
    let mut bytes = key.to_bytes().to_vec();
    bytes.extend_from_slice(key.verifying_key().as_bytes());
    hex::encode(bytes)
}

pub fn sign_hex(key: &SigningKey, message: &str) -> String {
    hex::encode(key.sign(message.as_bytes()).to_bytes())
}

/// Verifies a hex detached signature over `message` by hex public key `pubkey`.
/// Any malformed input is simply "does not verify".
pub fn verify_hex(pubkey: &str, message: &str, signature: &str) -> bool {
    let Ok(key) = parse_public_key(pubkey) else {
        return false;
    };
    let Ok(sig_bytes) = hex::decode(signature) else {
        return false;
    };
    let Ok(sig_bytes) = <[u8; 64]>::try_from(sig_bytes.as_slice()) else {
        return false;
    };
    key.verify(message.as_bytes(), &Signature::from_bytes(&sig_bytes))
        .is_ok()
}

/// What a member signs in `hello`.
pub fn hello_message(mesh_id: &str, member_id: &str, pubkey: &str, timestamp: i64) -> String {
    format!("{mesh_id}|{member_id}|{pubkey}|{timestamp}")
}

/// What a session key signs in `session_hello`.
pub fn session_hello_message(
    mesh_id: &str,
    parent_member_pubkey: &str,
    session_pubkey: &str,
    timestamp: i64,
) -> String {
    format!(
        "claudemesh-session-hello|{mesh_id}|{parent_member_pubkey}|{session_pubkey}|{timestamp}"
    )
}

/// What a member signs to attest one of its sessions.
pub fn attestation_message(
    parent_member_pubkey: &str,
    session_pubkey: &str,
    expires_at: i64,
) -> String {
    format!("claudemesh-session-attest|{parent_member_pubkey}|{session_pubkey}|{expires_at}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_secret_layouts_parse_to_the_same_key() {
        let (public, secret) = generate_keypair();
        let full = parse_secret_key(&secret).unwrap();
        let seed = parse_secret_key(&secret[..64]).unwrap();
        assert_eq!(public_hex(&full), public);
        assert_eq!(public_hex(&seed), public);
        let sig = sign_hex(&full, "x");
        assert!(verify_hex(&public, "x", &sig));
        assert!(!verify_hex(&public, "y", &sig));
    }

    #[test]
    fn mismatched_public_half_is_refused() {
        let (_, a) = generate_keypair();
        let (_, b) = generate_keypair();
        let spliced = format!("{}{}", &a[..64], &b[64..]);
        assert_eq!(
            parse_secret_key(&spliced).unwrap_err(),
            KeyError::SecretMismatch
        );
        assert_eq!(parse_secret_key("abc").unwrap_err(), KeyError::SecretFormat);
    }
}
