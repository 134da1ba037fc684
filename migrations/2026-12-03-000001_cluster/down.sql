-- Removes what this migration added. mesh.open_hello keeps the version
-- defined here, with mesh.node_channel which it calls: on one node it
-- behaves as the previous one did.
DROP INDEX mesh.presence_live_node;
DROP INDEX mesh.presence_live_member;
DROP FUNCTION mesh.notify_nodes(uuid, text, text[], uuid[], text[]);
DROP TABLE mesh.node;
