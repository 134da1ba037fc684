//! The hello: verified offline first (signatures, clock), then against the
//! database together with writing its presence row (replay, member,
//! revocation, the mesh's connection cap: one call), then registered with
//! the registry, which answers with the member's drain. Only then is
//! `hello_ack` sent.

use actix::prelude::*;
use uuid::Uuid;

use super::{refuse, reply, Ctx, Ready, State, WsSession};
use crate::actors::conn::ConnHandle;
use crate::actors::registry::{self, Arrival, ConnEntry};
use crate::db::queries::HelloPresence;
use crate::error_code::ErrorCode;
use crate::handshake::{self, HelloKind, Opened, Refusal};
use crate::ids::{MemberId, MeshId, PresenceId};
use crate::protocol::{HelloAck, MemberProfile};
use crate::routing::connection_key;

fn unavailable() -> Refusal {
    Refusal::new(ErrorCode::Unavailable, "database unavailable, retry")
}

impl WsSession {
    pub(super) fn hello(&mut self, kind: HelloKind, ctx: &mut Ctx) {
        let cfg = self.io.shared.config();
        let claims =
            match handshake::verify_offline(&kind, chrono::Utc::now().timestamp_millis(), &cfg) {
                Ok(c) => c,
                Err(refusal) => return refuse(&self.io, ctx, refusal),
            };
        let presence_id = PresenceId::new();
        self.state = State::AwaitingHello {
            verifying: Some(presence_id),
        };
        let shared = self.io.shared.clone();
        let registry = self.io.registry.clone();
        let handle = ConnHandle::new(&ctx.address(), self.io.backlog.clone());
        let last_seen = self.io.last_seen.clone();
        let fut = async move {
            let mut conn = shared.pool.get().await.map_err(|e| {
                tracing::warn!(error = %e, "hello refused: no database connection");
                unavailable()
            })?;
            let info = &claims.info;
            let session_id = info
                .session_id
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| Uuid::new_v4().to_string());
            let row = HelloPresence {
                id: presence_id.0,
                session_id: session_id.clone(),
                session_pubkey: claims.session_pubkey.clone(),
                role: claims.role,
                display_name: info.display_name.clone().filter(|s| !s.is_empty()),
                groups: serde_json::to_value(&info.groups).expect("groups serialize"),
                pid: info.pid,
                cwd: info.cwd.clone(),
                hostname: info.hostname.clone(),
                peer_type: info.peer_type.clone(),
                channel: info.channel.clone(),
                model: info.model.clone(),
                broker_node_id: shared.node_id.0,
            };
            if let Ok(mesh_id) = claims.mesh_id.parse() {
                registry
                    .send(registry::SettleCloses {
                        mesh_id: MeshId(mesh_id),
                        member_pubkey: claims.member_pubkey.clone(),
                        role: claims.role,
                        session_id: session_id.clone(),
                        session_pubkey: claims.session_pubkey.clone(),
                    })
                    .await
                    .map_err(|_| Refusal::new(ErrorCode::Unavailable, "broker is shutting down"))?;
            }
            let cap = i64::from(shared.config().limits.max_connections_per_mesh);
            let Opened {
                member,
                display_name,
                silent,
            } = handshake::open(&mut conn, &claims, &row, cap).await?;
            let arrival = if silent {
                Arrival::TakeOver
            } else {
                Arrival::New
            };
            drop(conn);
            let entry = ConnEntry {
                presence_id,
                mesh_id: MeshId(member.mesh_id),
                member_id: MemberId(member.id),
                member_pubkey: member.pubkey.clone(),
                role: claims.role,
                key: connection_key(claims.session_pubkey.as_deref(), &session_id),
                session_id,
                session_pubkey: claims.session_pubkey.clone(),
                display_name: display_name.clone(),
                visible: true,
                handle,
                last_seen,
            };
            let drain = registry
                .send(registry::Connect { entry, arrival })
                .await
                .map_err(|_| Refusal::new(ErrorCode::Unavailable, "broker is shutting down"))?;
            Ok::<_, Refusal>(Ready {
                presence_id,
                mesh_id: MeshId(member.mesh_id),
                member,
                role: claims.role,
                session_pubkey: claims.session_pubkey,
                display_name,
                groups: claims.info.groups,
                drain,
                pipeline: Default::default(),
            })
        };
        // `wait`: no other frame of this connection is handled before its
        // hello is answered.
        ctx.wait(fut.into_actor(self).map(|result, act, ctx| {
            act.state = State::AwaitingHello { verifying: None };
            match result {
                Err(refusal) => refuse(&act.io, ctx, refusal),
                Ok(ready) => {
                    reply(
                        ctx,
                        HelloAck {
                            ty: "hello_ack",
                            presence_id: ready.presence_id.to_string(),
                            member_display_name: ready.display_name.clone(),
                            member_profile: MemberProfile {
                                role_tag: None,
                                groups: ready.groups.clone(),
                                message_mode: "push",
                            },
                            peer_role: ready.role,
                            protocol_version: 1,
                            req_id: None,
                        },
                    );
                    act.io.metrics().connection_opened(ready.role);
                    act.state = State::Ready(Box::new(ready));
                }
            }
        }));
    }
}
