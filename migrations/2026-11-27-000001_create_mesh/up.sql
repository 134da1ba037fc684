-- meshbroker's schema: meshes, members, presence, messages and the delivery
-- queue. Everything lives in schema `mesh` so the broker can share a database.

CREATE SCHEMA IF NOT EXISTS mesh;

CREATE TABLE mesh.mesh (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 256),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE mesh.member (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    mesh_id     uuid NOT NULL REFERENCES mesh.mesh(id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 256),
    pubkey      text NOT NULL CHECK (pubkey ~ '^[0-9a-f]{64}$'),
    admin       boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    UNIQUE (mesh_id, pubkey)
);

-- One row per connection, kept after it closes (disconnected_at) so a
-- session pubkey stays "known" for store-and-forward and the grace window
-- can be served from the database.
CREATE TABLE mesh.presence (
    id               uuid PRIMARY KEY,
    mesh_id          uuid NOT NULL REFERENCES mesh.mesh(id) ON DELETE CASCADE,
    member_id        uuid NOT NULL REFERENCES mesh.member(id) ON DELETE CASCADE,
    session_id       text NOT NULL,
    session_pubkey   text,
    role             text NOT NULL DEFAULT 'session'
                     CHECK (role IN ('control-plane', 'session', 'service')),
    display_name     text NOT NULL,
    status           text NOT NULL DEFAULT 'idle' CHECK (status IN ('idle', 'working', 'dnd')),
    summary          text,
    groups           jsonb NOT NULL DEFAULT '[]'::jsonb,
    visible          boolean NOT NULL DEFAULT true,
    pid              bigint,
    cwd              text,
    hostname         text,
    peer_type        text,
    channel          text,
    model            text,
    broker_node_id   uuid NOT NULL,
    connected_at     timestamptz NOT NULL DEFAULT now(),
    last_seen_at     timestamptz NOT NULL DEFAULT now(),
    disconnected_at  timestamptz,
    -- While set, a closed connection is still listed and can be taken over;
    -- the sweeper announces peer_left and clears it when it passes.
    grace_until      timestamptz
);
CREATE INDEX presence_live ON mesh.presence (mesh_id) WHERE disconnected_at IS NULL;
CREATE INDEX presence_grace ON mesh.presence (grace_until) WHERE grace_until IS NOT NULL;
CREATE INDEX presence_session_pubkey ON mesh.presence (mesh_id, session_pubkey)
    WHERE session_pubkey IS NOT NULL;
CREATE INDEX presence_session_id ON mesh.presence (session_id) WHERE disconnected_at IS NULL;

-- The message payload, stored once however many recipients it has.
CREATE TABLE mesh.message (
    id                     uuid PRIMARY KEY,
    mesh_id                uuid NOT NULL REFERENCES mesh.mesh(id) ON DELETE CASCADE,
    sender_member_id       uuid NOT NULL REFERENCES mesh.member(id) ON DELETE CASCADE,
    sender_session_pubkey  text,
    sender_name            text NOT NULL,
    target_spec            text NOT NULL,
    priority               text NOT NULL CHECK (priority IN ('now', 'next', 'low')),
    nonce                  text NOT NULL,
    ciphertext             text NOT NULL,
    reply_to_id            text,
    mentions               jsonb,
    client_message_id      text,
    request_fingerprint    text,
    -- client_message_id while its idempotency window is open; cleared after,
    -- so the unique index below only holds keys inside the window.
    dedupe_key             text,
    created_at             timestamptz NOT NULL DEFAULT now(),
    expires_at             timestamptz NOT NULL
);
CREATE UNIQUE INDEX message_idempotency ON mesh.message (sender_member_id, dedupe_key);
CREATE INDEX message_dedupe_open ON mesh.message (created_at) WHERE dedupe_key IS NOT NULL;

-- One row per recipient delivery. Kept narrow (the payload is in
-- mesh.message) so the claim and ack UPDATEs stay cheap.
CREATE TABLE mesh.message_queue (
    id                    bigserial PRIMARY KEY,
    message_id            uuid NOT NULL REFERENCES mesh.message(id) ON DELETE CASCADE,
    mesh_id               uuid NOT NULL,
    recipient_member_id   uuid NOT NULL REFERENCES mesh.member(id) ON DELETE CASCADE,
    -- NULL: any connection of the member may take it. Otherwise the key of
    -- the one connection it is for: its session pubkey, or 'sid:'||session_id.
    recipient_key         text,
    priority              text NOT NULL,
    created_at            timestamptz NOT NULL,
    expires_at            timestamptz NOT NULL,
    -- Not pushed before this (a nack with a delay).
    not_before            timestamptz NOT NULL DEFAULT '-infinity',
    claimed_at            timestamptz,
    claim_id              uuid,
    claim_expires_at      timestamptz,
    claim_presence_id     uuid,
    claim_node_id         uuid,
    attempts              integer NOT NULL DEFAULT 0,
    delivered_at          timestamptz,
    dead_at               timestamptz,
    dead_reason           text
);
-- The claim query: a member's undelivered rows, oldest first.
CREATE INDEX message_queue_claim ON mesh.message_queue (recipient_member_id, created_at, id)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
-- The sweeper: leases that may have run out.
CREATE INDEX message_queue_leases ON mesh.message_queue (claim_expires_at)
    WHERE claim_expires_at IS NOT NULL AND delivered_at IS NULL;
CREATE INDEX message_queue_claim_presence ON mesh.message_queue (claim_presence_id)
    WHERE claim_presence_id IS NOT NULL AND delivered_at IS NULL;
CREATE INDEX message_queue_message ON mesh.message_queue (message_id);

-- Accepted hello signatures inside the skew window, to refuse replays.
CREATE TABLE mesh.hello_seen (
    signature  text PRIMARY KEY,
    seen_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX hello_seen_at ON mesh.hello_seen (seen_at);
