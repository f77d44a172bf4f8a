-- Every query of worker/store/views.py, one named block per Views method: the read-only
-- reads of the dashboard views (migrations/0003_dashboard_views.sql and later) that the web
-- dashboard and `status --watch` show. They name only views of the dashboard schema, never a
-- table, so a role granted that schema alone can run them.

-- name: jobs
-- $1 at most this many jobs, newest first: counts from job_progress, bytes from job_bytes.
SELECT p.job_id, p.name, p.state, p.submitted_at, p.disk_count, b.total_bytes, p.pending,
       p.creating, p.staging, p.importing, p.verifying, p.done, p.failed, p.in_progress,
       p.finished, p.workers, p.finished_percent, b.bytes_moved, b.bytes_done,
       b.bytes_in_flight, b.bytes_failed, b.bytes_to_move, b.moved_percent, p.started_at,
       p.finished_at, p.running_s
FROM dashboard.job_progress AS p
JOIN dashboard.job_bytes AS b USING (job_id)
ORDER BY p.submitted_at DESC, p.job_id
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

-- name: job_bytes
-- Bytes moved, in flight, failed and still to move of every job: sampled a second or so
-- apart, bytes_moved gives each job's current rate.
SELECT job_id, name, total_bytes, bytes_moved, bytes_done, bytes_in_flight, bytes_failed,
       bytes_to_move, moved_percent
FROM dashboard.job_bytes
ORDER BY job_id;

-- name: job_vms
-- The disks of these jobs' OVA and OVF sources (their spec names the VM), in manifest order.
-- $1 the job ids.
SELECT job_id, jsonb_build_object('appliance', spec -> 'appliance')::text AS spec, phase
FROM results
WHERE job_id = ANY($1::uuid[]) AND spec ? 'appliance'
ORDER BY job_id, disk_index;
