//! Wire frames of `../shared/protocol.md`: what clients send (decoded into
//! [`ClientFrame`]) and what the broker sends back (typed, serialized).
//!
//! Field names follow the contract exactly, camelCase and snake_case mixed
//! as claudemesh has them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::Role;

/// Longest accepted text of each free-form field; longer is refused `invalid`.
pub mod bounds {
    pub const DISPLAY_NAME: usize = 256;
    pub const SESSION_ID: usize = 256;
    pub const CWD: usize = 4096;
    pub const SHORT_FIELD: usize = 256;
    pub const SUMMARY: usize = 2048;
    pub const GROUP_NAME: usize = 128;
    pub const GROUPS: usize = 64;
    pub const TARGET_SPEC: usize = 512;
    pub const CLIENT_ID: usize = 256;
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
            if value.as_deref().is_some_and(|v| v.len() > max) {
                return Err(format!("{name} is longer than {max} bytes"));
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
        if g.role
            .as_deref()
            .is_some_and(|r| r.len() > bounds::SHORT_FIELD)
        {
            return Err(format!(
                "group role is longer than {} bytes",
                bounds::SHORT_FIELD
            ));
        }
    }
    Ok(())
}

pub fn check_group_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > bounds::GROUP_NAME {
        return Err(format!(
            "group name must be 1 to {} bytes",
            bounds::GROUP_NAME
        ));
    }
    Ok(())
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
    pub fn new(code: &str, message: impl Into<String>, req_id: Option<String>) -> Self {
        ErrorFrame {
            ty: "error",
            code: code.to_owned(),
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
    pub fn queued(id: String, message_id: String, duplicate: bool, recipients: u32) -> Self {
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
    pub fn refused(id: String, code: &str, text: &str) -> Self {
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
