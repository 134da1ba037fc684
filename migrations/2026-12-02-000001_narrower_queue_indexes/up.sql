-- Every claim writes claim_presence_id, so every claim inserted an entry
-- into this index (claims cannot be HOT updates): one index insertion of
-- the ~6 each claim pays, for a lookup that runs once per closed
-- connection. The close's release now finds its rows through the member's
-- undelivered rows (message_queue_claim), like the give-back of unpushed
-- claims, and the shutdown's release through the leased rows
-- (message_queue_leases).
DROP INDEX mesh.message_queue_claim_presence;
