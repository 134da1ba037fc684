-- The hello's database work in one call, and a mesh's live connections
-- counted without a scan or a mesh-wide lock.
--
-- Before: every hello took a per-mesh exclusive advisory lock, then
-- counted the mesh's live presence rows (a scan that grows with the mesh)
-- and inserted its row, in a transaction of five round trips, after two
-- more statements (and a commit) for replay and member checks. Hellos of
-- one mesh therefore ran one at a time, each slower than the last.

-- Live connections per mesh, spread over a few rows ("shards") so that
-- concurrent hellos and closes of one mesh do not queue on one row lock:
-- the mesh's count is the sum of its rows. Kept by the trigger below on
-- every path that opens or closes a presence row (hello, close, shutdown,
-- the sweeper's reaping, deletes), so no caller can forget it.
CREATE TABLE mesh.mesh_live (
    mesh_id  uuid NOT NULL REFERENCES mesh.mesh(id) ON DELETE CASCADE,
    shard    smallint NOT NULL,
    live     bigint NOT NULL,
    PRIMARY KEY (mesh_id, shard)
);

CREATE FUNCTION mesh.count_live() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta bigint;
    m uuid;
BEGIN
    IF TG_OP = 'INSERT' THEN
        delta := 1; m := NEW.mesh_id;
    ELSIF TG_OP = 'DELETE' THEN
        delta := -1; m := OLD.mesh_id;
    ELSIF OLD.disconnected_at IS NULL THEN
        delta := -1; m := OLD.mesh_id;
    ELSE
        delta := 1; m := NEW.mesh_id;
    END IF;
    -- Any shard will do (only the sum means anything); a random one keeps
    -- simultaneous writers apart.
    INSERT INTO mesh.mesh_live AS l (mesh_id, shard, live)
    VALUES (m, floor(random() * 16)::smallint, delta)
    ON CONFLICT (mesh_id, shard) DO UPDATE SET live = l.live + EXCLUDED.live;
    RETURN NULL;
END
$$;

-- The WHEN clauses keep the frequent updates that do not open or close a
-- connection (last_seen_at, status, summary, groups) from calling it.
CREATE TRIGGER presence_live_insert AFTER INSERT ON mesh.presence
    FOR EACH ROW WHEN (NEW.disconnected_at IS NULL) EXECUTE FUNCTION mesh.count_live();
CREATE TRIGGER presence_live_update AFTER UPDATE OF disconnected_at ON mesh.presence
    FOR EACH ROW WHEN ((OLD.disconnected_at IS NULL) <> (NEW.disconnected_at IS NULL))
    EXECUTE FUNCTION mesh.count_live();
CREATE TRIGGER presence_live_delete AFTER DELETE ON mesh.presence
    FOR EACH ROW WHEN (OLD.disconnected_at IS NULL) EXECUTE FUNCTION mesh.count_live();

-- Brokers of the previous version may be running: hold their hellos and
-- closes off while the counts start, so none falls between the count and
-- the trigger.
LOCK TABLE mesh.presence IN SHARE ROW EXCLUSIVE MODE;
INSERT INTO mesh.mesh_live (mesh_id, shard, live)
SELECT mesh_id, 0, count(*) FROM mesh.presence WHERE disconnected_at IS NULL GROUP BY mesh_id;

-- A hello's database checks and its presence row, in the order of
-- docs/protocol.md §2.4 (steps 5 to 8), in one round trip and one commit.
-- Refusals are answers, not errors, so the recorded signature (step 5)
-- commits whatever follows, as the protocol says.
--
-- The connection cap (step 8) without serialising a mesh's hellos: every
-- transaction runs on its own server backend, so at most `max_connections`
-- hellos are ever in progress at once. A hello that, holding the mesh's
-- lock in SHARED mode, sees a committed count at least that far below the
-- cap cannot take the mesh past it, however many others run beside it:
-- those commit on top of a count one of them saw, each in progress while it
-- was seen. Closer to the cap a hello takes the lock EXCLUSIVE, which waits
-- for every shared holder to commit, so its count is exact; it answers
-- 'near_cap' instead if its shared count turned out too close, and the
-- caller asks again with `p_exclusive` (a shared lock cannot be upgraded
-- without risking a deadlock). The count is read after the lock in a
-- statement of its own: in READ COMMITTED each statement of a VOLATILE
-- function takes a fresh snapshot, so it sees every hello that committed
-- before the lock was granted.
--
-- Outcomes: replayed, unknown (no such member), revoked,
-- member_id_mismatch, key_taken (step 7a), full, near_cap, opened,
-- took_over (opened, taking over a connection inside its grace window).
-- The member's columns come back with every outcome after 'unknown'.
CREATE FUNCTION mesh.open_hello(
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
        -- A closed connection of the same identity inside its grace window
        -- (docs/protocol.md §5.4, the replacement rule of §2.6): its window
        -- ends here and the new connection takes it over silently. Two
        -- statements, so each gets the plan of its own index.
        IF p_role = 'session' THEN
            UPDATE mesh.presence p SET grace_until = NULL
            WHERE p.mesh_id = p_mesh_id AND p.grace_until > now()
              AND p.role = 'session' AND p.session_pubkey = coalesce(p_session_pubkey, '');
        ELSE
            UPDATE mesh.presence p SET grace_until = NULL
            WHERE p.mesh_id = p_mesh_id AND p.grace_until > now()
              AND p.role <> 'session' AND p.member_id = m_id
              AND p.session_id = p_session_id
              AND p.session_pubkey IS NOT DISTINCT FROM p_session_pubkey;
        END IF;
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
