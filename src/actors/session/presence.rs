//! What a connection says about itself — status, summary, visibility,
//! groups, written to its presence row in order with its other frames —
//! and `list_peers`, read from the mesh's presence rows.

use actix::prelude::*;

use super::{error, reject, reply, Ctx, Io, Ready, WsSession};
use crate::actors::registry;
use crate::db::{queries, QueryError};
use crate::error_code::ErrorCode;
use crate::ids::Status;
use crate::protocol::{self, bounds, Group, Peer, PeersList, SendAck};

impl Io {
    pub(super) fn set_status(
        &self,
        ready: &Ready,
        status: &str,
        req_id: Option<String>,
        ctx: &mut Ctx,
    ) {
        let Some(status) = Status::parse(status) else {
            return reject(
                self.metrics(),
                ctx,
                ErrorCode::Invalid,
                "status must be idle, working or dnd",
                req_id,
            );
        };
        let presence_id = ready.presence_id;
        let registry = self.registry.clone();
        self.write_presence(
            ctx,
            async move |conn| queries::set_status(conn, presence_id, status).await,
            move |_| registry.do_send(registry::Changed::Status { presence_id }),
        );
    }

    pub(super) fn set_summary(
        &self,
        ready: &Ready,
        summary: Option<String>,
        req_id: Option<String>,
        ctx: &mut Ctx,
    ) {
        if let Some(Err(e)) = summary
            .as_deref()
            .map(|s| protocol::check_text("summary", s, bounds::SUMMARY))
        {
            return reject(self.metrics(), ctx, ErrorCode::Invalid, e, req_id);
        }
        let presence_id = ready.presence_id;
        self.write_presence(
            ctx,
            async move |conn| queries::set_summary(conn, presence_id, summary.as_deref()).await,
            |_| {},
        );
    }

    pub(super) fn set_visible(
        &self,
        ready: &Ready,
        visible: bool,
        req_id: Option<String>,
        ctx: &mut Ctx,
    ) {
        let presence_id = ready.presence_id;
        let registry = self.registry.clone();
        let ack = SendAck::visibility_set(req_id);
        self.write_presence(
            ctx,
            async move |conn| queries::set_visible(conn, presence_id, visible).await,
            move |ctx| {
                registry.do_send(registry::Changed::Visible {
                    presence_id,
                    visible,
                });
                reply(ctx, ack);
            },
        );
    }

    pub(super) fn join_group(
        &self,
        ready: &mut Ready,
        group: Group,
        req_id: Option<String>,
        ctx: &mut Ctx,
    ) {
        if let Err(e) = protocol::check_group_name(&group.name) {
            return reject(self.metrics(), ctx, ErrorCode::Invalid, e, req_id);
        }
        ready.groups.retain(|g| g.name != group.name);
        ready.groups.push(group);
        if let Err(e) = protocol::check_groups(&ready.groups) {
            ready.groups.pop();
            return reject(self.metrics(), ctx, ErrorCode::Invalid, e, req_id);
        }
        self.save_groups(ready, ctx);
    }

    /// Writes the connection's groups (broadcasts read them from the row).
    pub(super) fn save_groups(&self, ready: &Ready, ctx: &mut Ctx) {
        let presence_id = ready.presence_id;
        let json = serde_json::to_value(&ready.groups).expect("groups serialize");
        self.write_presence(
            ctx,
            async move |conn| queries::set_groups(conn, presence_id, &json).await,
            |_| {},
        );
    }

    /// Runs one presence write, in order with this connection's frames.
    fn write_presence<F>(&self, ctx: &mut Ctx, write: F, then: impl FnOnce(&mut Ctx) + 'static)
    where
        F: AsyncFnOnce(&mut crate::db::PgConn) -> diesel::QueryResult<()> + 'static,
    {
        let pool = self.shared.pool.clone();
        let fut = async move {
            let mut conn = pool.get().await?;
            Ok::<_, QueryError>(write(&mut conn).await?)
        };
        ctx.wait(actix::fut::wrap_future::<_, WsSession>(fut).map(
            move |result, _, ctx| match result {
                Ok(()) => then(ctx),
                Err(e) => {
                    tracing::warn!(error = %e, "presence write failed");
                    error(
                        ctx,
                        ErrorCode::Unavailable,
                        "database unavailable, retry",
                        None,
                    )
                }
            },
        ));
    }

    pub(super) fn list_peers(
        &self,
        ready: &Ready,
        roles: Option<Vec<String>>,
        req_id: Option<String>,
        ctx: &mut Ctx,
    ) {
        let (mesh_id, own_member) = (ready.mesh_id, ready.member.id);
        let pool = self.shared.pool.clone();
        let fut = async move {
            let mut conn = pool.get().await?;
            Ok::<_, QueryError>(queries::listed_presence(&mut conn, mesh_id.0).await?)
        };
        // `wait`, like every other database step of a session: a spawned
        // future holding a pooled connection would be paused by the next
        // `ctx.wait` while that one waits for a pooled connection, and one
        // connection's list_peers flood cannot queue more than one query.
        ctx.wait(actix::fut::wrap_future::<_, WsSession>(fut).map(
            move |result, _, ctx| match result {
                Err(e) => {
                    tracing::warn!(error = %e, "list_peers failed");
                    error(
                        ctx,
                        ErrorCode::Unavailable,
                        "database unavailable, retry",
                        req_id,
                    )
                }
                Ok(rows) => {
                    let peers = rows
                        .into_iter()
                        .filter(|r| r.visible || r.member_id == own_member)
                        .filter(|r| {
                            roles
                                .as_ref()
                                .is_none_or(|roles| roles.iter().any(|x| x == r.role.as_str()))
                        })
                        .map(|r| Peer {
                            pubkey: r
                                .session_pubkey
                                .clone()
                                .unwrap_or_else(|| r.member_pubkey.clone()),
                            member_pubkey: r.member_pubkey,
                            display_name: r.display_name,
                            status: r.status.to_string(),
                            summary: r.summary,
                            groups: serde_json::from_value(r.groups).unwrap_or_default(),
                            session_id: r.session_id,
                            connected_at: protocol::iso(r.connected_at),
                            cwd: r.cwd,
                            peer_role: r.role,
                            hostname: r.hostname,
                            peer_type: r.peer_type,
                            channel: r.channel,
                            model: r.model,
                        })
                        .collect();
                    reply(
                        ctx,
                        PeersList {
                            ty: "peers_list",
                            req_id,
                            peers,
                        },
                    );
                }
            },
        ));
    }
}
