DROP FUNCTION mesh.open_hello(text, uuid, text, text, boolean, bigint, boolean, uuid, text, text,
    text, text, jsonb, bigint, text, text, text, text, text, uuid);
DROP TRIGGER presence_live_delete ON mesh.presence;
DROP TRIGGER presence_live_update ON mesh.presence;
DROP TRIGGER presence_live_insert ON mesh.presence;
DROP FUNCTION mesh.count_live();
DROP TABLE mesh.mesh_live;
