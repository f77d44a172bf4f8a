-- True progress: the bytes each job has moved, counted during uploads as well as after them,
-- so that a dashboard's bar and rate follow the bytes rather than the images finished.
-- An image moves its bytes while it stages (bytes_staged); once staged, in import, verified
-- or done it has moved all of them. A failed image has moved nothing that counts, and
-- neither has a pending one (an earlier attempt's upload is not kept).

CREATE VIEW dashboard.job_bytes AS
WITH per_image AS (
    SELECT r.job_id, r.phase, r.source_size_bytes,
           CASE WHEN r.phase IN ('pending', 'failed') THEN 0
                WHEN r.phase IN ('importing', 'verifying', 'done') OR r.staged_at IS NOT NULL
                    THEN r.source_size_bytes
                ELSE least(r.bytes_staged, r.source_size_bytes) END AS moved
    FROM results AS r
), per_job AS (
    SELECT j.id AS job_id, j.name,
           coalesce(sum(p.source_size_bytes), 0)::bigint AS total_bytes,
           coalesce(sum(p.moved), 0)::bigint AS bytes_moved,
           coalesce(sum(p.moved) FILTER (WHERE p.phase = 'done'), 0)::bigint AS bytes_done,
           coalesce(sum(p.moved) FILTER (WHERE p.phase NOT IN ('done', 'failed')), 0)::bigint
               AS bytes_in_flight,
           coalesce(sum(p.source_size_bytes) FILTER (WHERE p.phase = 'failed'), 0)::bigint
               AS bytes_failed,
           coalesce(sum(p.source_size_bytes - p.moved) FILTER (WHERE p.phase <> 'failed'), 0)
               ::bigint AS bytes_to_move
    FROM jobs AS j
    LEFT JOIN per_image AS p ON p.job_id = j.id
    GROUP BY j.id, j.name
)
SELECT job_id, name, total_bytes, bytes_moved, bytes_done, bytes_in_flight, bytes_failed,
       bytes_to_move,
       CASE WHEN total_bytes = 0 THEN 100.0::float8
            ELSE round(100.0 * bytes_moved / total_bytes, 1)::float8 END AS moved_percent
FROM per_job;

COMMENT ON VIEW dashboard.job_bytes IS 'One row per job: the source bytes moved so far (uploads in progress included), failed and still to move. Sampled a second or so apart, bytes_moved gives the current rate.';
COMMENT ON COLUMN dashboard.job_bytes.job_id IS 'Job identifier (jobs.id).';
COMMENT ON COLUMN dashboard.job_bytes.name IS 'Job name from the manifest.';
COMMENT ON COLUMN dashboard.job_bytes.total_bytes IS 'Sum of the source sizes of the job''s images, in bytes: bytes_moved + bytes_failed + bytes_to_move.';
COMMENT ON COLUMN dashboard.job_bytes.bytes_moved IS 'Bytes moved: all of each image that is staged, importing, verifying or done, and bytes_staged of each image uploading now.';
COMMENT ON COLUMN dashboard.job_bytes.bytes_done IS 'Bytes of the images that are done (part of bytes_moved).';
COMMENT ON COLUMN dashboard.job_bytes.bytes_in_flight IS 'Bytes moved by the images in progress (part of bytes_moved).';
COMMENT ON COLUMN dashboard.job_bytes.bytes_failed IS 'Source bytes of the images that failed: they will not move unless the job is retried.';
COMMENT ON COLUMN dashboard.job_bytes.bytes_to_move IS 'Bytes still to move: the images pending, and the rest of those uploading now.';
COMMENT ON COLUMN dashboard.job_bytes.moved_percent IS 'bytes_moved over total_bytes, in percent (one decimal); 100 for a job without bytes.';
