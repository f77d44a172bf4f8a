-- A URL source is stored for reading with its credentials masked: a presigned URL's query is
-- its credential (X-Amz-Signature, sig, temp_url_sig, ...). source_path keeps the URL
-- without user information and with every query value but a datastore's (dcPath, dsName)
-- written ***; the URL as given moves to spec.source_url, which only the worker reads.
-- Rows submitted before this version get the same treatment here.

UPDATE results AS r
SET spec = r.spec || jsonb_build_object('source_url', r.source_path),
    source_path = regexp_replace(split_part(r.source_path, '?', 1), '^([A-Za-z]+://)[^/@]*@', '\1')
        || coalesce('?' || (
            SELECT string_agg(
                       CASE WHEN lower(split_part(pair, '=', 1)) IN ('dcpath', 'dsname') THEN pair
                            ELSE split_part(pair, '=', 1) || '=***' END,
                       '&' ORDER BY position)
            FROM unnest(string_to_array(split_part(split_part(r.source_path, '#', 1), '?', 2), '&'))
                 WITH ORDINALITY AS q(pair, position)
            WHERE pair <> ''
        ), '')
WHERE r.source_path ~* '^https?://'
  AND NOT r.spec ? 'source_url'
  AND (r.source_path LIKE '%?%' OR r.source_path ~ '^[A-Za-z]+://[^/]*@');

COMMENT ON COLUMN results.source_path IS 'The source as resolved at submit: the path of the VMDK file (or of the OVA holding it), or its http(s) URL without user information and with every query value but dcPath and dsName masked as ***.';
COMMENT ON COLUMN results.spec IS 'Image attributes: disk_format, container_format, visibility, min_disk, min_ram, protected, tags, properties; the import''s stores; source_identity, the source as inspected at submission; for a disk of an OVA or OVF, appliance and expected_digest; source_url, a URL source as given when source_path masks part of it (read by the worker only).';
COMMENT ON COLUMN dashboard.image_progress.source_path IS 'The source file''s path, or its URL with every query value but dcPath and dsName masked as ***.';
