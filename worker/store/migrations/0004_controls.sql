-- Run-time controls every worker obeys (the bandwidth cap), and the live workers that share it.

CREATE TABLE controls (
    id                     boolean     PRIMARY KEY DEFAULT true CHECK (id),
    bandwidth_bytes_per_s  bigint      CHECK (bandwidth_bytes_per_s > 0),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    updated_by             text
);

INSERT INTO controls (id) VALUES (true);

COMMENT ON TABLE controls IS 'One row of settings that take effect while workers run; every worker re-reads it each second.';
COMMENT ON COLUMN controls.id IS 'Always true: the table holds exactly one row.';
COMMENT ON COLUMN controls.bandwidth_bytes_per_s IS 'Upload limit of all workers together, in bytes per second; NULL means no limit.';
COMMENT ON COLUMN controls.updated_at IS 'When a control was last changed.';
COMMENT ON COLUMN controls.updated_by IS 'Who last changed a control (user@host of the CLI), if known.';

CREATE TABLE worker_streams (
    worker_id  text        PRIMARY KEY,
    streams    integer     NOT NULL CHECK (streams >= 0),
    seen_at    timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE worker_streams IS 'One row per running worker: how many uploads it is sending, so the bandwidth limit is split between them.';
COMMENT ON COLUMN worker_streams.worker_id IS 'The worker (host:pid unless named), as in results.worker_id.';
COMMENT ON COLUMN worker_streams.streams IS 'Uploads the worker was sending when it last reported.';
COMMENT ON COLUMN worker_streams.seen_at IS 'When the worker last reported (each second); rows older than a few seconds are ignored.';
