-- Where a multi-store import put the image: the stores holding its data, and those the import
-- failed for (all_stores_must_succeed false lets an image be done although some failed).

ALTER TABLE results ADD COLUMN glance_stores text[];
ALTER TABLE results ADD COLUMN glance_failed_stores text[];

COMMENT ON COLUMN results.glance_stores IS 'Stores holding the image''s data, as Glance reported at the end of the import (its stores field). NULL on a single-store cloud.';
COMMENT ON COLUMN results.glance_failed_stores IS 'Stores the import failed for (os_glance_failed_import); empty when none did. NULL on a single-store cloud.';
