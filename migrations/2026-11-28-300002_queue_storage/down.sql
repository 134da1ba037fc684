ALTER TABLE mesh.hello_seen RESET (autovacuum_vacuum_scale_factor);
ALTER TABLE mesh.presence RESET (
    fillfactor,
    autovacuum_vacuum_scale_factor,
    autovacuum_analyze_scale_factor
);
ALTER TABLE mesh.message RESET (
    autovacuum_vacuum_scale_factor,
    autovacuum_analyze_scale_factor,
    toast.autovacuum_vacuum_scale_factor
);
ALTER TABLE mesh.message_queue RESET (
    fillfactor,
    autovacuum_vacuum_threshold,
    autovacuum_vacuum_scale_factor,
    autovacuum_analyze_threshold,
    autovacuum_analyze_scale_factor,
    autovacuum_vacuum_cost_limit
);
