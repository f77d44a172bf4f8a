-- The first schema: jobs, one results row per image (also the work queue), and an event log.
-- These tables are read by dashboards: every column is documented with COMMENT ON COLUMN.

CREATE TABLE schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE schema_migrations IS 'Migrations applied to this database, one row per file in worker/store/migrations.';
COMMENT ON COLUMN schema_migrations.version IS 'Number of the migration file (0001_initial.sql is 1).';
COMMENT ON COLUMN schema_migrations.name IS 'Name of the migration file without number and extension.';
COMMENT ON COLUMN schema_migrations.applied_at IS 'When the migration was applied.';

CREATE TABLE jobs (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    name            text        NOT NULL,
    submitted_at    timestamptz NOT NULL DEFAULT now(),
    submitted_by    text,
    manifest        jsonb       NOT NULL,
    manifest_sha256 text        NOT NULL,
    disk_count      integer     NOT NULL CHECK (disk_count >= 0),
    total_bytes     bigint      NOT NULL CHECK (total_bytes >= 0),
    on_failure      text        NOT NULL DEFAULT 'delete' CHECK (on_failure IN ('delete', 'keep')),
    not_before      timestamptz,
    cancelled_at    timestamptz
);

COMMENT ON TABLE jobs IS 'One row per submitted manifest.';
COMMENT ON COLUMN jobs.id IS 'Job identifier, shown by the CLI and used in every log line of the job.';
COMMENT ON COLUMN jobs.name IS 'Job name from the manifest; not unique (a manifest may be submitted again).';
COMMENT ON COLUMN jobs.submitted_at IS 'When the job was submitted; jobs are worked on in this order.';
COMMENT ON COLUMN jobs.submitted_by IS 'Who submitted the job (operator or system name), if known.';
COMMENT ON COLUMN jobs.manifest IS 'The normalized manifest as validated at submission.';
COMMENT ON COLUMN jobs.manifest_sha256 IS 'SHA-256 (hex) of the manifest file as submitted.';
COMMENT ON COLUMN jobs.disk_count IS 'Number of disks (results rows) in the job.';
COMMENT ON COLUMN jobs.total_bytes IS 'Sum of the source sizes of all disks, in bytes.';
COMMENT ON COLUMN jobs.on_failure IS 'What to do with a half-made Glance image when a disk fails: delete or keep.';
COMMENT ON COLUMN jobs.not_before IS 'No disk of the job is started before this time; NULL means at once.';
COMMENT ON COLUMN jobs.cancelled_at IS 'When the job was cancelled; its unfinished disks are no longer claimed. NULL if not cancelled.';

CREATE TABLE results (
    id                   bigserial   PRIMARY KEY,
    job_id               uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    disk_index           integer     NOT NULL,
    image_name           text        NOT NULL,
    source_path          text        NOT NULL,
    source_size_bytes    bigint      NOT NULL CHECK (source_size_bytes >= 0),
    spec                 jsonb       NOT NULL DEFAULT '{}',
    phase                text        NOT NULL DEFAULT 'pending'
        CHECK (phase IN ('pending', 'creating', 'staging', 'importing', 'verifying', 'done', 'failed')),
    glance_image_id      uuid        NOT NULL UNIQUE,
    attempts             integer     NOT NULL DEFAULT 0,
    bytes_staged         bigint      NOT NULL DEFAULT 0,
    submitted_at         timestamptz NOT NULL DEFAULT now(),
    claimed_at           timestamptz,
    image_created_at     timestamptz,
    staged_at            timestamptz,
    import_requested_at  timestamptz,
    finished_at          timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    glance_status        text,
    glance_size          bigint,
    glance_virtual_size  bigint,
    glance_checksum      text,
    glance_os_hash_algo  text,
    glance_os_hash_value text,
    source_hash_algo     text,
    source_hash_value    text,
    verification         text
        CHECK (verification IN ('verified', 'transformed', 'mismatch', 'not_checked')),
    error_code           text,
    error_message        text,
    worker_id            text,
    lease_expires_at     timestamptz,
    next_attempt_at      timestamptz NOT NULL DEFAULT now(),
    import_request_id    text,
    request_ids          text[]      NOT NULL DEFAULT '{}',
    cleanup              text        CHECK (cleanup IN ('deleted', 'kept')),
    UNIQUE (job_id, disk_index),
    UNIQUE (job_id, image_name)
);

-- Serves the claim query: only unfinished rows are ever claimed, and they are few next to
-- the finished ones once a migration has run for a while.
CREATE INDEX results_claimable_idx ON results (next_attempt_at)
    WHERE phase NOT IN ('done', 'failed');

COMMENT ON TABLE results IS 'One row per disk image: where its migration stands. Also the work queue.';
COMMENT ON COLUMN results.id IS 'Row identifier.';
COMMENT ON COLUMN results.job_id IS 'The job this disk belongs to (jobs.id).';
COMMENT ON COLUMN results.disk_index IS 'Position of the disk in the manifest.';
COMMENT ON COLUMN results.image_name IS 'Name of the Glance image; unique within a job.';
COMMENT ON COLUMN results.source_path IS 'Path of the source VMDK file as given in the manifest.';
COMMENT ON COLUMN results.source_size_bytes IS 'Size of the source file in bytes at submission.';
COMMENT ON COLUMN results.spec IS 'Image attributes: disk_format, container_format, visibility, min_disk, min_ram, protected, tags, properties.';
COMMENT ON COLUMN results.phase IS 'pending, creating, staging, importing, verifying, done (terminal) or failed (terminal).';
COMMENT ON COLUMN results.glance_image_id IS 'Id of the Glance image, chosen at submission so a retry never makes a duplicate.';
COMMENT ON COLUMN results.attempts IS 'How many times a worker has claimed this disk.';
COMMENT ON COLUMN results.bytes_staged IS 'Bytes uploaded to the Glance staging area so far in the current attempt.';
COMMENT ON COLUMN results.submitted_at IS 'When the row was created (job submission).';
COMMENT ON COLUMN results.claimed_at IS 'When a worker first claimed the disk.';
COMMENT ON COLUMN results.image_created_at IS 'When the Glance image record was created.';
COMMENT ON COLUMN results.staged_at IS 'When the upload to the staging area completed.';
COMMENT ON COLUMN results.import_requested_at IS 'When the glance-direct import was accepted.';
COMMENT ON COLUMN results.finished_at IS 'When the disk reached done or failed.';
COMMENT ON COLUMN results.updated_at IS 'When the row last changed (progress updates included).';
COMMENT ON COLUMN results.glance_status IS 'Last image status seen in Glance (queued, uploading, importing, active, killed, ...).';
COMMENT ON COLUMN results.glance_size IS 'Image size reported by Glance, in bytes.';
COMMENT ON COLUMN results.glance_virtual_size IS 'Virtual disk size reported by Glance, in bytes.';
COMMENT ON COLUMN results.glance_checksum IS 'MD5 checksum reported by Glance (legacy field).';
COMMENT ON COLUMN results.glance_os_hash_algo IS 'Hash algorithm Glance used for os_hash_value (usually sha512).';
COMMENT ON COLUMN results.glance_os_hash_value IS 'Hash of the stored image data reported by Glance.';
COMMENT ON COLUMN results.source_hash_algo IS 'Hash algorithm applied to the source while it was uploaded.';
COMMENT ON COLUMN results.source_hash_value IS 'Hash of the source bytes computed while they were uploaded.';
COMMENT ON COLUMN results.verification IS 'Outcome of comparing hashes: verified, transformed, mismatch or not_checked. NULL until verified.';
COMMENT ON COLUMN results.error_code IS 'Stable error code of the last failure (see worker/errors.py), NULL if none.';
COMMENT ON COLUMN results.error_message IS 'Human-readable message of the last failure.';
COMMENT ON COLUMN results.worker_id IS 'Worker holding the lease, or the last one that did.';
COMMENT ON COLUMN results.lease_expires_at IS 'The holder''s lease ends here; after it another worker may claim the disk. NULL when not leased.';
COMMENT ON COLUMN results.next_attempt_at IS 'The disk is not claimed before this time (retry back-off).';
COMMENT ON COLUMN results.import_request_id IS 'Request id of the accepted import call, for the cloud operator.';
COMMENT ON COLUMN results.request_ids IS 'Request ids of the cloud calls made for this disk, oldest first.';
COMMENT ON COLUMN results.cleanup IS 'What happened to the Glance image after a failure: deleted or kept. NULL if nothing was done.';

CREATE TABLE events (
    id          bigserial   PRIMARY KEY,
    job_id      uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    result_id   bigint      REFERENCES results (id) ON DELETE CASCADE,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    event       text        NOT NULL,
    phase_from  text,
    phase_to    text,
    worker_id   text,
    error_code  text,
    message     text,
    detail      jsonb
);

CREATE INDEX events_result_id_idx ON events (result_id);
CREATE INDEX events_job_id_at_idx ON events (job_id, at);

COMMENT ON TABLE events IS 'Append-only history of every job and image change.';
COMMENT ON COLUMN events.id IS 'Row identifier; increases with time.';
COMMENT ON COLUMN events.job_id IS 'The job concerned (jobs.id).';
COMMENT ON COLUMN events.result_id IS 'The image concerned (results.id); NULL for job-level events.';
COMMENT ON COLUMN events.at IS 'When the event was recorded (wall clock, not transaction start).';
COMMENT ON COLUMN events.event IS 'Stable event name, the same as in the logs (job.submitted, image.claimed, image.staged, ...).';
COMMENT ON COLUMN events.phase_from IS 'Phase of the image before the event.';
COMMENT ON COLUMN events.phase_to IS 'Phase of the image after the event.';
COMMENT ON COLUMN events.worker_id IS 'Worker that recorded the event.';
COMMENT ON COLUMN events.error_code IS 'Stable error code when the event is a failure.';
COMMENT ON COLUMN events.message IS 'Human-readable message (the error message for failures).';
COMMENT ON COLUMN events.detail IS 'Further data of the event as a JSON object.';
