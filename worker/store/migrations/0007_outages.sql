-- Outages: what a paused worker is waiting for, and image deletions still owed.
--
-- A worker whose breaker is open (the identity or image service down, credentials refused)
-- keeps one row per service here while it waits, refreshed each minute and deleted when the
-- service is back; `status` shows the fresh ones as "paused: ...".
-- A failed image that could not be deleted is marked cleanup = 'owed'; a worker deletes it
-- once Glance answers again, even after a restart, and marks it 'deleted'.

CREATE TABLE worker_pauses (
    worker_id  text        NOT NULL,
    service    text        NOT NULL CHECK (service IN ('identity', 'image', 'database')),
    reason     text        NOT NULL,
    since      timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (worker_id, service)
);

COMMENT ON TABLE worker_pauses IS 'Workers paused by an outage: one row per worker and service while it lasts, refreshed each minute.';
COMMENT ON COLUMN worker_pauses.worker_id IS 'The paused worker (host:pid unless --worker-id).';
COMMENT ON COLUMN worker_pauses.service IS 'identity, image or database: the service whose breaker is open.';
COMMENT ON COLUMN worker_pauses.reason IS 'How the service fails: unreachable, answering 503, refusing the credentials, ...';
COMMENT ON COLUMN worker_pauses.since IS 'When the outage began, as this worker saw it.';
COMMENT ON COLUMN worker_pauses.updated_at IS 'Last refresh; a row older than a few minutes belongs to a worker that is gone.';

ALTER TABLE results DROP CONSTRAINT results_cleanup_check;
ALTER TABLE results ADD CONSTRAINT results_cleanup_check
    CHECK (cleanup IN ('deleted', 'kept', 'owed'));
COMMENT ON COLUMN results.cleanup IS 'What happened to the Glance image after a failure: deleted, kept (on_failure: keep, or Glance refused the delete), or owed (Glance could not be reached; a worker deletes it when Glance is back). NULL if nothing was done.';
CREATE INDEX results_cleanup_owed ON results (id) WHERE cleanup = 'owed';
