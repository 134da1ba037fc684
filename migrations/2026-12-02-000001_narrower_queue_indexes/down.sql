CREATE INDEX message_queue_claim_presence ON mesh.message_queue (claim_presence_id)
    WHERE claim_presence_id IS NOT NULL AND delivered_at IS NULL;
