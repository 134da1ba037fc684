-- Many brokers on one database (docs/cluster.md).

-- One row per broker process ("node"): its heartbeat tells the others it
-- is alive. A node whose heartbeat is older than `cluster.dead_after` is
-- declared dead by another (dead_at), which releases its leases and closes
-- its presence rows with the takeover grace window; a node that finds
-- itself declared dead closes its sockets before it serves on. Every
-- timestamp here is the database's clock.
CREATE TABLE mesh.node (
    id            uuid PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    dead_at       timestamptz,
    listen        text NOT NULL,
    hostname      text NOT NULL,
    pid           integer NOT NULL,
    version       text NOT NULL
);
-- The live nodes, oldest first: the oldest is the leader.
CREATE INDEX node_live ON mesh.node (started_at, id) WHERE dead_at IS NULL;

-- Where notices to a node go (LISTEN/NOTIFY); a channel name is at most
-- 63 bytes, a uuid without dashes 32.
CREATE FUNCTION mesh.node_channel(node uuid) RETURNS text
    LANGUAGE sql IMMUTABLE AS $$ SELECT 'mb_' || replace(node::text, '-', '') $$;

-- Notices sent once per node, not once per item: each item goes to the
-- live nodes its route names other than p_self (route 'member': nodes
-- where the member has a live connection; 'mesh': where the mesh has one;
-- 'presence': the node holding that live connection; 'node': that node),
-- and each node gets one notification carrying all of its items, after
-- p_header. The caller keeps the payload under PostgreSQL's 8000 bytes.
-- Returns how many notifications it sent.
CREATE FUNCTION mesh.notify_nodes(
    p_self uuid, p_header text, p_route text[], p_id uuid[], p_item text[]
) RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    sent integer := 0;
    r record;
BEGIN
    FOR r IN
        WITH items AS (
            SELECT * FROM unnest(p_route, p_id, p_item) AS i(route, id, item)
        ), targets AS (
            SELECT p.broker_node_id AS node, i.item FROM items i
              JOIN mesh.presence p ON p.member_id = i.id AND p.disconnected_at IS NULL
             WHERE i.route = 'member'
            UNION
            SELECT p.broker_node_id, i.item FROM items i
              JOIN mesh.presence p ON p.mesh_id = i.id AND p.disconnected_at IS NULL
             WHERE i.route = 'mesh'
            UNION
            SELECT p.broker_node_id, i.item FROM items i
              JOIN mesh.presence p ON p.id = i.id AND p.disconnected_at IS NULL
             WHERE i.route = 'presence'
            UNION
            SELECT i.id, i.item FROM items i WHERE i.route = 'node'
        )
        SELECT t.node, string_agg(t.item, ' ') AS items FROM targets t
          JOIN mesh.node n ON n.id = t.node AND n.dead_at IS NULL
         WHERE t.node IS DISTINCT FROM p_self
         GROUP BY t.node
    LOOP
        PERFORM pg_notify(mesh.node_channel(r.node), concat_ws(' ', nullif(p_header, ''), r.items));
        sent := sent + 1;
    END LOOP;
    RETURN sent;
END
$$;

-- The routes above, and the node death takeover, by index.
CREATE INDEX presence_live_member ON mesh.presence (member_id) WHERE disconnected_at IS NULL;
CREATE INDEX presence_live_node ON mesh.presence (broker_node_id) WHERE disconnected_at IS NULL;

-- The hello of 2026-12-02-400001, which now also ends a live connection of
-- the same identity on another node (a session reconnecting through the
-- load balancer to another broker replaces its old connection there, as
-- it would on one broker).
CREATE OR REPLACE FUNCTION mesh.open_hello(
    p_signature text,            -- NULL: already recorded (a retry after near_cap)
    p_mesh_id uuid,              -- NULL: the hello's meshId is no uuid
    p_member_pubkey text,
    p_claimed_member_id text,    -- lowercased by the caller; NULL: none claimed
    p_check_session_key boolean, -- a plain hello naming a session key (step 7a)
    p_max_live bigint,
    p_exclusive boolean,
    p_id uuid,
    p_session_id text,
    p_session_pubkey text,
    p_role text,
    p_display_name text,         -- NULL: the member's name
    p_groups jsonb,
    p_pid bigint,
    p_cwd text,
    p_hostname text,
    p_peer_type text,
    p_channel text,
    p_model text,
    p_broker_node_id uuid
) RETURNS TABLE (
    outcome text,
    member_id uuid,
    member_mesh_id uuid,
    member_name text,
    member_pubkey text,
    member_admin boolean,
    member_created_at timestamptz,
    member_revoked_at timestamptz,
    display_name text
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    fresh boolean;
    m_id uuid;
    m_mesh_id uuid;
    m_name text;
    m_pubkey text;
    m_admin boolean;
    m_created_at timestamptz;
    m_revoked_at timestamptz;
    key_taken boolean;
    lock_key bigint := hashtextextended(p_mesh_id::text, 0);
    margin bigint := current_setting('max_connections')::bigint;
    live bigint;
    exclusive boolean := p_exclusive;
    taken integer;
    ended uuid[];
BEGIN
    -- Steps 5 to 7a in one statement (each statement of a function costs an
    -- executor run): the signature recorded, the member, the session key,
    -- and the count that picks the lock. A data-modifying WITH runs to
    -- completion whether or not the rest of the query reads it.
    WITH seen AS (
        INSERT INTO mesh.hello_seen (signature)
        SELECT p_signature WHERE p_signature IS NOT NULL
        ON CONFLICT DO NOTHING
        RETURNING 1
    )
    SELECT p_signature IS NULL OR EXISTS (SELECT 1 FROM seen),
        mm.id, mm.mesh_id, mm.name, mm.pubkey, mm.admin, mm.created_at, mm.revoked_at,
        p_check_session_key AND EXISTS (
            SELECT 1 FROM mesh.presence p
            WHERE p.mesh_id = p_mesh_id AND p.session_pubkey = p_session_pubkey
              AND p.role = 'session' AND p.member_id <> mm.id),
        (SELECT coalesce(sum(l.live), 0) FROM mesh.mesh_live l WHERE l.mesh_id = p_mesh_id)
    INTO fresh, m_id, m_mesh_id, m_name, m_pubkey, m_admin, m_created_at, m_revoked_at,
        key_taken, live
    FROM (SELECT 1) AS one
    LEFT JOIN mesh.member mm ON mm.mesh_id = p_mesh_id AND mm.pubkey = p_member_pubkey;
    IF NOT fresh THEN
        outcome := 'replayed';
    ELSIF m_id IS NULL THEN
        outcome := 'unknown';
    ELSIF m_revoked_at IS NOT NULL THEN
        outcome := 'revoked';
    ELSIF p_claimed_member_id IS NOT NULL AND p_claimed_member_id <> m_id::text THEN
        outcome := 'member_id_mismatch';
    ELSIF key_taken THEN
        outcome := 'key_taken';
    END IF;
    IF outcome IS NULL THEN
        -- Which lock: decided on the count read before taking any.
        exclusive := exclusive OR live + margin >= p_max_live;
        IF exclusive THEN
            PERFORM pg_advisory_xact_lock(lock_key);
        ELSE
            PERFORM pg_advisory_xact_lock_shared(lock_key);
        END IF;
        SELECT coalesce(sum(l.live), 0) INTO live FROM mesh.mesh_live l
        WHERE l.mesh_id = p_mesh_id;
        IF live >= p_max_live THEN
            outcome := 'full';
        ELSIF NOT exclusive AND live + margin >= p_max_live THEN
            outcome := 'near_cap';
        END IF;
    END IF;
    IF outcome IS NULL THEN
        -- The connections of the same identity (docs/protocol.md §2.6) that
        -- this hello ends: a closed one inside its grace window (§5.4), whose
        -- window ends here, and a live one on another node, closed here
        -- without a window (its node is told to drop the socket; a dead
        -- node's socket is gone already). Either way the new connection
        -- takes over silently. Live ones on this node are the registry's
        -- to replace. Two statements, so each gets the plan of its own index.
        IF p_role = 'session' THEN
            SELECT array_agg(p.id) INTO ended FROM mesh.presence p
            WHERE p.mesh_id = p_mesh_id
              AND p.role = 'session' AND p.session_pubkey = coalesce(p_session_pubkey, '')
              AND (p.grace_until > now()
                   OR (p.disconnected_at IS NULL AND p.broker_node_id <> p_broker_node_id));
        ELSE
            SELECT array_agg(p.id) INTO ended FROM mesh.presence p
            WHERE p.mesh_id = p_mesh_id
              AND p.role <> 'session' AND p.member_id = m_id
              AND p.session_id = p_session_id
              AND p.session_pubkey IS NOT DISTINCT FROM p_session_pubkey
              AND (p.grace_until > now()
                   OR (p.disconnected_at IS NULL AND p.broker_node_id <> p_broker_node_id));
        END IF;
        -- Sent when this commits, and only then.
        PERFORM pg_notify(mesh.node_channel(p.broker_node_id), 'r' || p.id)
        FROM mesh.presence p WHERE p.id = ANY(ended) AND p.disconnected_at IS NULL;
        UPDATE mesh.presence p
        SET grace_until = NULL, disconnected_at = coalesce(p.disconnected_at, now())
        WHERE p.id = ANY(ended);
        GET DIAGNOSTICS taken = ROW_COUNT;
        INSERT INTO mesh.presence (id, mesh_id, member_id, session_id, session_pubkey, role,
            display_name, groups, pid, cwd, hostname, peer_type, channel, model, broker_node_id)
        VALUES (p_id, p_mesh_id, m_id, p_session_id, p_session_pubkey, p_role,
            coalesce(p_display_name, m_name), p_groups, p_pid, p_cwd, p_hostname, p_peer_type,
            p_channel, p_model, p_broker_node_id);
        outcome := CASE WHEN taken > 0 THEN 'took_over' ELSE 'opened' END;
    END IF;
    member_id := m_id;
    member_mesh_id := m_mesh_id;
    member_name := m_name;
    member_pubkey := m_pubkey;
    member_admin := m_admin;
    member_created_at := m_created_at;
    member_revoked_at := m_revoked_at;
    display_name := coalesce(p_display_name, m_name);
    RETURN NEXT;
END
$$;
