-- Every runtime query of worker/store/store.py, one named block per Store method.
-- A block starts at a `-- name: <name>` line and runs to the next one; the comment lines
-- right under the name document its parameters. The steps of an image are `-- step:` blocks
-- filled into the `-- template: step` block (see below).

-- name: upgrade_lock
-- Serializes schema upgrades across processes until the transaction ends.
SELECT pg_advisory_xact_lock(7146226081391004417);

-- name: upgrade_applied_versions
-- The versions already applied; empty before the first migration creates the table.
SELECT version FROM schema_migrations ORDER BY version;

-- name: upgrade_schema_exists
SELECT to_regclass('schema_migrations') IS NOT NULL;

-- name: upgrade_record_version
-- $1 version, $2 name
INSERT INTO schema_migrations (version, name) VALUES ($1, $2);

-- name: submit_job
-- $1 job id, $2 name, $3 submitted_by, $4 manifest, $5 manifest_sha256, $6 disk_count,
-- $7 total_bytes, $8 on_failure, $9 not_before,
-- $10 disks: JSON array of objects with the results columns below.
WITH job AS (
    INSERT INTO jobs (id, name, submitted_by, manifest, manifest_sha256, disk_count, total_bytes,
                      on_failure, not_before)
    VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9)
    RETURNING id, submitted_at
), disks AS (
    INSERT INTO results (job_id, disk_index, image_name, source_path, source_size_bytes, spec,
                         glance_image_id, submitted_at, next_attempt_at)
    SELECT job.id, d.disk_index, d.image_name, d.source_path, d.source_size_bytes, d.spec,
           d.glance_image_id, job.submitted_at, job.submitted_at
    FROM job, jsonb_to_recordset($10::jsonb) AS d(
        disk_index integer, image_name text, source_path text, source_size_bytes bigint,
        spec jsonb, glance_image_id uuid)
)
INSERT INTO events (job_id, event, worker_id, detail)
SELECT job.id, 'job.submitted', $3,
       jsonb_build_object('name', $2::text, 'disk_count', $6::integer, 'total_bytes', $7::bigint,
                          'manifest_sha256', $5::text)
FROM job
RETURNING job_id;

-- name: claim
-- $1 worker_id, $2 limit, $3 lease in seconds, $4 ids the worker is already working on
-- (NULL: the caller does not track them, and rows leased to it are not handed back).
-- Oldest job first, then manifest order; rows locked by a concurrent claimer are skipped.
-- A cancelled job's rows are claimed only once started (an image may need cleaning up).
-- Outside its maintenance window a job's pending rows wait; started ones may finish.
-- A row leased to this worker that it is not working on is claimed again: the answer to an
-- earlier claim was lost with its connection, and the row would otherwise wait out its lease.
WITH picked AS (
    SELECT r.id
    FROM results AS r
    JOIN jobs AS j ON j.id = r.job_id
    WHERE r.phase NOT IN ('done', 'failed')
      -- Never a row the worker runs: its lease may have run out in an outage and not yet
      -- been renewed, and taking it again would run the image twice.
      AND ($4::bigint[] IS NULL OR r.id <> ALL($4::bigint[]))
      AND (
        (
          (r.lease_expires_at IS NULL OR r.lease_expires_at < now())
          AND r.next_attempt_at <= now()
          AND (j.cancelled_at IS NULL OR r.phase <> 'pending')
          AND (j.not_before IS NULL OR j.not_before <= now())
          AND (j."window" IS NULL OR r.phase <> 'pending' OR job_window_open(j."window", now()))
        )
        OR (
          $4::bigint[] IS NOT NULL
          AND r.worker_id = $1 AND r.lease_expires_at >= now()
        )
      )
    ORDER BY j.submitted_at, r.job_id, r.disk_index
    LIMIT $2
    FOR UPDATE OF r SKIP LOCKED
), claimed AS (
    UPDATE results AS r
    SET worker_id = $1,
        lease_expires_at = now() + make_interval(secs => $3),
        claimed_at = coalesce(r.claimed_at, now()),
        -- A row still leased to this very worker, which it does not run, is the same attempt:
        -- the answer to its claim was lost. (Rows handed back or finished have no lease; so
        -- have the rows a worker stopped in a database outage, once refund_stopped ran.)
        attempts = CASE WHEN r.worker_id = $1 AND r.lease_expires_at IS NOT NULL
                        THEN r.attempts ELSE r.attempts + 1 END,
        updated_at = now()
    FROM picked
    WHERE r.id = picked.id
    RETURNING r.*
), logged AS (
    INSERT INTO events (job_id, result_id, event, phase_from, phase_to, worker_id, detail)
    SELECT job_id, id, 'image.claimed', phase, phase, worker_id,
           jsonb_build_object('attempts', attempts, 'lease_expires_at', lease_expires_at)
    FROM claimed
)
SELECT claimed.*, j.name AS job_name, j.on_failure AS job_on_failure,
       j.cancelled_at IS NOT NULL AS job_cancelled
FROM claimed
JOIN jobs AS j ON j.id = claimed.job_id
ORDER BY j.submitted_at, claimed.job_id, claimed.disk_index;

-- The statements of one image's steps, one per kind of change (worker/core/changes.py).
-- Each updates the row and appends the step's event in one statement, and shares these rules:
-- The row must still belong to the worker: a lease it was not released from, or a row it
-- finished itself. A reclaimed row has another worker_id, so nothing matches (LeaseLost).
-- A step whose key is already in the events table was written before (the answer was lost
-- with the connection): nothing changes and the row is returned as it stands.
-- Only `finish` takes a row to done or failed: it clears the lease and sets finished_at.
--
-- The rules are written once, in the `step` template; each `-- step:` block below holds
-- only what is its statement's own: the columns it sets, and for a failure the error code and
-- message its event carries (`-- event error: $8, $9`; none otherwise). The loader
-- (worker/store/sql.py) puts each block into the template. Every step's parameters start with
-- $1 result id, $2 worker_id, $3 event, $4 phase (NULL keeps it), $5 request id to append,
-- $6 event detail, $7 the step's key; the block's own follow from $8.

-- template: step
WITH old AS (
    SELECT id, phase FROM results WHERE id = $1 FOR UPDATE
), seen AS (
    SELECT 1 FROM events WHERE step_key = $7::uuid
), updated AS (
    UPDATE results AS r
    SET {columns},
        request_ids = CASE WHEN $5::text IS NULL THEN r.request_ids
                           ELSE array_append(r.request_ids, $5::text) END,
        updated_at = now()
    FROM old
    WHERE r.id = old.id
      AND r.worker_id = $2
      AND (r.lease_expires_at IS NOT NULL OR r.phase IN ('done', 'failed'))
      AND NOT EXISTS (SELECT 1 FROM seen)
    RETURNING r.*, old.phase AS phase_from
), logged AS (
    INSERT INTO events (job_id, result_id, event, phase_from, phase_to, worker_id, error_code,
                        message, detail, step_key)
    SELECT job_id, id, $3, phase_from, phase, $2, {event_error}, $6::jsonb, $7::uuid
    FROM updated
)
SELECT * FROM updated
UNION ALL
SELECT r.*, r.phase AS phase_from
FROM results AS r
WHERE r.id = $1 AND r.worker_id = $2 AND EXISTS (SELECT 1 FROM seen);

-- step: note
-- A step that changes no column of the row: its event, and perhaps a phase it enters.
phase = coalesce($4::text, r.phase)

-- step: mark_created
-- Glance made the image. $8 image_created_at.
phase = coalesce($4::text, r.phase),
image_created_at = $8::timestamptz

-- step: mark_staged
-- The source is staged; its hashes were taken on the way.
-- $8 bytes_staged, $9 staged_at, $10 source_hash_algo, $11 source_hash_value,
-- $12 source_md5 (NULL keeps it).
phase = coalesce($4::text, r.phase),
bytes_staged = $8::bigint,
staged_at = $9::timestamptz,
source_hash_algo = $10::text,
source_hash_value = $11::text,
source_md5 = coalesce($12::text, r.source_md5)

-- step: mark_hashed
-- The source was hashed again (the hash taken while staging was lost).
-- $8 source_hash_algo, $9 source_hash_value, $10 source_md5 (NULL keeps it).
phase = coalesce($4::text, r.phase),
source_hash_algo = $8::text,
source_hash_value = $9::text,
source_md5 = coalesce($10::text, r.source_md5)

-- step: mark_import_requesting
-- The import is about to be asked for under our request id. $8 import_request_id.
phase = coalesce($4::text, r.phase),
import_request_id = $8::text

-- step: mark_import_requested
-- Glance accepted the import. $8 import_request_id, $9 import_requested_at.
phase = coalesce($4::text, r.phase),
import_request_id = $8::text,
import_requested_at = $9::timestamptz

-- step: mark_replaced
-- The image is made again under a new id; the old image's progress is cleared.
-- $8 the new glance_image_id.
phase = coalesce($4::text, r.phase),
glance_image_id = $8::uuid,
bytes_staged = 0,
staged_at = NULL,
import_requested_at = NULL,
import_request_id = NULL

-- template: glance_columns
-- What Glance reported of the image at the end (worker/core/changes.py: GlanceRecord), taken
-- in by mark_failing and finish. $1 glance_status, $2 glance_size, $3 glance_virtual_size,
-- $4 glance_checksum, $5 glance_os_hash_algo, $6 glance_os_hash_value, $7 glance_stores,
-- $8 glance_failed_stores (NULL keeps each).
glance_status = coalesce($1::text, r.glance_status),
glance_size = coalesce($2::bigint, r.glance_size),
glance_virtual_size = coalesce($3::bigint, r.glance_virtual_size),
glance_checksum = coalesce($4::text, r.glance_checksum),
glance_os_hash_algo = coalesce($5::text, r.glance_os_hash_algo),
glance_os_hash_value = coalesce($6::text, r.glance_os_hash_value),
glance_stores = coalesce($7::text[], r.glance_stores),
glance_failed_stores = coalesce($8::text[], r.glance_failed_stores)

-- step: mark_failing
-- The image failed for good: the error (and what the verification found, when it
-- ran) is kept while its half-made image is deleted.
-- $8 error_code, $9 error_message, $10 verification, $11-$18 the glance_columns.
-- event error: $8, $9
phase = coalesce($4::text, r.phase),
error_code = $8::text,
error_message = $9::text,
verification = coalesce($10::text, r.verification),
{glance_columns $11}

-- step: finish
-- The row reaches done or failed ($4): the lease ends and finished_at is set.
-- $8 finished_at (NULL: now, or as it was for a row finished before), $9 error_code,
-- $10 error_message, $11 cleanup, $12 verification, $13-$20 the glance_columns (NULL keeps
-- each of $9-$20).
-- event error: $9, $10
phase = $4::text,
finished_at = coalesce($8::timestamptz, r.finished_at, now()),
lease_expires_at = NULL,
error_code = coalesce($9::text, r.error_code),
error_message = coalesce($10::text, r.error_message),
cleanup = coalesce($11::text, r.cleanup),
verification = coalesce($12::text, r.verification),
{glance_columns $13}

-- name: set_progress
-- $1 result id, $2 worker_id, $3 bytes_staged
UPDATE results
SET bytes_staged = $3, updated_at = now()
WHERE id = $1 AND worker_id = $2 AND lease_expires_at IS NOT NULL;

-- name: heartbeat
-- $1 worker_id, $2 result ids, $3 lease in seconds. Returns the ids still held: the leases it
-- extended, and rows this worker finished (no lease to extend, but nobody took them away).
-- One UPDATE, so that a row whose finish commits while the heartbeat runs is judged by its
-- finished version (a separate SELECT would see the row as it was when the statement began,
-- and report it lost).
UPDATE results
SET lease_expires_at = CASE WHEN phase IN ('done', 'failed') THEN lease_expires_at
                            ELSE now() + make_interval(secs => $3) END
WHERE id = ANY($2::bigint[])
  AND worker_id = $1
  AND (lease_expires_at IS NOT NULL OR phase IN ('done', 'failed'))
RETURNING id;

-- name: release
-- $1 worker_id, $2 result ids, $3 true when the claim is not to count as an attempt (an
-- outage stopped the work). Unfinished rows become claimable again at once.
WITH released AS (
    UPDATE results
    SET lease_expires_at = NULL, updated_at = now(),
        attempts = CASE WHEN $3::boolean THEN greatest(attempts - 1, 0) ELSE attempts END
    WHERE id = ANY($2::bigint[])
      AND worker_id = $1
      AND lease_expires_at IS NOT NULL
      AND phase NOT IN ('done', 'failed')
    RETURNING id, job_id, phase
)
INSERT INTO events (job_id, result_id, event, phase_from, phase_to, worker_id)
SELECT job_id, id, 'image.released', phase, phase, $1
FROM released;

-- name: refund_stopped
-- $1 worker_id, $2 result ids this worker stopped because their leases ran out while the
-- database was away, $3 this call's key (sent again with it after a lost answer).
-- That outage was no image's fault, so it costs no attempt, whoever takes the row up next:
-- a row another worker took over meanwhile has the attempt that takeover counted taken back;
-- a row still leased to this worker is handed back, claimable at once, with its attempt
-- taken back for the next claim to count again. Each row is refunded once: its
-- image.attempt_refunded event carries a key made of $3 and the row's id.
WITH stopped AS (
    SELECT r.id, r.worker_id = $1 AS handed_back, md5($3::uuid::text || r.id::text)::uuid AS key
    FROM results AS r
    WHERE r.id = ANY($2::bigint[])
      AND (r.worker_id <> $1
           OR (r.lease_expires_at IS NOT NULL AND r.phase NOT IN ('done', 'failed')))
      AND NOT EXISTS (
          SELECT 1 FROM events AS e WHERE e.step_key = md5($3::uuid::text || r.id::text)::uuid
      )
    FOR UPDATE OF r
), refunded AS (
    UPDATE results AS r
    SET attempts = greatest(r.attempts - 1, 0),
        lease_expires_at = CASE WHEN stopped.handed_back THEN NULL ELSE r.lease_expires_at END,
        updated_at = now()
    FROM stopped
    WHERE r.id = stopped.id
    RETURNING r.id, r.job_id, r.phase, stopped.handed_back, stopped.key
)
INSERT INTO events (job_id, result_id, event, phase_from, phase_to, worker_id, detail, step_key)
SELECT job_id, id, 'image.attempt_refunded', phase, phase, $1,
       jsonb_build_object('handed_back', handed_back), key
FROM refunded;

-- name: job_summaries
-- $1 job name or NULL for every job, $2 job id (when the reference parses as one) or NULL.
-- may_start: not_before is past and the maintenance window (if any) is open right now.
SELECT j.id AS job_id, j.name, j.submitted_at, j.disk_count, j.total_bytes,
       j.cancelled_at IS NOT NULL AS cancelled,
       coalesce(s.bytes_staged, 0)::bigint AS bytes_staged,
       coalesce(s.bytes_done, 0)::bigint AS bytes_done,
       coalesce(s.counts, '{}'::jsonb) AS counts,
       coalesce(s.started, false) AS started,
       coalesce(s.cleanups_owed, 0)::bigint AS cleanups_owed,
       (j.not_before IS NULL OR j.not_before <= now())
           AND job_window_open(j."window", now()) AS may_start
FROM jobs AS j
LEFT JOIN LATERAL (
    SELECT jsonb_object_agg(per_phase.phase, per_phase.n) AS counts,
           sum(per_phase.staged) AS bytes_staged,
           sum(per_phase.done_bytes) AS bytes_done,
           bool_or(per_phase.started) AS started,
           sum(per_phase.owed) AS cleanups_owed
    FROM (
        SELECT phase, count(*) AS n, sum(bytes_staged) AS staged,
               sum(source_size_bytes) FILTER (WHERE phase = 'done') AS done_bytes,
               bool_or(claimed_at IS NOT NULL) AS started,
               count(*) FILTER (WHERE cleanup = 'owed') AS owed
        FROM results
        WHERE job_id = j.id
        GROUP BY phase
    ) AS per_phase
) AS s ON true
WHERE $1::text IS NULL OR j.name = $1::text OR j.id = $2::uuid
ORDER BY j.submitted_at DESC, j.id;

-- name: result_rows
-- $1 job id
SELECT * FROM results WHERE job_id = $1 ORDER BY disk_index;

-- name: job_vms
-- The rows of a job's OVA and OVF disks (their spec names the VM), in manifest order.
SELECT spec, phase FROM results WHERE job_id = $1 AND spec ? 'appliance' ORDER BY disk_index;

-- name: result_page
-- $1 job id, $2 phases to keep (NULL: every phase), $3 most rows to return (NULL: no cap).
-- `matched` is the number of rows that match before the cap.
SELECT r.*, count(*) OVER () AS matched
FROM results AS r
WHERE r.job_id = $1 AND ($2::text[] IS NULL OR r.phase = ANY($2::text[]))
ORDER BY r.disk_index
LIMIT $3;

-- name: submit_job_lock
-- Serializes submissions until the transaction ends, so that two submits of one manifest at
-- the same moment make one job.
SELECT pg_advisory_xact_lock(7146226081391004418);

-- name: submit_job_same_manifest
-- $1 normalized manifest. The newest job submitted with the same normalized manifest (jsonb
-- equality: key order, spacing and comments do not count).
SELECT id FROM jobs WHERE manifest = $1::jsonb ORDER BY submitted_at DESC, id LIMIT 1;

-- name: find_job_ids
-- $1 job name, $2 job id (when the reference parses as one) or NULL. Newest first.
SELECT id FROM jobs WHERE name = $1 OR id = $2::uuid ORDER BY submitted_at DESC, id;

-- name: events
-- $1 job id or NULL, $2 result id or NULL. Oldest first.
SELECT id, job_id, result_id, at, event, phase_from, phase_to, worker_id, error_code, message,
       detail
FROM events
WHERE ($1::uuid IS NULL OR job_id = $1::uuid)
  AND ($2::bigint IS NULL OR result_id = $2::bigint)
ORDER BY id;

-- name: outstanding
-- Unfinished rows of jobs that are not cancelled, including jobs waiting for not_before,
-- and the started rows of cancelled jobs (they still have an image to clean up).
SELECT count(*)
FROM results AS r
JOIN jobs AS j ON j.id = r.job_id
WHERE r.phase NOT IN ('done', 'failed') AND (j.cancelled_at IS NULL OR r.phase <> 'pending');

-- name: cancelled_results
-- $1 result ids. Those whose job was cancelled (the worker holding them stops and cleans up).
SELECT r.id
FROM results AS r
JOIN jobs AS j ON j.id = r.job_id
WHERE r.id = ANY($1::bigint[]) AND j.cancelled_at IS NOT NULL;

-- name: cancel_job
-- $1 job id, $2 who asked. Marks the job cancelled and fails its rows that never started
-- (no image exists for them); worker_id is cleared so a worker that just claimed one cannot
-- record it any more. Started rows are stopped and cleaned up by the worker holding them (or
-- by the next worker that claims them). Returns the counts; no row when the job is unknown.
WITH job AS (
    UPDATE jobs SET cancelled_at = coalesce(cancelled_at, now())
    WHERE id = $1
    RETURNING id
), not_started AS (
    UPDATE results AS r
    SET phase = 'failed', error_code = 'cancelled',
        error_message = 'job cancelled before this disk started',
        finished_at = now(), worker_id = NULL, lease_expires_at = NULL, updated_at = now()
    FROM job
    WHERE r.job_id = job.id AND r.phase = 'pending'
    RETURNING r.id, r.job_id
), logged_rows AS (
    INSERT INTO events (job_id, result_id, event, phase_from, phase_to, worker_id, error_code,
                        message)
    SELECT job_id, id, 'image.cancelled', 'pending', 'failed', $2, 'cancelled',
           'job cancelled before this disk started'
    FROM not_started
), started AS (
    SELECT count(*) AS n FROM results
    WHERE job_id = $1 AND phase NOT IN ('pending', 'done', 'failed')
), logged_job AS (
    INSERT INTO events (job_id, event, worker_id, detail)
    SELECT job.id, 'job.cancelled', $2,
           jsonb_build_object('not_started', (SELECT count(*) FROM not_started),
                              'in_flight', (SELECT n FROM started))
    FROM job
)
SELECT (SELECT count(*) FROM not_started) AS not_started, (SELECT n FROM started) AS in_flight
FROM job;

-- name: retry_job_failed_rows
-- $1 job id. The job's failed rows, locked for retry_job in the same transaction.
SELECT id, glance_image_id, cleanup FROM results
WHERE job_id = $1 AND phase = 'failed'
ORDER BY id
FOR UPDATE;

-- name: retry_job
-- $1 job id, $2 who asked, $3 row ids and $4 their new Glance image ids (rows whose image was
-- deleted: Glance never accepts a deleted image's id again). Sends the job's failed rows back
-- to the queue (done rows are never touched) and lifts a cancellation. Other rows keep their
-- id: the worker adopts an image kept by on_failure: keep.
-- Returns the number of rows re-queued; no row when the job is unknown.
WITH job AS (
    UPDATE jobs SET cancelled_at = NULL WHERE id = $1 RETURNING id
), old AS (
    SELECT r.id, r.error_code, r.cleanup
    FROM results AS r JOIN job ON job.id = r.job_id
    WHERE r.phase = 'failed'
    FOR UPDATE OF r
), requeued AS (
    UPDATE results AS r
    SET phase = 'pending', error_code = NULL, error_message = NULL, finished_at = NULL,
        verification = NULL, cleanup = NULL, bytes_staged = 0, staged_at = NULL,
        import_requested_at = NULL, import_request_id = NULL, glance_status = NULL,
        glance_size = NULL, glance_virtual_size = NULL, glance_checksum = NULL,
        glance_os_hash_algo = NULL, glance_os_hash_value = NULL, glance_stores = NULL,
        glance_failed_stores = NULL, lease_expires_at = NULL,
        next_attempt_at = now(), updated_at = now(),
        glance_image_id = coalesce(
            (SELECT m.new_id FROM unnest($3::bigint[], $4::uuid[]) AS m (id, new_id)
             WHERE m.id = r.id),
            r.glance_image_id)
    FROM old
    WHERE r.id = old.id
    RETURNING r.id, r.job_id, old.error_code, old.cleanup
), logged_rows AS (
    INSERT INTO events (job_id, result_id, event, phase_from, phase_to, worker_id, detail)
    SELECT job_id, id, 'image.requeued', 'failed', 'pending', $2,
           jsonb_build_object('error_code', error_code, 'cleanup', cleanup)
    FROM requeued
), logged_job AS (
    INSERT INTO events (job_id, event, worker_id, detail)
    SELECT job.id, 'job.retried', $2, jsonb_build_object('requeued', (SELECT count(*) FROM requeued))
    FROM job
)
SELECT (SELECT count(*) FROM requeued) AS requeued FROM job;

-- name: set_pause
-- $1 worker_id, $2 service, $3 reason, $4 since. Written when a breaker opens and each minute.
INSERT INTO worker_pauses (worker_id, service, reason, since)
VALUES ($1, $2, $3, $4)
ON CONFLICT (worker_id, service)
DO UPDATE SET reason = EXCLUDED.reason, since = EXCLUDED.since, updated_at = now();

-- name: clear_pause
-- $1 worker_id, $2 service, or NULL for every service of the worker.
DELETE FROM worker_pauses WHERE worker_id = $1 AND ($2::text IS NULL OR service = $2::text);

-- name: pauses
-- Pauses refreshed in the last few minutes (older rows belong to workers that are gone).
SELECT worker_id, service, reason, since, now() - since AS paused_for
FROM worker_pauses
WHERE updated_at > now() - interval '3 minutes'
ORDER BY since, worker_id, service;

-- name: owed_cleanups
-- $1 limit. Failed rows whose Glance image must still be deleted, oldest first.
SELECT id, job_id, glance_image_id FROM results WHERE cleanup = 'owed' ORDER BY id LIMIT $1;

-- name: cleanup_done
-- $1 result id, $2 worker_id. An owed deletion was done (or the image was already gone).
WITH done AS (
    UPDATE results SET cleanup = 'deleted', cleanup_settled_at = now(), updated_at = now()
    WHERE id = $1 AND cleanup = 'owed'
    RETURNING id, job_id, phase
)
INSERT INTO events (job_id, result_id, event, phase_from, phase_to, worker_id)
SELECT job_id, id, 'image.cleanup_done', phase, phase, $2 FROM done;

-- name: result_exists
-- $1 result id.
SELECT EXISTS (SELECT 1 FROM results WHERE id = $1);

-- name: ping
-- Does the server answer at all (the database breaker's probe)?
SELECT 1;
