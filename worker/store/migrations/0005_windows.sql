-- Maintenance windows: a job may limit the hours (in its own time zone) when disks start.

ALTER TABLE jobs ADD COLUMN "window" jsonb GENERATED ALWAYS AS (manifest -> 'window') STORED;

COMMENT ON COLUMN jobs."window" IS 'Maintenance window from the manifest: start and end ("HH:MM"), time_zone (IANA) and days (mon..sun, default every day); disks start only inside it. NULL means any time.';

-- True when `at` falls inside window `win`. An end before the start crosses midnight (the
-- part after midnight belongs to the day the window opened); an end equal to the start is
-- the whole day. A time zone PostgreSQL does not know closes the window rather than failing
-- every worker's claim.
CREATE FUNCTION job_window_open(win jsonb, at_time timestamptz) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    local_at  timestamp;
    opens     time := (win ->> 'start')::time;
    closes    time := (win ->> 'end')::time;
    day_names text[] := ARRAY['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'];
    today     text;
    yesterday text;
    open_days jsonb := coalesce(win -> 'days', to_jsonb(day_names));
BEGIN
    IF win IS NULL THEN
        RETURN true;
    END IF;
    BEGIN
        local_at := at_time AT TIME ZONE (win ->> 'time_zone');
    EXCEPTION WHEN invalid_parameter_value THEN
        RETURN false;
    END;
    today := day_names[extract(isodow FROM local_at)::integer];
    yesterday := day_names[extract(isodow FROM local_at - interval '1 day')::integer];
    IF opens < closes THEN
        RETURN open_days ? today AND local_at::time >= opens AND local_at::time < closes;
    ELSIF opens > closes THEN
        RETURN (open_days ? today AND local_at::time >= opens)
            OR (open_days ? yesterday AND local_at::time < closes);
    END IF;
    RETURN open_days ? today;
END;
$$;

COMMENT ON FUNCTION job_window_open(jsonb, timestamptz) IS 'Whether a job''s maintenance window (jobs.window) is open at the given time; NULL window: always.';
