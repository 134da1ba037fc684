//! An admin member's `kick` / `disconnect`: the registry closes the named
//! connections and the asker gets the list.

use actix::prelude::*;

use super::{reject, reply, Ctx, Io, Ready, WsSession};
use crate::actors::registry;
use crate::error_code::ErrorCode;
use crate::protocol::{KickAck, KickFrame};
use crate::routing::KickSelector;

pub(super) use crate::actors::registry::KickKind;

impl Io {
    pub(super) fn kick(
        &self,
        ready: &Ready,
        k: KickFrame,
        kind: KickKind,
        req_id: Option<String>,
        ctx: &mut Ctx,
    ) {
        if !ready.member.admin {
            return reject(
                self.metrics(),
                ctx,
                ErrorCode::Forbidden,
                "kick and disconnect need an admin member",
                req_id,
            );
        }
        let selector = if k.all == Some(true) {
            KickSelector::All
        } else if let Some(ms) = k.stale {
            KickSelector::Stale(ms)
        } else if let Some(t) = k.target.filter(|t| !t.is_empty()) {
            KickSelector::Target(t)
        } else {
            return reject(
                self.metrics(),
                ctx,
                ErrorCode::Invalid,
                "give target, all or stale",
                req_id,
            );
        };
        let msg = registry::Kick {
            mesh_id: ready.mesh_id,
            asker: ready.presence_id,
            selector,
            kind,
        };
        ctx.wait(
            actix::fut::wrap_future::<_, WsSession>(self.registry.send(msg)).map(
                move |result, _, ctx| {
                    let out = result.unwrap_or_default();
                    reply(
                        ctx,
                        KickAck {
                            ty: match kind {
                                KickKind::Kick => "kick_ack",
                                KickKind::Disconnect => "disconnect_ack",
                            },
                            kicked: out.kicked,
                            affected: out.affected,
                            skipped_control_plane: out.skipped_control_plane,
                            req_id,
                        },
                    );
                },
            ),
        );
    }
}
