-- Every query of worker/store/controls.py, one named block per Controls method: the run-time
-- controls (the bandwidth cap) and the uploads each live worker reports, which split it.

-- name: bandwidth_limit
-- The cap of all workers together in bytes per second; NULL means none.
SELECT bandwidth_bytes_per_s FROM controls WHERE id;

-- name: set_bandwidth_limit
-- $1 cap in bytes per second (NULL lifts it), $2 who set it
UPDATE controls SET bandwidth_bytes_per_s = $1, updated_at = now(), updated_by = $2 WHERE id;

-- name: report_streams
-- One statement a second per worker: report our uploads, read the cap and everyone else's.
-- $1 worker_id, $2 uploads it sends now, $3 seconds within which a report counts as live
WITH reported AS (
    INSERT INTO worker_streams (worker_id, streams, seen_at) VALUES ($1, $2, now())
    ON CONFLICT (worker_id) DO UPDATE SET streams = EXCLUDED.streams, seen_at = now()
)
SELECT (SELECT bandwidth_bytes_per_s FROM controls WHERE id) AS limit_bytes_per_s,
       (SELECT coalesce(sum(streams), 0) FROM worker_streams
         WHERE worker_id <> $1 AND seen_at > now() - make_interval(secs => $3)) AS others;

-- name: forget_streams
-- $1 worker_id: a worker that stops takes its uploads out of the split at once.
DELETE FROM worker_streams WHERE worker_id = $1;
