-- Storage parameters for tables that churn: every delivery row is inserted,
-- updated two or more times (claim, then ack, or lease expiry and a new
-- claim) and deleted by the janitor after delivery.retention, so dead tuples
-- pile up far faster than PostgreSQL's defaults assume. The defaults vacuum
-- a table only once 50 rows + 20% of it are dead (autovacuum_vacuum_threshold,
-- autovacuum_vacuum_scale_factor): on a queue of millions of rows that is
-- hundreds of thousands of dead versions the claim query has to step over,
-- and on a small queue it is still a fixed 50 + 20% on top of the live rows.
--
-- fillfactor only affects pages written from now on; existing pages are
-- repacked by VACUUM FULL or CLUSTER, never by this migration.

-- mesh.message_queue: the claim and ack UPDATEs.
--
-- None of the updates the broker makes here is HOT: claim writes
-- claim_expires_at and claim_presence_id (indexed), ack writes delivered_at
-- and dead-lettering writes dead_at (both appear in partial-index
-- predicates, which block HOT exactly like indexed columns). So fillfactor
-- cannot buy HOT updates on this table, and it does not spare index
-- insertions. What the free 20% of each page does buy: heap_update puts the
-- new row version on the same page when it fits, so a claim or an ack
-- dirties one heap page instead of two, needs no free-space-map lookup or
-- relation extension, and keeps a delivery's versions together; the
-- page's dead versions are then pruned opportunistically by later reads and
-- updates of that page, before vacuum gets there.
--
-- Vacuum after 1000 + 2% of the rows are dead instead of 50 + 20%, analyze
-- after 2% (the claim plan depends on how many rows are undelivered, which
-- swings quickly), and let vacuum of this narrow table do five times the
-- default work before it naps.
ALTER TABLE mesh.message_queue SET (
    fillfactor = 80,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_limit = 1000
);

-- mesh.message: inserted once, deleted by the janitor; the only UPDATE
-- clears dedupe_key once, and dedupe_key is indexed, so no update here could
-- be HOT and fillfactor stays at 100 (free space would only be wasted).
-- Deletes leave dead tuples in the heap and, for large ciphertexts, in the
-- TOAST table: vacuum both sooner.
ALTER TABLE mesh.message SET (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05,
    toast.autovacuum_vacuum_scale_factor = 0.05
);

-- mesh.presence: every live connection's row is updated every
-- presence.ping_interval (last_seen_at) and on status, summary, visibility
-- and group changes. None of those columns is indexed or in an index
-- predicate, so these updates can be HOT: no index entries, and the old
-- version is pruned within the page without vacuum -- but only if the page
-- has room for the new version. fillfactor 70 keeps that room. (Do not index
-- last_seen_at: that would make every refresh a non-HOT update.)
ALTER TABLE mesh.presence SET (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05
);

-- mesh.hello_seen: insert-only, then deleted by the sweeper after twice
-- hello_skew, so the whole table turns over every few minutes. No updates:
-- fillfactor stays 100. It stays small, so the base threshold dominates;
-- a lower scale factor keeps its primary key (random signatures) from
-- bloating between vacuums when connection storms make it large.
ALTER TABLE mesh.hello_seen SET (
    autovacuum_vacuum_scale_factor = 0.05
);
