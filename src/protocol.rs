//! Wire frames of `docs/protocol.md`: what clients send (decoded into
//! [`ClientFrame`]) and what the broker sends back (typed, serialized).
//!
//! Field names follow the contract exactly, camelCase and snake_case mixed
//! as claudemesh has them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error_code::ErrorCode;
use crate::ids::Role;

/// Longest accepted text of each free-form field, in bytes; longer is
/// refused `invalid`. Every field a client sends that the broker stores or
/// relays has one; `id` and `_reqId`, only echoed back, are bounded by the
/// frame limit alone. No stored text may contain U+0000 either: PostgreSQL
/// `text` and `jsonb` cannot hold it, and a refusal by the database would
/// read as `unavailable`, which clients retry for minutes.
pub mod bounds {
    pub const DISPLAY_NAME: usize = 256;
    pub const SESSION_ID: usize = 256;
    pub const CWD: usize = 4096;
    /// hostname, peerType, channel, model, a group's role.
    pub const SHORT_FIELD: usize = 256;
    pub const SUMMARY: usize = 2048;
    pub const GROUP_NAME: usize = 128;
    pub const GROUPS: usize = 64;
    pub const TARGET_SPEC: usize = 512;
    /// client_message_id, request_fingerprint, replyToId.
    pub const CLIENT_ID: usize = 256;
    /// `mentions`, as compact JSON.
    pub const MENTIONS: usize = 4096;
}

/// Checks one text field: at most `max` bytes and no U+0000.
pub fn check_text(name: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("{name} is longer than {max} bytes"));
    }
    check_no_nul(name, value)
}

/// Checks an unbounded (size-limited elsewhere) field for U+0000.
pub fn check_no_nul(name: &str, value: &str) -> Result<(), String> {
    if value.contains('\0') {
        return Err(format!("{name} contains a NUL character"));
    }
    Ok(())
}

/// True when any string or key inside `v` contains U+0000.
fn json_has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(json_has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// One group membership of a connection (`{"name":…,"role":…}`, or a bare name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum GroupWire {
    Name(String),
    Full {
        name: String,
        #[serde(default)]
        role: Option<String>,
    },
}

fn groups<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Group>, D::Error> {
    let wire: Option<Vec<GroupWire>> = Option::deserialize(d)?;
    Ok(wire
        .unwrap_or_default()
        .into_iter()
        .map(|g| match g {
            GroupWire::Name(name) => Group { name, role: None },
            GroupWire::Full { name, role } => Group { name, role },
        })
        .collect())
}

/// Connection details both hellos carry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub pid: Option<i64>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub peer_type: Option<String>,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default, deserialize_with = "groups")]
    pub groups: Vec<Group>,
}

impl ConnectionInfo {
    /// Checks every field against [`bounds`]; names the first one over.
    pub fn check_bounds(&self) -> Result<(), String> {
        let fields = [
            ("displayName", &self.display_name, bounds::DISPLAY_NAME),
            ("sessionId", &self.session_id, bounds::SESSION_ID),
            ("cwd", &self.cwd, bounds::CWD),
            ("hostname", &self.hostname, bounds::SHORT_FIELD),
            ("peerType", &self.peer_type, bounds::SHORT_FIELD),
            ("channel", &self.channel, bounds::SHORT_FIELD),
            ("model", &self.model, bounds::SHORT_FIELD),
        ];
        for (name, value, max) in fields {
            if let Some(v) = value {
                check_text(name, v, max)?;
            }
        }
        check_groups(&self.groups)
    }
}

pub fn check_groups(groups: &[Group]) -> Result<(), String> {
    if groups.len() > bounds::GROUPS {
        return Err(format!("more than {} groups", bounds::GROUPS));
    }
    for g in groups {
        check_group_name(&g.name)?;
        if let Some(role) = &g.role {
            check_text("group role", role, bounds::SHORT_FIELD)?;
        }
    }
    Ok(())
}

/// A group name is data: matched by exact comparison and `/` prefixes in
/// the broker, never as a pattern, so any non-empty text within bounds is
/// a name.
pub fn check_group_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > bounds::GROUP_NAME {
        return Err(format!(
            "group name must be 1 to {} bytes",
            bounds::GROUP_NAME
        ));
    }
    check_no_nul("group name", name)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    pub mesh_id: String,
    pub member_id: String,
    pub pubkey: String,
    #[serde(default)]
    pub session_pubkey: Option<String>,
    pub timestamp: i64,
    pub signature: String,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub protocol_version: Option<i64>,
    #[serde(flatten)]
    pub info: ConnectionInfo,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attestation {
    pub session_pubkey: String,
    pub parent_member_pubkey: String,
    pub expires_at: i64,
    pub signature: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionHello {
    pub mesh_id: String,
    #[serde(default)]
    pub parent_member_id: Option<String>,
    pub parent_member_pubkey: String,
    pub session_pubkey: String,
    pub parent_attestation: Attestation,
    pub timestamp: i64,
    pub signature: String,
    #[serde(flatten)]
    pub info: ConnectionInfo,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SendFrame {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(rename = "targetSpec")]
    pub target_spec: String,
    #[serde(default)]
    pub priority: Option<String>,
    #[serde(default)]
    pub nonce: String,
    #[serde(default)]
    pub ciphertext: String,
    #[serde(default)]
    pub client_message_id: Option<String>,
    #[serde(default)]
    pub request_fingerprint: Option<String>,
    #[serde(default, rename = "replyToId")]
    pub reply_to_id: Option<String>,
    #[serde(default)]
    pub mentions: Option<Value>,
}

impl SendFrame {
    /// Checks the stored fields against [`bounds`] (the payload's size is
    /// `limits.max_message_bytes`' business); names the first one at fault.
    pub fn check_bounds(&self) -> Result<(), String> {
        check_text("targetSpec", &self.target_spec, bounds::TARGET_SPEC)?;
        check_no_nul("nonce", &self.nonce)?;
        check_no_nul("ciphertext", &self.ciphertext)?;
        for (name, v) in [
            ("client_message_id", &self.client_message_id),
            ("request_fingerprint", &self.request_fingerprint),
            ("replyToId", &self.reply_to_id),
        ] {
            if let Some(v) = v {
                check_text(name, v, bounds::CLIENT_ID)?;
            }
        }
        if let Some(m) = &self.mentions {
            if m.to_string().len() > bounds::MENTIONS {
                return Err(format!(
                    "mentions is longer than {} bytes",
                    bounds::MENTIONS
                ));
            }
            if json_has_nul(m) {
                return Err("mentions contains a NUL character".into());
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientAck {
    #[serde(default)]
    pub client_message_id: Option<String>,
    #[serde(default)]
    pub broker_message_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Nack {
    pub broker_message_id: String,
    #[serde(default)]
    pub delay: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InProgress {
    pub broker_message_id: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ListPeers {
    #[serde(default)]
    pub roles: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct KickFrame {
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub all: Option<bool>,
    #[serde(default)]
    pub stale: Option<i64>,
}

/// Every frame a client may send, decoded.
#[derive(Debug, Clone)]
pub enum ClientFrame {
    Hello(Box<Hello>),
    SessionHello(Box<SessionHello>),
    Send(Box<SendFrame>),
    ClientAck(ClientAck),
    Nack(Nack),
    InProgress(InProgress),
    ListPeers(ListPeers),
    SetStatus { status: String },
    SetSummary { summary: Option<String> },
    SetVisible { visible: bool },
    JoinGroup(Group),
    LeaveGroup { name: String },
    Kick(KickFrame),
    Disconnect(KickFrame),
    Ping,
}

/// A decoded frame with its correlation id.
#[derive(Debug, Clone)]
pub struct Request {
    pub req_id: Option<String>,
    pub frame: ClientFrame,
}

/// Why a text frame could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// Not JSON, not an object, or no string `type`.
    Malformed(String),
    /// A `type` this broker does not speak.
    Unsupported { ty: String, req_id: Option<String> },
    /// A known `type` whose fields do not fit.
    Invalid {
        ty: String,
        req_id: Option<String>,
        /// The `id` of a `send`, echoed on its refusal `ack`.
        id: Option<String>,
        message: String,
    },
}

/// Decodes one text frame.
pub fn decode(text: &str) -> Result<Request, DecodeError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| DecodeError::Malformed(format!("not valid JSON: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(DecodeError::Malformed("frame must be a JSON object".into()));
    };
    let ty = match map.get("type") {
        Some(Value::String(t)) => t.clone(),
        _ => {
            return Err(DecodeError::Malformed(
                "frame has no string \"type\"".into(),
            ))
        }
    };
    let req_id = map.get("_reqId").and_then(Value::as_str).map(str::to_owned);
    let send_id = map.get("id").and_then(Value::as_str).map(str::to_owned);
    let invalid = |e: serde_json::Error| DecodeError::Invalid {
        ty: ty.clone(),
        req_id: req_id.clone(),
        id: send_id.clone(),
        message: format!("{ty}: {e}"),
    };
    fn field<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, serde_json::Error> {
        serde_json::from_value(v)
    }
    let frame = match ty.as_str() {
        "hello" => ClientFrame::Hello(Box::new(field(value).map_err(invalid)?)),
        "session_hello" => ClientFrame::SessionHello(Box::new(field(value).map_err(invalid)?)),
        "send" => ClientFrame::Send(Box::new(field(value).map_err(invalid)?)),
        "client_ack" => ClientFrame::ClientAck(field(value).map_err(invalid)?),
        "nack" => ClientFrame::Nack(field(value).map_err(invalid)?),
        "in_progress" => ClientFrame::InProgress(field(value).map_err(invalid)?),
        "list_peers" => ClientFrame::ListPeers(field(value).map_err(invalid)?),
        "set_status" => {
            #[derive(Deserialize)]
            struct F {
                status: String,
            }
            let f: F = field(value).map_err(invalid)?;
            ClientFrame::SetStatus { status: f.status }
        }
        "set_summary" => {
            #[derive(Deserialize)]
            struct F {
                #[serde(default)]
                summary: Option<String>,
            }
            let f: F = field(value).map_err(invalid)?;
            ClientFrame::SetSummary { summary: f.summary }
        }
        "set_visible" => {
            #[derive(Deserialize)]
            struct F {
                visible: bool,
            }
            let f: F = field(value).map_err(invalid)?;
            ClientFrame::SetVisible { visible: f.visible }
        }
        "join_group" => ClientFrame::JoinGroup(field(value).map_err(invalid)?),
        "leave_group" => {
            #[derive(Deserialize)]
            struct F {
                name: String,
            }
            let f: F = field(value).map_err(invalid)?;
            ClientFrame::LeaveGroup { name: f.name }
        }
        "kick" => ClientFrame::Kick(field(value).map_err(invalid)?),
        "disconnect" => ClientFrame::Disconnect(field(value).map_err(invalid)?),
        "ping" => ClientFrame::Ping,
        _ => return Err(DecodeError::Unsupported { ty, req_id }),
    };
    Ok(Request { req_id, frame })
}

// ---------------------------------------------------------------------------
// Broker → client

#[derive(Debug, Clone, Serialize)]
pub struct ErrorFrame {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub code: String,
    pub message: String,
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

impl ErrorFrame {
    pub fn new(code: ErrorCode, message: impl Into<String>, req_id: Option<String>) -> Self {
        ErrorFrame {
            ty: "error",
            code: code.as_str().to_owned(),
            message: message.into(),
            req_id,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberProfile {
    pub role_tag: Option<String>,
    pub groups: Vec<Group>,
    pub message_mode: &'static str,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HelloAck {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub presence_id: String,
    pub member_display_name: String,
    pub member_profile: MemberProfile,
    pub peer_role: Role,
    pub protocol_version: i64,
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// The answer to a `send` (and, with an empty message id, to `set_visible`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SendAck {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub id: String,
    pub message_id: String,
    pub queued: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

impl SendAck {
    /// The message was stored now.
    pub fn stored(id: String, message_id: String, recipients: u32) -> Self {
        Self::queued(id, message_id, false, recipients)
    }
    /// A resend inside the dedupe window: the message stored before.
    pub fn duplicate(id: String, message_id: String, recipients: u32) -> Self {
        Self::queued(id, message_id, true, recipients)
    }
    fn queued(id: String, message_id: String, duplicate: bool, recipients: u32) -> Self {
        SendAck {
            ty: "ack",
            id,
            message_id,
            queued: true,
            duplicate: Some(duplicate),
            recipients: Some(recipients),
            error: None,
            req_id: None,
        }
    }
    /// The answer to `set_visible`: an `ack` with no message.
    pub fn visibility_set(req_id: Option<String>) -> Self {
        SendAck {
            ty: "ack",
            id: req_id.clone().unwrap_or_default(),
            message_id: String::new(),
            queued: false,
            duplicate: None,
            recipients: None,
            error: None,
            req_id,
        }
    }
    /// A refused send: `error` starts with the code.
    pub fn refused(id: String, code: ErrorCode, text: &str) -> Self {
        SendAck {
            ty: "ack",
            id,
            message_id: String::new(),
            queued: false,
            duplicate: None,
            recipients: None,
            error: Some(format!("{code}: {text}")),
            req_id: None,
        }
    }
}

/// A delivery, or a system event, pushed to a recipient.
#[derive(Debug, Clone, Serialize)]
pub struct Push {
    #[serde(rename = "type")]
    pub ty: &'static str,
    #[serde(rename = "messageId")]
    pub message_id: String,
    #[serde(rename = "meshId")]
    pub mesh_id: String,
    #[serde(rename = "senderPubkey")]
    pub sender_pubkey: String,
    #[serde(rename = "senderMemberPubkey", skip_serializing_if = "Option::is_none")]
    pub sender_member_pubkey: Option<String>,
    #[serde(rename = "senderMemberId", skip_serializing_if = "Option::is_none")]
    pub sender_member_id: Option<String>,
    #[serde(rename = "senderName", skip_serializing_if = "Option::is_none")]
    pub sender_name: Option<String>,
    pub priority: String,
    pub nonce: String,
    pub ciphertext: String,
    #[serde(rename = "createdAt")]
    pub created_at: String,
    #[serde(rename = "targetSpec", skip_serializing_if = "Option::is_none")]
    pub target_spec: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_message_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_fingerprint: Option<String>,
    #[serde(rename = "replyToId", skip_serializing_if = "Option::is_none")]
    pub reply_to_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mentions: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subtype: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<&'static str>,
    #[serde(rename = "eventData", skip_serializing_if = "Option::is_none")]
    pub event_data: Option<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Peer {
    pub pubkey: String,
    #[serde(rename = "memberPubkey")]
    pub member_pubkey: String,
    #[serde(rename = "displayName")]
    pub display_name: String,
    pub status: String,
    pub summary: Option<String>,
    pub groups: Vec<Group>,
    #[serde(rename = "sessionId")]
    pub session_id: String,
    #[serde(rename = "connectedAt")]
    pub connected_at: String,
    pub cwd: Option<String>,
    #[serde(rename = "peerRole")]
    pub peer_role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(rename = "peerType", skip_serializing_if = "Option::is_none")]
    pub peer_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeersList {
    #[serde(rename = "type")]
    pub ty: &'static str,
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
    pub peers: Vec<Peer>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KickAck {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub kicked: Vec<String>,
    pub affected: Vec<String>,
    pub skipped_control_plane: Vec<String>,
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `pong`, the answer to a `ping` frame.
#[derive(Debug, Clone, Serialize)]
pub struct Pong {
    #[serde(rename = "type")]
    pub ty: &'static str,
}

/// Every frame the broker writes to a client.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ServerFrame {
    HelloAck(HelloAck),
    /// A `send`'s answer (and `set_visible`'s).
    Ack(SendAck),
    Error(ErrorFrame),
    /// A delivery or a system event.
    Push(Box<Push>),
    PeersList(PeersList),
    /// `kick_ack` or `disconnect_ack`.
    KickAck(KickAck),
    Pong(Pong),
}

impl ServerFrame {
    pub fn pong() -> ServerFrame {
        ServerFrame::Pong(Pong { ty: "pong" })
    }

    /// The frame's JSON text.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("frames serialize")
    }
}

macro_rules! server_frame_from {
    ($($variant:ident($ty:ty)),*) => {$(
        impl From<$ty> for ServerFrame {
            fn from(frame: $ty) -> Self {
                ServerFrame::$variant(frame)
            }
        }
    )*};
}
server_frame_from!(
    HelloAck(HelloAck),
    Ack(SendAck),
    Error(ErrorFrame),
    PeersList(PeersList),
    KickAck(KickAck)
);

impl From<Push> for ServerFrame {
    fn from(push: Push) -> Self {
        ServerFrame::Push(Box::new(push))
    }
}

/// The ISO-8601 form clients expect: milliseconds, `Z`.
pub fn iso(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_classifies_frames() {
        assert!(matches!(decode("nope"), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode("[1]"), Err(DecodeError::Malformed(_))));
        assert!(matches!(
            decode(r#"{"x":1}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(
            decode(r#"{"type":"warp","_reqId":"r1"}"#).unwrap_err(),
            DecodeError::Unsupported {
                ty: "warp".into(),
                req_id: Some("r1".into())
            }
        );
        assert!(matches!(
            decode(r#"{"type":"send","id":"s1"}"#),
            Err(DecodeError::Invalid { id: Some(_), .. })
        ));
        let r = decode(r#"{"type":"join_group","name":"a/b","_reqId":"q"}"#).unwrap();
        assert_eq!(r.req_id.as_deref(), Some("q"));
        assert!(matches!(r.frame, ClientFrame::JoinGroup(Group { ref name, .. }) if name == "a/b"));
    }

    #[test]
    fn groups_accept_names_and_objects() {
        let r = decode(
            r#"{"type":"hello","meshId":"m","memberId":"x","pubkey":"p","timestamp":1,"signature":"s","groups":["a",{"name":"b","role":"lead"}]}"#,
        )
        .unwrap();
        let ClientFrame::Hello(h) = r.frame else {
            panic!()
        };
        assert_eq!(h.info.groups.len(), 2);
        assert_eq!(h.info.groups[1].role.as_deref(), Some("lead"));
    }
}

/// Hostile input: whatever a client sends, `decode` returns (no panic, no
/// stack overflow), and what it returns is the right refusal class.
#[cfg(test)]
mod hostile {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Valid frames of every type the broker speaks, to mutate.
    fn templates() -> Vec<Value> {
        let key = "ab".repeat(32);
        let sig = "cd".repeat(64);
        vec![
            json!({"type":"hello","meshId":"m","memberId":"x","pubkey":key,"timestamp":1,
                   "signature":sig,"displayName":"d","groups":["a",{"name":"b","role":"r"}],
                   "pid":1,"cwd":"/","sessionId":"s","role":"service","protocolVersion":1}),
            json!({"type":"session_hello","meshId":"m","parentMemberId":"x","parentMemberPubkey":key,
                   "sessionPubkey":key,"parentAttestation":{"sessionPubkey":key,
                   "parentMemberPubkey":key,"expiresAt":2,"signature":sig},
                   "timestamp":1,"signature":sig}),
            json!({"type":"send","id":"s1","targetSpec":"*","priority":"now","nonce":"n",
                   "ciphertext":"c","client_message_id":"k","request_fingerprint":"f",
                   "replyToId":"r","mentions":["a"]}),
            json!({"type":"client_ack","clientMessageId":"k","brokerMessageId":"b"}),
            json!({"type":"nack","brokerMessageId":"b","delay":"5s"}),
            json!({"type":"in_progress","brokerMessageId":"b"}),
            json!({"type":"list_peers","_reqId":"q","roles":["session"]}),
            json!({"type":"set_status","status":"idle"}),
            json!({"type":"set_summary","summary":"s"}),
            json!({"type":"set_visible","visible":false,"_reqId":"q"}),
            json!({"type":"join_group","name":"g","role":"r"}),
            json!({"type":"leave_group","name":"g"}),
            json!({"type":"kick","target":"t","all":true,"stale":5,"_reqId":"q"}),
            json!({"type":"disconnect","target":"t","_reqId":"q"}),
            json!({"type":"ping"}),
        ]
    }

    /// Any JSON value, wrong types, extreme numbers and long strings included.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("JSON numbers are finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            Just(json!(1e308)),
            Just(json!(-1e308)),
            ".{0,40}".prop_map(Value::String),
            (0usize..20_000).prop_map(|n| Value::String("x".repeat(n))),
            "[0-9a-fA-Fg]{60,130}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,12}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Remove(usize),
        Replace(usize, Value),
        Add(String, Value),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            any::<usize>().prop_map(Mutation::Remove),
            (any::<usize>(), any_json()).prop_map(|(i, v)| Mutation::Replace(i, v)),
            (".{0,12}", any_json()).prop_map(|(k, v)| Mutation::Add(k, v)),
        ]
    }

    fn apply(frame: &mut Value, m: &Mutation) {
        let map = frame.as_object_mut().expect("templates are objects");
        let keys: Vec<String> = map.keys().cloned().collect();
        if keys.is_empty() {
            if let Mutation::Replace(_, v) | Mutation::Add(_, v) = m {
                map.insert("type".into(), v.clone());
            }
            return;
        }
        match m {
            Mutation::Remove(i) => {
                map.remove(&keys[i % keys.len()]);
            }
            Mutation::Replace(i, v) => {
                map.insert(keys[i % keys.len()].clone(), v.clone());
            }
            Mutation::Add(k, v) => {
                map.insert(k.clone(), v.clone());
            }
        }
    }

    /// What `decode` must say about `text`, from the contract alone.
    fn expected_class(text: &str) -> &'static str {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => match map.get("type") {
                Some(Value::String(_)) => "typed",
                _ => "malformed",
            },
            _ => "malformed",
        }
    }

    fn check(text: &str) -> Result<(), TestCaseError> {
        let result = decode(text);
        match expected_class(text) {
            "malformed" => prop_assert!(
                matches!(result, Err(DecodeError::Malformed(_))),
                "{text:.200} decoded as {result:?}"
            ),
            _ => {
                let v: Value = serde_json::from_str(text).expect("parsed above");
                let ty = v["type"].as_str().expect("typed").to_owned();
                let req_id = v.get("_reqId").and_then(Value::as_str).map(str::to_owned);
                match result {
                    Ok(r) => prop_assert_eq!(r.req_id, req_id),
                    Err(DecodeError::Unsupported { ty: t, req_id: r }) => {
                        prop_assert_eq!(t, ty);
                        prop_assert_eq!(r, req_id);
                    }
                    Err(DecodeError::Invalid {
                        ty: t,
                        req_id: r,
                        id,
                        ..
                    }) => {
                        prop_assert_eq!(&t, &ty);
                        prop_assert_eq!(r, req_id);
                        // A refused send's ack echoes its id.
                        let send_id = v.get("id").and_then(Value::as_str).map(str::to_owned);
                        prop_assert_eq!(id, send_id);
                    }
                    Err(DecodeError::Malformed(m)) => {
                        prop_assert!(false, "typed frame refused malformed: {m}")
                    }
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_text_decodes_or_is_refused(text in ".{0,300}") {
            check(&text)?;
        }

        #[test]
        fn arbitrary_bytes_as_text_decode_or_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            check(&String::from_utf8_lossy(&bytes))?;
        }

        #[test]
        fn arbitrary_json_decodes_or_is_refused(v in any_json()) {
            check(&v.to_string())?;
        }

        #[test]
        fn mutated_frames_decode_or_are_refused(
            which in any::<usize>(),
            mutations in prop::collection::vec(mutation(), 1..4),
        ) {
            let templates = templates();
            let mut frame = templates[which % templates.len()].clone();
            for m in &mutations {
                apply(&mut frame, m);
            }
            check(&frame.to_string())?;
        }

        /// Bounds: every stored text field over its bound, or holding
        /// U+0000, is named by the check; within bounds it passes.
        #[test]
        fn send_fields_over_bounds_are_named(
            field in 0usize..6,
            over in 1usize..5000,
            nul in any::<bool>(),
        ) {
            let mut send: SendFrame = serde_json::from_value(json!({
                "targetSpec":"*","nonce":"n","ciphertext":"c"})).unwrap();
            prop_assert!(send.check_bounds().is_ok());
            let (name, max) = [
                ("targetSpec", bounds::TARGET_SPEC),
                ("client_message_id", bounds::CLIENT_ID),
                ("request_fingerprint", bounds::CLIENT_ID),
                ("replyToId", bounds::CLIENT_ID),
                ("mentions", bounds::MENTIONS),
                ("ciphertext", usize::MAX),
            ][field];
            let text = if nul || max == usize::MAX { "a\u{0}b".to_owned() } else { "x".repeat(max + over) };
            match name {
                "targetSpec" => send.target_spec = text,
                "client_message_id" => send.client_message_id = Some(text),
                "request_fingerprint" => send.request_fingerprint = Some(text),
                "replyToId" => send.reply_to_id = Some(text),
                "mentions" => send.mentions = Some(json!([text])),
                _ => send.ciphertext = text,
            }
            let err = send.check_bounds().expect_err("over the bound");
            prop_assert!(err.starts_with(name), "{err}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        for depth in [129, 1_000, 100_000] {
            let text = format!(
                r#"{{"type":"send","targetSpec":"*","mentions":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            assert!(
                matches!(decode(&text), Err(DecodeError::Malformed(_))),
                "depth {depth}"
            );
        }
        // Shallow nesting is data.
        let text = r#"{"type":"send","targetSpec":"*","mentions":[[[["a"]]]]}"#;
        assert!(decode(text).is_ok());
    }

    #[test]
    fn huge_numbers_are_invalid_not_wrapped() {
        for ts in ["1e30", "18446744073709551616", "1.5", "-1e400"] {
            let text = format!(
                r#"{{"type":"hello","meshId":"m","memberId":"x","pubkey":"p","timestamp":{ts},"signature":"s"}}"#
            );
            let r = decode(&text);
            assert!(
                matches!(
                    r,
                    Err(DecodeError::Invalid { .. }) | Err(DecodeError::Malformed(_))
                ),
                "timestamp {ts}: {r:?}"
            );
        }
    }

    #[test]
    fn hello_info_over_bounds_or_with_nul_is_named() {
        let fields = [
            ("displayName", bounds::DISPLAY_NAME),
            ("sessionId", bounds::SESSION_ID),
            ("cwd", bounds::CWD),
            ("hostname", bounds::SHORT_FIELD),
            ("peerType", bounds::SHORT_FIELD),
            ("channel", bounds::SHORT_FIELD),
            ("model", bounds::SHORT_FIELD),
        ];
        for (name, max) in fields {
            for (text, ok) in [
                ("x".repeat(max), true),
                ("x".repeat(max + 1), false),
                ("a\u{0}".into(), false),
            ] {
                let info: ConnectionInfo = serde_json::from_value(json!({ name: text })).unwrap();
                let r = info.check_bounds();
                assert_eq!(r.is_ok(), ok, "{name} of {} bytes: {r:?}", text.len());
                if let Err(e) = r {
                    assert!(e.starts_with(name), "{e}");
                }
            }
        }
        let groups = |n: usize, name: &str, role: &str| -> Vec<Group> {
            (0..n)
                .map(|i| Group {
                    name: format!("{name}{i}"),
                    role: Some(role.to_owned()),
                })
                .collect()
        };
        assert!(check_groups(&groups(bounds::GROUPS, "g", "r")).is_ok());
        assert!(check_groups(&groups(bounds::GROUPS + 1, "g", "r")).is_err());
        assert!(check_groups(&groups(1, &"g".repeat(bounds::GROUP_NAME), "r")).is_err());
        assert!(check_groups(&groups(1, "g\u{0}", "r")).is_err());
        assert!(check_groups(&groups(1, "g", &"r".repeat(bounds::SHORT_FIELD + 1))).is_err());
        // Hostile-looking names are data.
        for name in [
            "a%",
            "a_c",
            "'; DROP TABLE mesh.message; --",
            r"a\b",
            "é/ü",
            "\"q\"",
        ] {
            assert!(check_group_name(name).is_ok(), "{name}");
        }
        assert!(check_group_name("").is_err());
    }
}
