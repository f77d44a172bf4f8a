-- Every query of worker/store/views.py, one named block per Views method: the read-only
-- reads of the dashboard views (migrations/0003_dashboard_views.sql and later) that the web
-- dashboard serves. They name only views of the dashboard schema, never a table.

-- name: jobs
-- $1 at most this many jobs, newest first.
SELECT job_id, name, state, submitted_at, disk_count, total_bytes, pending, creating, staging,
       importing, verifying, done, failed, in_progress, finished, workers, finished_percent,
       bytes_done, bytes_failed, bytes_left, started_at, finished_at, running_s,
       throughput_bytes_per_s, eta_s, eta_at
FROM dashboard.job_progress
ORDER BY submitted_at DESC, job_id
LIMIT $1;

-- name: job_failures
-- $1 job ids. Failed images by job and error code, the commonest code first.
SELECT job_id, error_code, images, last_message
FROM dashboard.job_failures_by_code
WHERE job_id = ANY($1::uuid[])
ORDER BY images DESC, error_code;

-- name: job_exists
-- $1 job id.
SELECT EXISTS (SELECT FROM dashboard.job_progress WHERE job_id = $1);

-- name: images
-- $1 job id, $2 phase (NULL: every phase), $3 at most this many rows, in manifest order.
SELECT result_id, disk_index, image_name, phase, source_size_bytes, bytes_staged,
       staged_percent, attempts, worker_id, leased, elapsed_s, glance_image_id, verification,
       error_code, error_message, cleanup, updated_at
FROM dashboard.image_progress
WHERE job_id = $1 AND ($2::text IS NULL OR phase = $2::text)
ORDER BY disk_index
LIMIT $3;

-- name: image_count
-- $1 job id, $2 phase (NULL: every phase).
SELECT count(*) FROM dashboard.image_progress
WHERE job_id = $1 AND ($2::text IS NULL OR phase = $2::text);
