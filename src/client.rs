//! A small, real protocol client over awc WebSockets: the one implementation
//! behind `meshbroker client listen|send` and the integration tests.
//!
//! Frames are built by pure functions ([`hello_frame`], [`session_hello_frame`])
//! so a caller can tamper with any field before sending it; [`Connection`]
//! only moves JSON over the socket, answers pings, and sorts what arrives.
//!
//! Everything here runs inside an actix `System` (awc is single-threaded).
//!
//! `wss://` URLs trust the system's certificate bundle unless [`trust`]
//! names other authorities (a private CA, as the tests use).

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use awc::ws::{CloseReason, Frame, Message};
use ed25519_dalek::SigningKey;
use futures_util::{Sink, SinkExt as _, Stream, StreamExt as _};
use serde_json::{json, Value};

use crate::{crypto, tls};

/// How long `hello_ack` may take (the contract's client deadline).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the `ack` of a `send` may take.
pub const SEND_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames this client accepts; larger than any broker frame limit.
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// What `wss://` connections of this process trust, once [`trust`] set it.
static TRUSTED: RwLock<Option<Arc<rustls::ClientConfig>>> = RwLock::new(None);

/// Makes `wss://` connections opened from now on trust only the
/// certificates in the PEM file `ca_file` (a CA, or the broker's
/// self-signed certificate).
pub fn trust(ca_file: &std::path::Path) -> anyhow::Result<()> {
    let config = tls::client_config(Some(ca_file))?;
    *TRUSTED.write().expect("trust lock") = Some(config);
    Ok(())
}

/// An HTTP client for `url` (`ws://`, `wss://`, `http://` or `https://`)
/// that trusts what [`trust`] named for TLS.
pub fn http_client(url: &str) -> anyhow::Result<awc::Client> {
    let client = awc::Client::builder().timeout(Duration::from_secs(10));
    Ok(match tls_for(url)? {
        Some(tls) => client
            .connector(awc::Connector::new().rustls_0_23(tls))
            .finish(),
        None => client.finish(),
    })
}

/// The TLS configuration for `url`, `None` without TLS.
fn tls_for(url: &str) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    if !(url.starts_with("wss://") || url.starts_with("https://")) {
        return Ok(None);
    }
    if let Some(config) = TRUSTED.read().expect("trust lock").clone() {
        return Ok(Some(config));
    }
    Ok(Some(tls::client_config(None).context(
        "wss:// without a trusted CA; name one (meshbroker client --ca-file)",
    )?))
}

/// Milliseconds since the Unix epoch, the unit of hello timestamps.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A member's identity: what a `hello` is signed with.
#[derive(Clone)]
pub struct Credentials {
    pub mesh_id: String,
    pub member_id: String,
    pub key: SigningKey,
}

impl Credentials {
    /// From a secret key in libsodium's 128-hex layout or as a bare 64-hex seed.
    pub fn from_secret_hex(mesh_id: &str, member_id: &str, secret: &str) -> anyhow::Result<Self> {
        Ok(Credentials {
            mesh_id: mesh_id.to_owned(),
            member_id: member_id.to_owned(),
            key: crypto::parse_secret_key(secret)?,
        })
    }

    /// The member's public key, 64 lowercase hex.
    pub fn pubkey(&self) -> String {
        crypto::public_hex(&self.key)
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("mesh_id", &self.mesh_id)
            .field("member_id", &self.member_id)
            .field("pubkey", &self.pubkey())
            .finish_non_exhaustive()
    }
}

/// The optional parts of both hellos.
#[derive(Debug, Clone, Default)]
pub struct HelloOptions {
    pub session_id: Option<String>,
    pub display_name: Option<String>,
    /// `hello` only: `"service"` (extension); ignored by `session_hello`.
    pub role: Option<String>,
    /// `hello` only: the claudemesh CLI's command connections carry one.
    pub session_pubkey: Option<String>,
    /// Group names (`"a/b"`), sent as `{"name":…}` objects.
    pub groups: Vec<String>,
    pub pid: Option<i64>,
    pub cwd: Option<String>,
    pub hostname: Option<String>,
}

fn put_options(frame: &mut Value, opts: &HelloOptions) {
    let map = frame.as_object_mut().expect("hello frames are objects");
    if let Some(v) = &opts.session_id {
        map.insert("sessionId".into(), json!(v));
    }
    if let Some(v) = &opts.display_name {
        map.insert("displayName".into(), json!(v));
    }
    if let Some(v) = opts.pid {
        map.insert("pid".into(), json!(v));
    }
    if let Some(v) = &opts.cwd {
        map.insert("cwd".into(), json!(v));
    }
    if let Some(v) = &opts.hostname {
        map.insert("hostname".into(), json!(v));
    }
    if !opts.groups.is_empty() {
        let groups: Vec<Value> = opts.groups.iter().map(|g| json!({ "name": g })).collect();
        map.insert("groups".into(), Value::Array(groups));
    }
}

/// A signed `hello` (member key) at `timestamp_ms`.
pub fn hello_frame(creds: &Credentials, opts: &HelloOptions, timestamp_ms: i64) -> Value {
    let pubkey = creds.pubkey();
    let message = crypto::hello_message(&creds.mesh_id, &creds.member_id, &pubkey, timestamp_ms);
    let mut frame = json!({
        "type": "hello",
        "meshId": creds.mesh_id,
        "memberId": creds.member_id,
        "pubkey": pubkey,
        "protocolVersion": 1,
        "capabilities": [],
        "timestamp": timestamp_ms,
        "signature": crypto::sign_hex(&creds.key, &message),
    });
    if let Some(role) = &opts.role {
        frame["role"] = json!(role);
    }
    if let Some(sp) = &opts.session_pubkey {
        frame["sessionPubkey"] = json!(sp);
    }
    put_options(&mut frame, opts);
    frame
}

/// The attestation a member gives one session key, valid until `expires_at_ms`.
pub fn attestation(creds: &Credentials, session_pubkey: &str, expires_at_ms: i64) -> Value {
    let parent = creds.pubkey();
    let message = crypto::attestation_message(&parent, session_pubkey, expires_at_ms);
    json!({
        "sessionPubkey": session_pubkey,
        "parentMemberPubkey": parent,
        "expiresAt": expires_at_ms,
        "signature": crypto::sign_hex(&creds.key, &message),
    })
}

/// A signed `session_hello`: `session_key` attested by the member until
/// `attestation_expires_ms`, signing at `timestamp_ms`.
pub fn session_hello_frame(
    creds: &Credentials,
    session_key: &SigningKey,
    attestation_expires_ms: i64,
    opts: &HelloOptions,
    timestamp_ms: i64,
) -> Value {
    let parent = creds.pubkey();
    let session_pubkey = crypto::public_hex(session_key);
    let message =
        crypto::session_hello_message(&creds.mesh_id, &parent, &session_pubkey, timestamp_ms);
    let mut frame = json!({
        "type": "session_hello",
        "meshId": creds.mesh_id,
        "parentMemberId": creds.member_id,
        "parentMemberPubkey": parent,
        "sessionPubkey": session_pubkey,
        "parentAttestation": attestation(creds, &session_pubkey, attestation_expires_ms),
        "timestamp": timestamp_ms,
        "signature": crypto::sign_hex(session_key, &message),
    });
    put_options(&mut frame, opts);
    frame
}

/// A fresh session key.
pub fn generate_session_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

/// What [`Connection::recv`] yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One JSON text frame (text that is not JSON arrives as a JSON string).
    Frame(Value),
    /// The broker closed (code `None` when the socket just ended).
    Closed { code: Option<u16>, reason: String },
    /// Nothing arrived in time.
    Timeout,
}

/// True for a `push` with `subtype == "system"` (presence events).
pub fn is_system_push(frame: &Value) -> bool {
    frame["type"] == "push" && frame["subtype"] == "system"
}

trait WsIo:
    Stream<Item = Result<Frame, awc::error::WsProtocolError>>
    + Sink<Message, Error = awc::error::WsProtocolError>
    + Unpin
{
}
impl<T> WsIo for T where
    T: Stream<Item = Result<Frame, awc::error::WsProtocolError>>
        + Sink<Message, Error = awc::error::WsProtocolError>
        + Unpin
{
}

/// One WebSocket connection to the broker.
pub struct Connection {
    io: Box<dyn WsIo>,
    /// Frames read while waiting for another kind; handed out first.
    pending: VecDeque<Value>,
    /// Set once the broker closed; every later `recv` repeats it.
    closed: Option<(Option<u16>, String)>,
    /// A fragmented text message being reassembled.
    partial: Option<Vec<u8>>,
    /// Answer the broker's pings (off only to test the broker's keepalive).
    pub auto_pong: bool,
    /// Headers of the 101 response.
    pub response_headers: Vec<(String, String)>,
    /// Counter for generated `id`s and `_reqId`s.
    next_id: u64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("pending", &self.pending.len())
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

/// Accepts `ws://host:port/ws`, `http://…`, or a bare `ws://host:port`.
pub fn ws_url(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    let url = if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        url.to_owned()
    };
    let after_scheme = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    if after_scheme.contains('/') {
        url
    } else {
        format!("{url}/ws")
    }
}

impl Connection {
    /// Opens the WebSocket (no hello).
    pub async fn connect(url: &str) -> anyhow::Result<Connection> {
        Self::connect_with_headers(url, &[]).await
    }

    /// Opens the WebSocket with extra request headers (no hello).
    pub async fn connect_with_headers(
        url: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Connection> {
        let url = ws_url(url);
        let mut request = http_client(&url)?
            .ws(url.as_str())
            .max_frame_size(MAX_FRAME);
        for (name, value) in headers {
            request = request.set_header(*name, *value);
        }
        let (response, framed) = request
            .connect()
            .await
            .map_err(|e| anyhow!("cannot open WebSocket {url}: {e}"))?;
        let response_headers = response
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        Ok(Connection {
            io: Box::new(framed),
            pending: VecDeque::new(),
            closed: None,
            partial: None,
            auto_pong: true,
            response_headers,
            next_id: 0,
        })
    }

    /// The value of a 101 response header, if present.
    pub fn response_header(&self, name: &str) -> Option<&str> {
        self.response_headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub async fn send_json(&mut self, frame: &Value) -> anyhow::Result<()> {
        self.send_text(&frame.to_string()).await
    }

    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.io
            .send(Message::Text(text.to_owned().into()))
            .await
            .context("WebSocket send failed")
    }

    /// Queues a text frame without writing it out: a load generator writes
    /// a window of frames with one syscall, then calls [`Connection::flush`].
    /// The next `send_*` or `flush` writes it.
    pub async fn feed_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.io
            .feed(Message::Text(text.to_owned().into()))
            .await
            .context("WebSocket send failed")
    }

    /// Writes out every frame queued by [`Connection::feed_text`].
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.io.flush().await.context("WebSocket send failed")
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.io
            .send(Message::Binary(bytes.into()))
            .await
            .context("WebSocket send failed")
    }

    /// Sends a WebSocket ping.
    pub async fn ping(&mut self) -> anyhow::Result<()> {
        self.io
            .send(Message::Ping(bytes::Bytes::from_static(b"client")))
            .await
            .context("WebSocket send failed")
    }

    /// Next event: a buffered frame first, else one from the socket.
    pub async fn recv(&mut self, timeout: Duration) -> anyhow::Result<Event> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(Event::Frame(frame));
        }
        self.recv_socket(timeout).await
    }

    /// Next event from the socket itself, answering pings on the way.
    async fn recv_socket(&mut self, timeout: Duration) -> anyhow::Result<Event> {
        if let Some((code, reason)) = &self.closed {
            return Ok(Event::Closed {
                code: *code,
                reason: reason.clone(),
            });
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.io.next()).await {
                Err(_) => return Ok(Event::Timeout),
                Ok(next) => next,
            };
            let frame = match next {
                None => return Ok(self.mark_closed(None, "connection ended".into())),
                Some(Err(e)) => {
                    return Ok(self.mark_closed(None, format!("protocol error: {e}")));
                }
                Some(Ok(frame)) => frame,
            };
            match frame {
                Frame::Text(bytes) => return Ok(Event::Frame(parse_text(&bytes))),
                Frame::Binary(bytes) => {
                    return Ok(Event::Frame(json!({ "binary": hex::encode(&bytes) })));
                }
                Frame::Continuation(item) => {
                    use actix_http::ws::Item;
                    match item {
                        Item::FirstText(b) | Item::FirstBinary(b) => {
                            self.partial = Some(b.to_vec());
                        }
                        Item::Continue(b) => {
                            if let Some(p) = &mut self.partial {
                                p.extend_from_slice(&b);
                            }
                        }
                        Item::Last(b) => {
                            let mut all = self.partial.take().unwrap_or_default();
                            all.extend_from_slice(&b);
                            return Ok(Event::Frame(parse_text(&all)));
                        }
                    }
                }
                Frame::Ping(payload) => {
                    if self.auto_pong {
                        let _ = self.io.send(Message::Pong(payload)).await;
                    }
                }
                Frame::Pong(_) => {}
                Frame::Close(reason) => {
                    let (code, text) = match reason {
                        Some(CloseReason { code, description }) => {
                            (Some(u16::from(code)), description.unwrap_or_default())
                        }
                        None => (None, String::new()),
                    };
                    // Echo the close as the protocol asks; the socket is done either way.
                    let _ = self.io.send(Message::Close(None)).await;
                    return Ok(self.mark_closed(code, text));
                }
            }
        }
    }

    fn mark_closed(&mut self, code: Option<u16>, reason: String) -> Event {
        self.closed = Some((code, reason.clone()));
        Event::Closed { code, reason }
    }

    /// True once the broker closed this connection.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Waits for the first frame `matches` accepts; every other frame is
    /// kept, in order, for later calls. Fails on a close or when `timeout`
    /// passes.
    pub async fn expect_where(
        &mut self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        if let Some(i) = self.pending.iter().position(&matches) {
            return Ok(self.pending.remove(i).expect("index is in range"));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_socket(left).await? {
                Event::Frame(frame) if matches(&frame) => return Ok(frame),
                Event::Frame(frame) => self.pending.push_back(frame),
                Event::Closed { code, reason } => {
                    bail!(
                        "expected {what}, but the connection closed (code {code:?}, reason {reason:?}); \
                         unread frames: {:?}",
                        self.pending
                    )
                }
                Event::Timeout => bail!(
                    "expected {what} within {timeout:?}, got nothing; unread frames: {:?}",
                    self.pending
                ),
            }
        }
    }

    /// The next frame of type `ty`; for `push`, the next that is not a
    /// system push (those stay buffered for [`Connection::expect_system`]).
    pub async fn expect(&mut self, ty: &str, timeout: Duration) -> anyhow::Result<Value> {
        let what = format!("a {ty:?} frame");
        self.expect_where(&what, timeout, |f| f["type"] == ty && !is_system_push(f))
            .await
    }

    /// The next system push with this `event` (`peer_joined`, `peer_left`, …).
    pub async fn expect_system(&mut self, event: &str, timeout: Duration) -> anyhow::Result<Value> {
        let what = format!("a system push {event:?}");
        self.expect_where(&what, timeout, |f| is_system_push(f) && f["event"] == event)
            .await
    }

    /// Waits for the broker to close; frames arriving first are kept.
    pub async fn expect_close(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<(Option<u16>, String)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_socket(left).await? {
                Event::Closed { code, reason } => return Ok((code, reason)),
                Event::Timeout => bail!(
                    "expected the connection to close within {timeout:?}; unread frames: {:?}",
                    self.pending
                ),
                Event::Frame(frame) => self.pending.push_back(frame),
            }
        }
    }

    /// Every frame (system pushes included) that arrives within `window`,
    /// after any already buffered; stops early on a close.
    pub async fn drain_for(&mut self, window: Duration) -> anyhow::Result<Vec<Value>> {
        let mut frames: Vec<Value> = self.pending.drain(..).collect();
        let deadline = tokio::time::Instant::now() + window;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(frames);
            }
            match self.recv_socket(left).await? {
                Event::Frame(frame) => frames.push(frame),
                Event::Closed { .. } | Event::Timeout => return Ok(frames),
            }
        }
    }

    /// Sends a `send` frame (adding an `id` when it has none) and returns its `ack`.
    pub async fn send_frame(&mut self, mut frame: Value) -> anyhow::Result<Value> {
        if frame.get("id").is_none() {
            self.next_id += 1;
            frame["id"] = json!(format!(
                "c{}-{}",
                self.next_id,
                uuid::Uuid::new_v4().simple()
            ));
        }
        let id = frame["id"].clone();
        self.send_json(&frame).await?;
        self.expect_where("the send's ack", SEND_ACK_TIMEOUT, |f| {
            f["type"] == "ack" && f["id"] == id
        })
        .await
    }

    /// Sends `text` as the opaque ciphertext to `target` and returns the `ack`.
    pub async fn send_message(
        &mut self,
        target: &str,
        text: &str,
        priority: &str,
        client_message_id: Option<&str>,
    ) -> anyhow::Result<Value> {
        let mut frame = send_frame(target, text, priority);
        if let Some(cmid) = client_message_id {
            frame["client_message_id"] = json!(cmid);
        }
        self.send_frame(frame).await
    }

    /// Acknowledges a push (`brokerMessageId` = its `messageId`).
    pub async fn ack(&mut self, push: &Value) -> anyhow::Result<()> {
        let mut frame = json!({
            "type": "client_ack",
            "brokerMessageId": push["messageId"],
        });
        if let Some(cmid) = push.get("client_message_id") {
            frame["clientMessageId"] = cmid.clone();
        }
        self.send_json(&frame).await
    }

    /// A request answered by a frame carrying the same `_reqId`.
    pub async fn request(&mut self, mut frame: Value, timeout: Duration) -> anyhow::Result<Value> {
        self.next_id += 1;
        let req_id = format!("r{}-{}", self.next_id, uuid::Uuid::new_v4().simple());
        frame["_reqId"] = json!(req_id);
        self.send_json(&frame).await?;
        let what = format!("the answer to {}", frame["type"]);
        self.expect_where(&what, timeout, |f| f["_reqId"] == req_id.as_str())
            .await
    }

    /// `list_peers`, optionally narrowed to roles; returns the `peers` array.
    pub async fn list_peers(&mut self, roles: Option<&[&str]>) -> anyhow::Result<Vec<Value>> {
        let mut frame = json!({ "type": "list_peers" });
        if let Some(roles) = roles {
            frame["roles"] = json!(roles);
        }
        let answer = self.request(frame, Duration::from_secs(3)).await?;
        if answer["type"] != "peers_list" {
            bail!("expected peers_list, got {answer}");
        }
        Ok(answer["peers"].as_array().cloned().unwrap_or_default())
    }

    /// `set_status` (no reply).
    pub async fn set_status(&mut self, status: &str) -> anyhow::Result<()> {
        self.send_json(&json!({ "type": "set_status", "status": status }))
            .await
    }

    /// Closes with 1000 and waits briefly for the broker's answer.
    pub async fn close(mut self) -> anyhow::Result<()> {
        if self.closed.is_some() {
            return Ok(());
        }
        self.io
            .send(Message::Close(Some(awc::ws::CloseCode::Normal.into())))
            .await
            .context("WebSocket close failed")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.io.next()).await {
                Ok(Some(Ok(Frame::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => break,
                Ok(Some(Ok(_))) => {}
            }
        }
        Ok(())
    }
}

fn parse_text(bytes: &[u8]) -> Value {
    let text = String::from_utf8_lossy(bytes);
    serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.into_owned()))
}

/// The error code of a refused send's `ack`: what its `error` starts with
/// (`"unavailable: …"` → `"unavailable"`); `"?"` when there is none.
pub fn refusal_code(ack: &Value) -> &str {
    ack["error"]
        .as_str()
        .and_then(|e| e.split(':').next())
        .unwrap_or("?")
}

/// A `send` frame with opaque `nonce`/`ciphertext` (no `id` yet).
pub fn send_frame(target: &str, text: &str, priority: &str) -> Value {
    json!({
        "type": "send",
        "targetSpec": target,
        "priority": priority,
        "nonce": format!("n{}", uuid::Uuid::new_v4().simple()),
        "ciphertext": text,
    })
}

/// Opens a connection and completes a `hello`; returns it with the `hello_ack`.
pub async fn hello(
    url: &str,
    creds: &Credentials,
    opts: &HelloOptions,
) -> anyhow::Result<(Connection, Value)> {
    let frame = hello_frame(creds, opts, now_ms());
    handshake(url, &frame).await
}

/// Opens a connection and completes a `session_hello` for `session_key`
/// (attested for one hour); returns it with the `hello_ack`.
pub async fn session_hello(
    url: &str,
    creds: &Credentials,
    session_key: &SigningKey,
    opts: &HelloOptions,
) -> anyhow::Result<(Connection, Value)> {
    let now = now_ms();
    let frame = session_hello_frame(creds, session_key, now + 3_600_000, opts, now);
    handshake(url, &frame).await
}

/// Sends an already built hello frame and waits for `hello_ack`; a refusal
/// becomes an error naming its code.
pub async fn handshake(url: &str, frame: &Value) -> anyhow::Result<(Connection, Value)> {
    let mut conn = Connection::connect(url).await?;
    conn.send_json(frame).await?;
    let answer = conn
        .expect_where("hello_ack", HELLO_TIMEOUT, |f| {
            f["type"] == "hello_ack" || f["type"] == "error"
        })
        .await?;
    if answer["type"] == "error" {
        bail!(
            "hello refused: {}: {}",
            answer["code"].as_str().unwrap_or("?"),
            answer["message"].as_str().unwrap_or("")
        );
    }
    Ok((conn, answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        let (_, secret) = crypto::generate_keypair();
        Credentials::from_secret_hex("mesh", "member", &secret).unwrap()
    }

    #[test]
    fn hello_frame_verifies() {
        let c = creds();
        let f = hello_frame(
            &c,
            &HelloOptions {
                groups: vec!["a/b".into()],
                ..Default::default()
            },
            42,
        );
        let msg = crypto::hello_message("mesh", "member", &c.pubkey(), 42);
        assert!(crypto::verify_hex(
            &c.pubkey(),
            &msg,
            f["signature"].as_str().unwrap()
        ));
        assert_eq!(f["groups"][0]["name"], "a/b");
    }

    #[test]
    fn session_hello_frame_verifies() {
        let c = creds();
        let sk = generate_session_key();
        let sp = crypto::public_hex(&sk);
        let f = session_hello_frame(&c, &sk, 1000, &HelloOptions::default(), 7);
        let att = &f["parentAttestation"];
        let am = crypto::attestation_message(&c.pubkey(), &sp, 1000);
        assert!(crypto::verify_hex(
            &c.pubkey(),
            &am,
            att["signature"].as_str().unwrap()
        ));
        let hm = crypto::session_hello_message("mesh", &c.pubkey(), &sp, 7);
        assert!(crypto::verify_hex(
            &sp,
            &hm,
            f["signature"].as_str().unwrap()
        ));
    }

    #[test]
    fn urls_are_normalised() {
        assert_eq!(ws_url("ws://h:1/ws"), "ws://h:1/ws");
        assert_eq!(ws_url("http://h:1"), "ws://h:1/ws");
        assert_eq!(ws_url("ws://h:1/"), "ws://h:1/ws");
    }
}
