-- When an owed deletion of a failed row's image was made: the image's cleanup had to wait for
-- Glance to answer, and a worker settled it later (`cleanup` went from owed to deleted).

ALTER TABLE results ADD COLUMN cleanup_settled_at timestamptz;

COMMENT ON COLUMN results.cleanup_settled_at IS 'When a worker made the owed deletion of the failed image (cleanup went from owed to deleted). NULL if no deletion was ever owed, or while it still is. Kept when the job is retried: it tells of the image the row had before.';
