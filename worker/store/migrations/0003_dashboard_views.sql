-- Read-only views for dashboards (Grafana and `vmdk-migrate dashboard`): job progress with
-- throughput and ETA, counts by phase, failures by error code, per-image progress.
-- They only read jobs and results; every view and column is documented with COMMENT ON.
-- They live in their own schema so a dashboard's database role can be given these views and
-- nothing else: a view reads its tables with its owner's rights.

CREATE SCHEMA IF NOT EXISTS dashboard;

COMMENT ON SCHEMA dashboard IS 'Read-only views for dashboards (Grafana, vmdk-migrate dashboard) over jobs and results.';

CREATE VIEW dashboard.job_progress AS
WITH per_job AS (
    SELECT job_id,
           count(*) FILTER (WHERE phase = 'pending') AS pending,
           count(*) FILTER (WHERE phase = 'creating') AS creating,
           count(*) FILTER (WHERE phase = 'staging') AS staging,
           count(*) FILTER (WHERE phase = 'importing') AS importing,
           count(*) FILTER (WHERE phase = 'verifying') AS verifying,
           count(*) FILTER (WHERE phase = 'done') AS done,
           count(*) FILTER (WHERE phase = 'failed') AS failed,
           count(*) FILTER (WHERE lease_expires_at > now()) AS leased,
           count(DISTINCT worker_id) FILTER (WHERE lease_expires_at > now()) AS workers,
           sum(source_size_bytes) FILTER (WHERE phase = 'done') AS bytes_done,
           sum(source_size_bytes) FILTER (WHERE phase = 'failed') AS bytes_failed,
           sum(source_size_bytes) FILTER (WHERE phase NOT IN ('done', 'failed')) AS bytes_left,
           sum(bytes_staged) FILTER (WHERE phase NOT IN ('pending', 'done', 'failed'))
               AS bytes_staged_in_progress,
           min(claimed_at) AS started_at,
           max(finished_at) AS last_finished_at
    FROM results
    GROUP BY job_id
), counted AS (
    SELECT j.id AS job_id, j.name, j.submitted_at, j.submitted_by, j.disk_count, j.total_bytes,
           j.not_before, j.cancelled_at,
           coalesce(p.pending, 0) AS pending,
           coalesce(p.creating, 0) AS creating,
           coalesce(p.staging, 0) AS staging,
           coalesce(p.importing, 0) AS importing,
           coalesce(p.verifying, 0) AS verifying,
           coalesce(p.done, 0) AS done,
           coalesce(p.failed, 0) AS failed,
           coalesce(p.leased, 0) AS leased,
           coalesce(p.workers, 0) AS workers,
           coalesce(p.bytes_done, 0)::bigint AS bytes_done,
           coalesce(p.bytes_failed, 0)::bigint AS bytes_failed,
           coalesce(p.bytes_left, 0)::bigint AS bytes_left,
           coalesce(p.bytes_staged_in_progress, 0)::bigint AS bytes_staged_in_progress,
           p.started_at,
           p.last_finished_at
    FROM jobs AS j
    LEFT JOIN per_job AS p ON p.job_id = j.id
), timed AS (
    SELECT c.*,
           c.creating + c.staging + c.importing + c.verifying AS in_progress,
           c.done + c.failed AS finished,
           -- A job is finished when no row is left to work on; it then stops the clock.
           CASE WHEN c.done + c.failed = c.disk_count THEN c.last_finished_at END AS finished_at
    FROM counted AS c
), rated AS (
    SELECT t.*,
           extract(epoch FROM coalesce(t.finished_at, now()) - t.started_at)::float8 AS running_s
    FROM timed AS t
), throughput AS (
    SELECT r.*,
           (r.bytes_done / nullif(r.running_s, 0))::float8 AS throughput_bytes_per_s,
           (r.done * 3600.0 / nullif(r.running_s, 0))::float8 AS images_per_hour
    FROM rated AS r
)
SELECT job_id, name, submitted_at, submitted_by, disk_count, total_bytes, not_before,
       cancelled_at,
       CASE WHEN cancelled_at IS NOT NULL THEN 'cancelled'
            WHEN finished = disk_count THEN 'finished'
            WHEN not_before > now() AND started_at IS NULL THEN 'waiting'
            WHEN started_at IS NOT NULL THEN 'running'
            ELSE 'queued' END AS state,
       pending, creating, staging, importing, verifying, done, failed, in_progress, finished,
       leased, workers,
       CASE WHEN disk_count = 0 THEN 100.0::float8
            ELSE round(100.0 * finished / disk_count, 1)::float8 END AS finished_percent,
       bytes_done, bytes_failed, bytes_left, bytes_staged_in_progress,
       started_at, last_finished_at, finished_at, running_s, throughput_bytes_per_s,
       images_per_hour,
       CASE WHEN finished = disk_count THEN 0.0::float8
            WHEN cancelled_at IS NOT NULL THEN NULL
            ELSE (bytes_left / nullif(throughput_bytes_per_s, 0))::float8 END AS eta_s,
       CASE WHEN finished = disk_count THEN finished_at
            WHEN cancelled_at IS NOT NULL THEN NULL
            ELSE now() + make_interval(secs => bytes_left / nullif(throughput_bytes_per_s, 0))
       END AS eta_at
FROM throughput;

COMMENT ON VIEW dashboard.job_progress IS 'One row per job: counts by phase, bytes done and left, throughput over the job''s running time and the estimated time left.';
COMMENT ON COLUMN dashboard.job_progress.job_id IS 'Job identifier (jobs.id).';
COMMENT ON COLUMN dashboard.job_progress.name IS 'Job name from the manifest.';
COMMENT ON COLUMN dashboard.job_progress.submitted_at IS 'When the job was submitted.';
COMMENT ON COLUMN dashboard.job_progress.submitted_by IS 'Who submitted the job, if known.';
COMMENT ON COLUMN dashboard.job_progress.disk_count IS 'Number of disks (images) in the job.';
COMMENT ON COLUMN dashboard.job_progress.total_bytes IS 'Sum of the source sizes of all disks, in bytes.';
COMMENT ON COLUMN dashboard.job_progress.not_before IS 'No disk of the job is started before this time; NULL means at once.';
COMMENT ON COLUMN dashboard.job_progress.cancelled_at IS 'When the job was cancelled; NULL if not cancelled.';
COMMENT ON COLUMN dashboard.job_progress.state IS 'queued (nothing claimed yet), waiting (not_before is ahead), running, finished (every image done or failed) or cancelled.';
COMMENT ON COLUMN dashboard.job_progress.pending IS 'Images not claimed yet.';
COMMENT ON COLUMN dashboard.job_progress.creating IS 'Images whose Glance record is being created.';
COMMENT ON COLUMN dashboard.job_progress.staging IS 'Images whose bytes are being uploaded to the staging area.';
COMMENT ON COLUMN dashboard.job_progress.importing IS 'Images whose glance-direct import was requested and is being polled.';
COMMENT ON COLUMN dashboard.job_progress.verifying IS 'Images active in Glance whose sizes and hashes are being compared.';
COMMENT ON COLUMN dashboard.job_progress.done IS 'Images migrated and verified (terminal).';
COMMENT ON COLUMN dashboard.job_progress.failed IS 'Images that failed (terminal); see job_failures_by_code.';
COMMENT ON COLUMN dashboard.job_progress.in_progress IS 'Images between pending and a terminal phase: creating + staging + importing + verifying.';
COMMENT ON COLUMN dashboard.job_progress.finished IS 'Images in a terminal phase: done + failed.';
COMMENT ON COLUMN dashboard.job_progress.leased IS 'Images a worker holds a live lease on right now.';
COMMENT ON COLUMN dashboard.job_progress.workers IS 'Distinct workers holding a live lease on an image of the job right now.';
COMMENT ON COLUMN dashboard.job_progress.finished_percent IS 'Share of the job''s images that are done or failed, in percent (one decimal).';
COMMENT ON COLUMN dashboard.job_progress.bytes_done IS 'Source bytes of the images that are done.';
COMMENT ON COLUMN dashboard.job_progress.bytes_failed IS 'Source bytes of the images that failed.';
COMMENT ON COLUMN dashboard.job_progress.bytes_left IS 'Source bytes of the images not finished yet (pending or in progress).';
COMMENT ON COLUMN dashboard.job_progress.bytes_staged_in_progress IS 'Bytes uploaded so far by the images in progress (current attempts).';
COMMENT ON COLUMN dashboard.job_progress.started_at IS 'When a worker first claimed an image of the job; NULL before.';
COMMENT ON COLUMN dashboard.job_progress.last_finished_at IS 'When the latest image of the job reached done or failed.';
COMMENT ON COLUMN dashboard.job_progress.finished_at IS 'When the job''s last image finished; NULL while images are left.';
COMMENT ON COLUMN dashboard.job_progress.running_s IS 'Seconds from started_at to finished_at (or to now while running); NULL before the start.';
COMMENT ON COLUMN dashboard.job_progress.throughput_bytes_per_s IS 'bytes_done divided by running_s: the job''s average rate of migrated bytes per second.';
COMMENT ON COLUMN dashboard.job_progress.images_per_hour IS 'Images done per hour of running time.';
COMMENT ON COLUMN dashboard.job_progress.eta_s IS 'Estimated seconds left: bytes_left at the current throughput; 0 when finished, NULL when cancelled or nothing is done yet.';
COMMENT ON COLUMN dashboard.job_progress.eta_at IS 'Estimated end: now + eta_s, or finished_at when finished; NULL when eta_s is.';

CREATE VIEW dashboard.job_phase_counts AS
SELECT j.id AS job_id, j.name AS job_name, p.phase, p.phase_order,
       count(r.id) AS images,
       coalesce(sum(r.source_size_bytes), 0)::bigint AS bytes
FROM jobs AS j
CROSS JOIN (VALUES ('pending', 1), ('creating', 2), ('staging', 3), ('importing', 4),
                   ('verifying', 5), ('done', 6), ('failed', 7)) AS p (phase, phase_order)
LEFT JOIN results AS r ON r.job_id = j.id AND r.phase = p.phase
GROUP BY j.id, j.name, p.phase, p.phase_order;

COMMENT ON VIEW dashboard.job_phase_counts IS 'One row per job and phase, every phase present (zero when no image is in it).';
COMMENT ON COLUMN dashboard.job_phase_counts.job_id IS 'Job identifier (jobs.id).';
COMMENT ON COLUMN dashboard.job_phase_counts.job_name IS 'Job name from the manifest.';
COMMENT ON COLUMN dashboard.job_phase_counts.phase IS 'pending, creating, staging, importing, verifying, done or failed.';
COMMENT ON COLUMN dashboard.job_phase_counts.phase_order IS 'Position of the phase in the pipeline (pending 1 ... failed 7), for sorting.';
COMMENT ON COLUMN dashboard.job_phase_counts.images IS 'Images of the job in this phase.';
COMMENT ON COLUMN dashboard.job_phase_counts.bytes IS 'Source bytes of those images.';

CREATE VIEW dashboard.job_failures_by_code AS
SELECT r.job_id, j.name AS job_name, coalesce(r.error_code, 'unknown') AS error_code,
       count(*) AS images,
       sum(r.source_size_bytes)::bigint AS bytes,
       max(r.finished_at) AS last_failed_at,
       (array_agg(r.error_message ORDER BY r.finished_at DESC NULLS LAST, r.id DESC))[1]
           AS last_message
FROM results AS r
JOIN jobs AS j ON j.id = r.job_id
WHERE r.phase = 'failed'
GROUP BY r.job_id, j.name, coalesce(r.error_code, 'unknown');

COMMENT ON VIEW dashboard.job_failures_by_code IS 'Failed images per job and error code.';
COMMENT ON COLUMN dashboard.job_failures_by_code.job_id IS 'Job identifier (jobs.id).';
COMMENT ON COLUMN dashboard.job_failures_by_code.job_name IS 'Job name from the manifest.';
COMMENT ON COLUMN dashboard.job_failures_by_code.error_code IS 'Stable error code (worker/errors.py); unknown when a failed row has none.';
COMMENT ON COLUMN dashboard.job_failures_by_code.images IS 'Failed images of the job with this code.';
COMMENT ON COLUMN dashboard.job_failures_by_code.bytes IS 'Source bytes of those images.';
COMMENT ON COLUMN dashboard.job_failures_by_code.last_failed_at IS 'When the latest of them failed.';
COMMENT ON COLUMN dashboard.job_failures_by_code.last_message IS 'Error message of the latest of them.';

CREATE VIEW dashboard.failures_by_code AS
SELECT coalesce(r.error_code, 'unknown') AS error_code,
       count(*) AS images,
       count(DISTINCT r.job_id) AS jobs,
       sum(r.source_size_bytes)::bigint AS bytes,
       max(r.finished_at) AS last_failed_at,
       (array_agg(r.error_message ORDER BY r.finished_at DESC NULLS LAST, r.id DESC))[1]
           AS last_message
FROM results AS r
WHERE r.phase = 'failed'
GROUP BY coalesce(r.error_code, 'unknown');

COMMENT ON VIEW dashboard.failures_by_code IS 'Failed images by error code over every job.';
COMMENT ON COLUMN dashboard.failures_by_code.error_code IS 'Stable error code (worker/errors.py); unknown when a failed row has none.';
COMMENT ON COLUMN dashboard.failures_by_code.images IS 'Failed images with this code, all jobs together.';
COMMENT ON COLUMN dashboard.failures_by_code.jobs IS 'Jobs with at least one such image.';
COMMENT ON COLUMN dashboard.failures_by_code.bytes IS 'Source bytes of those images.';
COMMENT ON COLUMN dashboard.failures_by_code.last_failed_at IS 'When the latest of them failed.';
COMMENT ON COLUMN dashboard.failures_by_code.last_message IS 'Error message of the latest of them.';

CREATE VIEW dashboard.image_progress AS
SELECT r.job_id, j.name AS job_name, r.id AS result_id, r.disk_index, r.image_name,
       r.source_path, r.source_size_bytes, r.phase,
       array_position(ARRAY['pending', 'creating', 'staging', 'importing', 'verifying', 'done',
                            'failed'], r.phase) AS phase_order,
       r.bytes_staged,
       CASE WHEN r.staged_at IS NOT NULL OR r.phase IN ('importing', 'verifying', 'done')
                 OR r.source_size_bytes = 0 THEN 100.0::float8
            ELSE round(100.0 * least(r.bytes_staged, r.source_size_bytes)
                       / r.source_size_bytes, 1)::float8 END AS staged_percent,
       r.attempts, r.worker_id,
       coalesce(r.lease_expires_at > now(), false) AS leased,
       r.claimed_at, r.finished_at, r.updated_at, r.next_attempt_at,
       extract(epoch FROM coalesce(r.finished_at, now()) - r.claimed_at)::float8 AS elapsed_s,
       r.glance_image_id, r.glance_status, r.verification, r.error_code, r.error_message,
       r.cleanup
FROM results AS r
JOIN jobs AS j ON j.id = r.job_id;

COMMENT ON VIEW dashboard.image_progress IS 'One row per image with its job name, upload progress and last error.';
COMMENT ON COLUMN dashboard.image_progress.job_id IS 'Job identifier (jobs.id).';
COMMENT ON COLUMN dashboard.image_progress.job_name IS 'Job name from the manifest.';
COMMENT ON COLUMN dashboard.image_progress.result_id IS 'Row identifier (results.id).';
COMMENT ON COLUMN dashboard.image_progress.disk_index IS 'Position of the disk in the manifest.';
COMMENT ON COLUMN dashboard.image_progress.image_name IS 'Name of the Glance image.';
COMMENT ON COLUMN dashboard.image_progress.source_path IS 'Path of the source VMDK file.';
COMMENT ON COLUMN dashboard.image_progress.source_size_bytes IS 'Size of the source file in bytes.';
COMMENT ON COLUMN dashboard.image_progress.phase IS 'pending, creating, staging, importing, verifying, done or failed.';
COMMENT ON COLUMN dashboard.image_progress.phase_order IS 'Position of the phase in the pipeline (pending 1 ... failed 7), for sorting.';
COMMENT ON COLUMN dashboard.image_progress.bytes_staged IS 'Bytes uploaded to the staging area so far in the current attempt.';
COMMENT ON COLUMN dashboard.image_progress.staged_percent IS 'Upload progress in percent: 100 once staged (or later phases), else bytes_staged over the source size.';
COMMENT ON COLUMN dashboard.image_progress.attempts IS 'How many times a worker has claimed the image.';
COMMENT ON COLUMN dashboard.image_progress.worker_id IS 'Worker holding the lease, or the last one that did.';
COMMENT ON COLUMN dashboard.image_progress.leased IS 'True while a worker holds a live lease on the image.';
COMMENT ON COLUMN dashboard.image_progress.claimed_at IS 'When a worker first claimed the image.';
COMMENT ON COLUMN dashboard.image_progress.finished_at IS 'When the image reached done or failed.';
COMMENT ON COLUMN dashboard.image_progress.updated_at IS 'When the row last changed.';
COMMENT ON COLUMN dashboard.image_progress.next_attempt_at IS 'The image is not claimed before this time (retry back-off).';
COMMENT ON COLUMN dashboard.image_progress.elapsed_s IS 'Seconds from the first claim to finished_at (or to now while unfinished); NULL before a claim.';
COMMENT ON COLUMN dashboard.image_progress.glance_image_id IS 'Id of the Glance image.';
COMMENT ON COLUMN dashboard.image_progress.glance_status IS 'Last image status seen in Glance.';
COMMENT ON COLUMN dashboard.image_progress.verification IS 'verified, transformed, mismatch or not_checked; NULL until verified.';
COMMENT ON COLUMN dashboard.image_progress.error_code IS 'Stable error code of the last failure (final when failed, a retried one otherwise); NULL if none.';
COMMENT ON COLUMN dashboard.image_progress.error_message IS 'Human-readable message of the last failure.';
COMMENT ON COLUMN dashboard.image_progress.cleanup IS 'What happened to the Glance image after a failure: deleted or kept.';

CREATE VIEW dashboard.throughput_per_minute AS
SELECT r.job_id, j.name AS job_name, date_trunc('minute', r.finished_at) AS minute,
       count(*) FILTER (WHERE r.phase = 'done') AS images_done,
       count(*) FILTER (WHERE r.phase = 'failed') AS images_failed,
       coalesce(sum(r.source_size_bytes) FILTER (WHERE r.phase = 'done'), 0)::bigint
           AS bytes_done
FROM results AS r
JOIN jobs AS j ON j.id = r.job_id
WHERE r.phase IN ('done', 'failed') AND r.finished_at IS NOT NULL
GROUP BY r.job_id, j.name, date_trunc('minute', r.finished_at);

COMMENT ON VIEW dashboard.throughput_per_minute IS 'Images finished per job and minute of finished_at: the source of throughput graphs.';
COMMENT ON COLUMN dashboard.throughput_per_minute.job_id IS 'Job identifier (jobs.id).';
COMMENT ON COLUMN dashboard.throughput_per_minute.job_name IS 'Job name from the manifest.';
COMMENT ON COLUMN dashboard.throughput_per_minute.minute IS 'The minute (finished_at truncated) the images finished in.';
COMMENT ON COLUMN dashboard.throughput_per_minute.images_done IS 'Images that reached done in that minute.';
COMMENT ON COLUMN dashboard.throughput_per_minute.images_failed IS 'Images that reached failed in that minute.';
COMMENT ON COLUMN dashboard.throughput_per_minute.bytes_done IS 'Source bytes of the images done in that minute.';
