-- Glance's legacy `checksum` is md5; with `run --verify-md5` the worker hashes md5 too and
-- compares it. Our md5 is kept beside Glance's so a mismatch shows both values.

ALTER TABLE results ADD COLUMN source_md5 text;

COMMENT ON COLUMN results.source_md5 IS 'MD5 (hex) of the source bytes, computed while they were uploaded, only with run --verify-md5; compared with glance_checksum. NULL otherwise.';
