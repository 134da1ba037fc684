-- Indexes the janitor (src/actors/janitor.rs) needs to find what to delete
-- without scanning whole tables on every pass. Each one was weighed against
-- the hot paths:
--
-- Delivered deliveries past delivery.retention, oldest first. The ack UPDATE
-- sets delivered_at; that update was never HOT (delivered_at is already in
-- the predicates of message_queue_claim and message_queue_leases), so this
-- index costs one index insert per ack and loses nothing else.
CREATE INDEX message_queue_delivered ON mesh.message_queue (delivered_at)
    WHERE delivered_at IS NOT NULL;
-- Deliveries past their message's expires_at (message_ttl), in any state.
-- expires_at is written once, at insert.
CREATE INDEX message_queue_expires ON mesh.message_queue (expires_at);
-- Messages past expires_at, and the janitor's resumable walk over all
-- messages (keyset on (expires_at, id)) that finds the ones left without
-- deliveries. Both columns are written once, at insert.
CREATE INDEX message_expires ON mesh.message (expires_at, id);
-- Presence rows of connections closed long ago. disconnected_at is already
-- in the predicates of presence_live and presence_session_id, so the
-- frequent last_seen_at / status updates stay HOT-eligible.
CREATE INDEX presence_closed ON mesh.presence (disconnected_at)
    WHERE disconnected_at IS NOT NULL;
