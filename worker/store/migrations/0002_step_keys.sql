-- Idempotent step records: a worker that loses its database connection in the middle of
-- recording a step writes it again with the same key, and the second write changes nothing.

ALTER TABLE events ADD COLUMN step_key uuid;

CREATE UNIQUE INDEX events_step_key_idx ON events (step_key) WHERE step_key IS NOT NULL;

COMMENT ON COLUMN events.step_key IS 'Key of the worker step that wrote the event; a step written again after a lost database connection is not recorded twice. NULL for events not written by a step.';
