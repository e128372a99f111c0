-- LMNH kiosk pipeline: schema and master data.
--
-- Idempotent: applying this file to a database that already has it changes nothing but the
-- master data, which it upserts to the values below (the seed's promise: "the master data can be
-- modified within the schema data, which is idempotent"). `bash reset.sh schema.sql` drops the
-- schema first; plain `psql -f schema.sql` keeps every loaded row.

SET client_min_messages = warning;

-- Keys for a long life (SPEC §3.1: 10 years at one batch run a minute and ten consumer batches a
-- second). An identity value is drawn only when a row is really new: master rows, sources and
-- offsets are looked up first and inserted only when missing (load.py ENSURE_*, the seed below),
-- because `INSERT ... ON CONFLICT` draws a value even when it inserts nothing.
--   department, floor, exhibition, rating, request: SMALLINT (32,767 values), one per new
--     name, site or button; reruns draw none (each drew 6 before: gone after 5,450 runs).
--   event_source.source_id: INT (2,147,483,647), one per S3 object key ever seen (a reload
--     reuses it) and one per Kafka partition and topic epoch. A new object every minute for 10
--     years is 5.3 million: 0.25 % of the range.
--   rating_interaction_id, request_interaction_id, rejected_event_id: BIGINT (9.2e18), one per
--     row stored (reloads store again) plus up to 1,000 lost per session (CACHE 1000). Ten
--     batches a second of 20,000 messages for 10 years is 6.3e13 rows; a 1,000,000-row object
--     reloaded every minute 5.3e12; 5.3 million batch runs lose at most 5.3e9 to the cache:
--     under 1e14 in all, 1/90,000 of the range.

-- ---------------------------------------------------------------- master data
CREATE TABLE IF NOT EXISTS department (
    department_id   SMALLINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    department_name VARCHAR(100) NOT NULL UNIQUE CHECK (btrim(department_name) <> '')
);

CREATE TABLE IF NOT EXISTS floor (
    floor_id   SMALLINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    floor_name VARCHAR(100) NOT NULL UNIQUE CHECK (btrim(floor_name) <> '')
);

CREATE TABLE IF NOT EXISTS exhibition (
    exhibition_id          SMALLINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    exhibition_name        VARCHAR(100) NOT NULL CHECK (btrim(exhibition_name) <> ''),
    exhibition_description TEXT NOT NULL,
    department_id          SMALLINT NOT NULL REFERENCES department (department_id),
    floor_id               SMALLINT NOT NULL REFERENCES floor (floor_id),
    exhibition_start_date  DATE NOT NULL,
    public_id              VARCHAR(20) NOT NULL UNIQUE CHECK (public_id ~ '^EXH_[0-9]+$'),
    -- The kiosk site number this exhibition serves: EXH_03 is site 3 (SPEC §1).
    site                   SMALLINT NOT NULL UNIQUE CHECK (site >= 0),
    CHECK (site = substring(public_id FROM 5)::INT)
);

CREATE TABLE IF NOT EXISTS rating (
    rating_id          SMALLINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rating_value       SMALLINT NOT NULL UNIQUE CHECK (rating_value >= 0),
    rating_description VARCHAR(100) NOT NULL CHECK (btrim(rating_description) <> '')
);

CREATE TABLE IF NOT EXISTS request (
    request_id          SMALLINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_value       SMALLINT NOT NULL UNIQUE CHECK (request_value >= 0),
    request_description VARCHAR(100) NOT NULL CHECK (btrim(request_description) <> '')
);

-- ---------------------------------------------------------------- provenance and progress
-- Where events come from: one row per S3 object (s3://bucket/key) or Kafka topic-partition
-- (kafka://topic/partition). An event is identified by (source_id, position), not by content:
-- two identical kiosk presses in one second are two events.
CREATE TABLE IF NOT EXISTS event_source (
    source_id  INT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('s3', 'kafka')),
    uri        TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The load record of an S3 object; written in the same transaction as its rows.
CREATE TABLE IF NOT EXISTS s3_object_load (
    source_id       INT PRIMARY KEY REFERENCES event_source (source_id),
    etag            TEXT NOT NULL,
    complete        BOOLEAN NOT NULL,           -- false when --num_rows stopped early
    events_read     BIGINT NOT NULL CHECK (events_read >= 0),
    events_stored   BIGINT NOT NULL CHECK (events_stored >= 0),
    events_rejected BIGINT NOT NULL CHECK (events_rejected >= 0),
    loaded_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (events_stored + events_rejected = events_read)
);

-- The next Kafka offset to read per topic-partition; advanced in the batch's transaction.
CREATE TABLE IF NOT EXISTS kafka_offset (
    source_id   INT PRIMARY KEY REFERENCES event_source (source_id),
    topic       TEXT NOT NULL,
    partition   INT NOT NULL CHECK (partition >= 0),
    next_offset BIGINT NOT NULL CHECK (next_offset >= 0),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (topic, partition)
);
-- Which log the offset belongs to (SPEC §3.1): a deleted and recreated topic has a new ID and
-- its offsets start from 0 again, so its partitions become new sources (epoch 1, 2, ...: uri
-- kafka://topic/partition@epoch) whose positions never collide with the old log's rows.
-- topic_id is NULL where the broker reports no topic IDs. Added here, not above, so that
-- `psql -f schema.sql` upgrades an existing database.
ALTER TABLE kafka_offset ADD COLUMN IF NOT EXISTS topic_id TEXT;
ALTER TABLE kafka_offset ADD COLUMN IF NOT EXISTS epoch INT NOT NULL DEFAULT 0 CHECK (epoch >= 0);

-- ---------------------------------------------------------------- events
-- An event is identified by its provenance (SPEC §3): the primary key is (source_id, position),
-- the CSV line or Kafka offset it came from. The BIGINT identity column is the surrogate handle
-- for BI tools; it is unique by construction (GENERATED ALWAYS) and left unindexed, as one more
-- index costs a third of the load time of a million rows.
-- Foreign keys on the event tables are checked once per statement (see check_event_references
-- below) instead of by PostgreSQL's per-row FOREIGN KEY triggers: the same guarantee at a
-- fifth of the load time.
CREATE TABLE IF NOT EXISTS rating_interaction (
    rating_interaction_id BIGINT GENERATED ALWAYS AS IDENTITY (CACHE 1000) NOT NULL,
    exhibition_id         SMALLINT NOT NULL,   -- references exhibition (checked per statement)
    rating_id             SMALLINT NOT NULL,   -- references rating
    event_at              TIMESTAMPTZ NOT NULL,
    source_id             INT NOT NULL,        -- references event_source
    position              BIGINT NOT NULL CHECK (position >= 0),
    PRIMARY KEY (source_id, position)
);

CREATE TABLE IF NOT EXISTS request_interaction (
    request_interaction_id BIGINT GENERATED ALWAYS AS IDENTITY (CACHE 1000) NOT NULL,
    exhibition_id          SMALLINT NOT NULL,  -- references exhibition
    request_id             SMALLINT NOT NULL,  -- references request
    event_at               TIMESTAMPTZ NOT NULL,
    source_id              INT NOT NULL,       -- references event_source
    position               BIGINT NOT NULL CHECK (position >= 0),
    PRIMARY KEY (source_id, position)
);

-- Every event that did not become a row above, with why (SPEC §2 reason codes, or the
-- product's own: malformed_row, bad_header).
CREATE TABLE IF NOT EXISTS rejected_event (
    rejected_event_id BIGINT GENERATED ALWAYS AS IDENTITY (CACHE 1000) NOT NULL,
    source            TEXT NOT NULL,                 -- s3://bucket/key or kafka://topic
    locator           TEXT NOT NULL,                 -- CSV line number or partition:offset
    payload           TEXT NOT NULL,                 -- the raw line or message text
    reason            TEXT NOT NULL CHECK (reason ~ '^[a-z_]+$'),
    detail            TEXT NOT NULL,
    rejected_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    source_id         INT NOT NULL,                  -- references event_source
    position          BIGINT NOT NULL CHECK (position >= 0),
    PRIMARY KEY (source_id, position)
);
CREATE INDEX IF NOT EXISTS rejected_event_reason_idx ON rejected_event (reason);

-- Set-based foreign keys: after each INSERT/COPY statement, every new row must point at an
-- existing exhibition, rating/request and source; otherwise the statement fails with the
-- standard foreign_key_violation error.
-- First one pass over the new rows for the range of each key: when every value of a range
-- exists in the referenced table (the usual case: keys are few and dense), every new row inside
-- it is covered, which costs a third of grouping the rows. Otherwise the distinct keys are
-- looked up one by one to name the missing one.
CREATE OR REPLACE FUNCTION key_range_covered(tbl REGCLASS, col TEXT, lo INT, hi INT)
RETURNS BOOLEAN LANGUAGE plpgsql STABLE AS $$
DECLARE
    present BIGINT;
BEGIN
    IF lo IS NULL THEN
        RETURN TRUE;  -- no rows
    END IF;
    EXECUTE format('SELECT count(*) FROM %s WHERE %I BETWEEN $1 AND $2', tbl, col)
        INTO present USING lo, hi;
    RETURN present = hi::BIGINT - lo + 1;
END $$;

CREATE OR REPLACE FUNCTION check_event_references() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad TEXT;
    e_lo INT; e_hi INT; k_lo INT; k_hi INT; s_lo INT; s_hi INT;
BEGIN
    IF TG_TABLE_NAME = 'rating_interaction' THEN
        SELECT min(exhibition_id), max(exhibition_id), min(rating_id), max(rating_id),
               min(source_id), max(source_id)
            INTO e_lo, e_hi, k_lo, k_hi, s_lo, s_hi FROM new_rows;
        IF key_range_covered('exhibition', 'exhibition_id', e_lo, e_hi)
           AND key_range_covered('rating', 'rating_id', k_lo, k_hi)
           AND key_range_covered('event_source', 'source_id', s_lo, s_hi) THEN
            RETURN NULL;
        END IF;
        SELECT format('exhibition_id %s / rating_id %s / source_id %s', n.exhibition_id,
                      n.rating_id, n.source_id) INTO bad
        FROM (SELECT DISTINCT exhibition_id, rating_id, source_id FROM new_rows) n
        WHERE NOT EXISTS (SELECT 1 FROM exhibition e WHERE e.exhibition_id = n.exhibition_id)
           OR NOT EXISTS (SELECT 1 FROM rating r WHERE r.rating_id = n.rating_id)
           OR NOT EXISTS (SELECT 1 FROM event_source s WHERE s.source_id = n.source_id)
        LIMIT 1;
    ELSIF TG_TABLE_NAME = 'request_interaction' THEN
        SELECT min(exhibition_id), max(exhibition_id), min(request_id), max(request_id),
               min(source_id), max(source_id)
            INTO e_lo, e_hi, k_lo, k_hi, s_lo, s_hi FROM new_rows;
        IF key_range_covered('exhibition', 'exhibition_id', e_lo, e_hi)
           AND key_range_covered('request', 'request_id', k_lo, k_hi)
           AND key_range_covered('event_source', 'source_id', s_lo, s_hi) THEN
            RETURN NULL;
        END IF;
        SELECT format('exhibition_id %s / request_id %s / source_id %s', n.exhibition_id,
                      n.request_id, n.source_id) INTO bad
        FROM (SELECT DISTINCT exhibition_id, request_id, source_id FROM new_rows) n
        WHERE NOT EXISTS (SELECT 1 FROM exhibition e WHERE e.exhibition_id = n.exhibition_id)
           OR NOT EXISTS (SELECT 1 FROM request r WHERE r.request_id = n.request_id)
           OR NOT EXISTS (SELECT 1 FROM event_source s WHERE s.source_id = n.source_id)
        LIMIT 1;
    ELSE
        SELECT min(source_id), max(source_id) INTO s_lo, s_hi FROM new_rows;
        IF key_range_covered('event_source', 'source_id', s_lo, s_hi) THEN
            RETURN NULL;
        END IF;
        SELECT format('source_id %s', n.source_id) INTO bad
        FROM (SELECT DISTINCT source_id FROM new_rows) n
        WHERE NOT EXISTS (SELECT 1 FROM event_source s WHERE s.source_id = n.source_id)
        LIMIT 1;
    END IF;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'insert into % refers to a missing row: %', TG_TABLE_NAME, bad
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

-- The other half of a foreign key: master rows that events point at cannot be deleted.
CREATE OR REPLACE FUNCTION forbid_referenced_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    used BOOLEAN;
BEGIN
    IF TG_TABLE_NAME = 'exhibition' THEN
        used := EXISTS (SELECT 1 FROM rating_interaction WHERE exhibition_id = OLD.exhibition_id)
             OR EXISTS (SELECT 1 FROM request_interaction WHERE exhibition_id = OLD.exhibition_id);
    ELSIF TG_TABLE_NAME = 'rating' THEN
        used := EXISTS (SELECT 1 FROM rating_interaction WHERE rating_id = OLD.rating_id);
    ELSIF TG_TABLE_NAME = 'request' THEN
        used := EXISTS (SELECT 1 FROM request_interaction WHERE request_id = OLD.request_id);
    ELSE
        used := EXISTS (SELECT 1 FROM rating_interaction WHERE source_id = OLD.source_id)
             OR EXISTS (SELECT 1 FROM request_interaction WHERE source_id = OLD.source_id)
             OR EXISTS (SELECT 1 FROM rejected_event WHERE source_id = OLD.source_id);
    END IF;
    IF used THEN
        RAISE EXCEPTION 'cannot delete from %: events still refer to this row', TG_TABLE_NAME
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN OLD;
END $$;

CREATE OR REPLACE FUNCTION forbid_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'TRUNCATE % would orphan events; use reset.sh', TG_TABLE_NAME
        USING ERRCODE = 'foreign_key_violation';
END $$;

-- Every function resolves names in this file's schema only, whoever calls it: with the caller's
-- search_path a session could satisfy the reference check with a table of its own (a
-- `CREATE TEMP TABLE exhibition` shadows the real one, as pg_temp is searched first unless
-- named). pg_temp goes last; the schema is whichever this file is applied in. CREATE OR REPLACE
-- clears the setting, so it is set again on every apply.
DO $$
DECLARE
    f TEXT;
BEGIN
    FOREACH f IN ARRAY ARRAY['key_range_covered(regclass, text, integer, integer)',
                             'check_event_references()', 'forbid_referenced_delete()',
                             'forbid_truncate()'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', f, current_schema());
    END LOOP;
END $$;

DO $$
DECLARE
    t TEXT;
BEGIN
    FOREACH t IN ARRAY ARRAY['rating_interaction', 'request_interaction', 'rejected_event'] LOOP
        EXECUTE format('CREATE OR REPLACE TRIGGER %I AFTER INSERT ON %I REFERENCING NEW TABLE '
                       'AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION check_event_references()',
                       t || '_references', t);
    END LOOP;
    FOREACH t IN ARRAY ARRAY['exhibition', 'rating', 'request', 'event_source'] LOOP
        EXECUTE format('CREATE OR REPLACE TRIGGER %I BEFORE DELETE ON %I FOR EACH ROW '
                       'EXECUTE FUNCTION forbid_referenced_delete()', t || '_in_use', t);
        EXECUTE format('CREATE OR REPLACE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT '
                       'EXECUTE FUNCTION forbid_truncate()', t || '_no_truncate', t);
    END LOOP;
END $$;

-- ---------------------------------------------------------------- alerts (SPEC §4.1)
-- The outbox of emergency alerts: consumer.py writes a row in the same transaction as the
-- emergency call it stores, and its sender thread POSTs it to the webhook, then sets sent_at.
-- Keyed by provenance like the events, with no identity column, so a replayed batch adds
-- nothing (ON CONFLICT DO NOTHING) and burns no key value. `id` is what the receiver sees
-- (kafka://topic/partition:offset). Sent rows stay as the record of what was alerted and when.
CREATE TABLE IF NOT EXISTS alert_outbox (
    source_id  INT NOT NULL REFERENCES event_source (source_id),
    position   BIGINT NOT NULL CHECK (position >= 0),
    id         TEXT NOT NULL,
    event_at   TIMESTAMPTZ NOT NULL,
    payload    JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at    TIMESTAMPTZ,
    PRIMARY KEY (source_id, position)
);
-- The sender's queue: pending alerts in the order they were stored.
CREATE INDEX IF NOT EXISTS alert_outbox_pending_idx ON alert_outbox (created_at, event_at)
    WHERE sent_at IS NULL;
-- Delivery state per alert (added in place: applying this file again is the upgrade): how
-- often it was tried, why the last try failed, and when it is due again. A receiver refusing
-- one alert (a 4xx) pushes only that row's next_attempt_at, so the alerts after it still go.
-- NULL next_attempt_at: due now.
ALTER TABLE alert_outbox ADD COLUMN IF NOT EXISTS attempts INT NOT NULL DEFAULT 0;
ALTER TABLE alert_outbox ADD COLUMN IF NOT EXISTS last_error TEXT;
ALTER TABLE alert_outbox ADD COLUMN IF NOT EXISTS next_attempt_at TIMESTAMPTZ;

-- Sent alerts are the record of what was alerted; the sender prunes them after its retention
-- (ALERT_RETENTION_DAYS) through this function, which deletes sent rows only, and keeps a day
-- at least: the loader role has no DELETE on the outbox, so no pending alert is ever dropped.
-- SECURITY DEFINER: it runs as the owner of the table, so its search_path is pinned (pg_temp
-- last, as above) and EXECUTE is taken from PUBLIC (roles.sql gives it to the loader).
CREATE OR REPLACE FUNCTION prune_sent_alerts(keep_days INT) RETURNS BIGINT
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    pruned BIGINT;
BEGIN
    IF keep_days IS NULL OR keep_days < 1 THEN
        RAISE EXCEPTION 'prune_sent_alerts: keep_days must be at least 1, got %', keep_days;
    END IF;
    DELETE FROM alert_outbox
    WHERE sent_at IS NOT NULL AND sent_at < now() - make_interval(days => keep_days);
    GET DIAGNOSTICS pruned = ROW_COUNT;
    RETURN pruned;
END $$;
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION prune_sent_alerts(integer) SET search_path = %I, pg_temp',
                   current_schema());
END $$;
REVOKE EXECUTE ON FUNCTION prune_sent_alerts(integer) FROM PUBLIC;

-- ---------------------------------------------------------------- seed master data
-- Each seed row is inserted only when missing (WHERE NOT EXISTS): an `INSERT ... ON CONFLICT`
-- draws an identity value even when it inserts nothing, and these SMALLINT keys would run out
-- after some 5,000 applications of this file. Who owns what (SPEC §3): the buttons (rating,
-- request) belong to this file, so a changed word here is applied to the row; an exhibition
-- belongs to its file in S3 once one exists, so the seed only inserts the six that are missing
-- and never updates one: applying this file again, the upgrade step, keeps a rename made by a
-- file (edit the exhibition's file, not this one).
INSERT INTO department (department_name)
SELECT s.name FROM (VALUES ('Entomology'), ('Geology'), ('Paleontology'), ('Zoology'),
                           ('Ecology')) AS s (name)
WHERE NOT EXISTS (SELECT 1 FROM department d WHERE d.department_name = s.name)
ON CONFLICT (department_name) DO NOTHING;

INSERT INTO floor (floor_name)
SELECT s.name FROM (VALUES ('Vault'), ('1'), ('2'), ('3')) AS s (name)
WHERE NOT EXISTS (SELECT 1 FROM floor f WHERE f.floor_name = s.name)
ON CONFLICT (floor_name) DO NOTHING;

WITH seed (value, description) AS (
    VALUES (0, 'Terrible'), (1, 'Bad'), (2, 'Neutral'), (3, 'Good'), (4, 'Amazing')
), updated AS (
    UPDATE rating r SET rating_description = s.description FROM seed s
    WHERE r.rating_value = s.value AND r.rating_description <> s.description
)
INSERT INTO rating (rating_value, rating_description)
SELECT s.value, s.description FROM seed s
WHERE NOT EXISTS (SELECT 1 FROM rating r WHERE r.rating_value = s.value)
ORDER BY s.value
ON CONFLICT (rating_value) DO NOTHING;

WITH seed (value, description) AS (
    VALUES (0, 'Assistance'), (1, 'Emergency')
), updated AS (
    UPDATE request r SET request_description = s.description FROM seed s
    WHERE r.request_value = s.value AND r.request_description <> s.description
)
INSERT INTO request (request_value, request_description)
SELECT s.value, s.description FROM seed s
WHERE NOT EXISTS (SELECT 1 FROM request r WHERE r.request_value = s.value)
ORDER BY s.value
ON CONFLICT (request_value) DO NOTHING;

WITH seed AS (
    SELECT s.name, s.description, d.department_id, f.floor_id, s.start_date, s.public_id
    FROM (VALUES
        ('Measureless to Man', 'An immersive 3D experience: delve deep into a previously-inaccessible cave system.', 'Geology', '1', DATE '2021-08-23', 'EXH_00'),
        ('Adaptation', 'How insect evolution has kept pace with an industrialised world', 'Entomology', 'Vault', DATE '2019-07-01', 'EXH_01'),
        ('The Crenshaw Collection', 'An exhibition of 18th Century watercolours, mostly focused on South American wildlife.', 'Zoology', '2', DATE '2021-03-03', 'EXH_02'),
        ('Cetacean Sensations', 'Whales: from ancient myth to critically endangered.', 'Zoology', '1', DATE '2019-07-01', 'EXH_03'),
        ('Our Polluted World', 'A hard-hitting exploration of humanity''s impact on the environment.', 'Ecology', '3', DATE '2021-05-12', 'EXH_04'),
        ('Thunder Lizards', 'How new research is making scientists rethink what dinosaurs really looked like.', 'Paleontology', '1', DATE '2023-02-01', 'EXH_05')
    ) AS s (name, description, department, floor, start_date, public_id)
    JOIN department d ON d.department_name = s.department
    JOIN floor f ON f.floor_name = s.floor
)
INSERT INTO exhibition (exhibition_name, exhibition_description, department_id, floor_id,
                        exhibition_start_date, public_id, site)
SELECT s.name, s.description, s.department_id, s.floor_id, s.start_date, s.public_id,
       substring(s.public_id FROM 5)::INT
FROM seed s
WHERE NOT EXISTS (SELECT 1 FROM exhibition e WHERE e.public_id = s.public_id)
ORDER BY s.public_id
ON CONFLICT (public_id) DO NOTHING;

-- ---------------------------------------------------------------- the seed's views
CREATE OR REPLACE VIEW exhibition_info AS
SELECT e.exhibition_id, e.public_id, e.site, e.exhibition_name, e.exhibition_description,
       e.exhibition_start_date, d.department_name, f.floor_name
FROM exhibition e
JOIN department d USING (department_id)
JOIN floor f USING (floor_id);

CREATE OR REPLACE VIEW request_info AS
SELECT ri.request_interaction_id, ri.event_at, e.exhibition_id, e.public_id,
       e.exhibition_name, r.request_value, r.request_description
FROM request_interaction ri
JOIN exhibition e USING (exhibition_id)
JOIN request r USING (request_id);

CREATE OR REPLACE VIEW rating_info AS
SELECT ri.rating_interaction_id, ri.event_at, e.exhibition_id, e.public_id,
       e.exhibition_name, r.rating_value, r.rating_description
FROM rating_interaction ri
JOIN exhibition e USING (exhibition_id)
JOIN rating r USING (rating_id);

-- What has landed, per kind of source: the operator's first look after a run.
CREATE OR REPLACE VIEW load_overview AS
SELECT s.kind AS source_kind,
       count(DISTINCT s.source_id) AS sources,
       coalesce(sum(r.n), 0) AS ratings,
       coalesce(sum(q.n), 0) AS requests,
       coalesce(sum(x.n), 0) AS rejected
FROM event_source s
LEFT JOIN (SELECT source_id, count(*) AS n FROM rating_interaction GROUP BY source_id) r USING (source_id)
LEFT JOIN (SELECT source_id, count(*) AS n FROM request_interaction GROUP BY source_id) q USING (source_id)
LEFT JOIN (SELECT source_id, count(*) AS n FROM rejected_event GROUP BY source_id) x USING (source_id)
GROUP BY s.kind
ORDER BY s.kind;

-- ---------------------------------------------------------------- analysis views (analysis.ipynb, BI tools)
-- The numbers of analysis.ipynb, for any SQL client or BI tool. Times are museum local time
-- (Europe/London) whatever the session's timezone. A rating is positive when it is Good or better
-- (rating_value >= 3); calls are told apart by their button: 0 Assistance, 1 Emergency.

-- One row per rating, with names and local time.
CREATE OR REPLACE VIEW rating_detail AS
SELECT ri.rating_interaction_id, ri.event_at,
       ri.event_at AT TIME ZONE 'Europe/London' AS local_at,
       (ri.event_at AT TIME ZONE 'Europe/London')::date AS local_date,
       extract(HOUR FROM ri.event_at AT TIME ZONE 'Europe/London')::INT AS local_hour,
       e.exhibition_id, e.public_id, e.exhibition_name, d.department_name, f.floor_name,
       r.rating_value, r.rating_description, r.rating_value >= 3 AS positive
FROM rating_interaction ri
JOIN exhibition e USING (exhibition_id)
JOIN department d USING (department_id)
JOIN floor f USING (floor_id)
JOIN rating r USING (rating_id);

-- One row per assistance or emergency call, with names and local time.
CREATE OR REPLACE VIEW request_detail AS
SELECT ri.request_interaction_id, ri.event_at,
       ri.event_at AT TIME ZONE 'Europe/London' AS local_at,
       (ri.event_at AT TIME ZONE 'Europe/London')::date AS local_date,
       extract(HOUR FROM ri.event_at AT TIME ZONE 'Europe/London')::INT AS local_hour,
       e.exhibition_id, e.public_id, e.exhibition_name, d.department_name, f.floor_name,
       r.request_value, r.request_description, r.request_value = 1 AS emergency
FROM request_interaction ri
JOIN exhibition e USING (exhibition_id)
JOIN department d USING (department_id)
JOIN floor f USING (floor_id)
JOIN request r USING (request_id);

-- One row per exhibition, including those with no interaction yet.
CREATE OR REPLACE VIEW exhibition_summary AS
SELECT e.exhibition_id, e.public_id, e.exhibition_name, d.department_name, f.floor_name,
       coalesce(ra.ratings, 0) + coalesce(rq.calls, 0) AS interactions,
       coalesce(ra.ratings, 0) AS ratings,
       ra.average_rating,
       coalesce(ra.positive_ratings, 0) AS positive_ratings,
       coalesce(rq.calls, 0) AS calls,
       coalesce(rq.assistance_calls, 0) AS assistance_calls,
       coalesce(rq.emergency_calls, 0) AS emergency_calls
FROM exhibition e
JOIN department d USING (department_id)
JOIN floor f USING (floor_id)
LEFT JOIN (SELECT exhibition_id, count(*) AS ratings, avg(rating_value) AS average_rating,
                  count(*) FILTER (WHERE positive) AS positive_ratings
           FROM rating_detail GROUP BY exhibition_id) ra USING (exhibition_id)
LEFT JOIN (SELECT exhibition_id, count(*) AS calls,
                  count(*) FILTER (WHERE request_value = 0) AS assistance_calls,
                  count(*) FILTER (WHERE request_value = 1) AS emergency_calls
           FROM request_detail GROUP BY exhibition_id) rq USING (exhibition_id);

-- How each exhibition was rated: every exhibition x every rating button, zero-filled.
CREATE OR REPLACE VIEW exhibition_rating_distribution AS
SELECT e.exhibition_id, e.public_id, e.exhibition_name, r.rating_value, r.rating_description,
       count(ri.rating_interaction_id) AS ratings,
       count(ri.rating_interaction_id)::NUMERIC
           / nullif(sum(count(ri.rating_interaction_id)) OVER (PARTITION BY e.exhibition_id), 0)
           AS share
FROM exhibition e
CROSS JOIN rating r
LEFT JOIN rating_interaction ri
       ON ri.exhibition_id = e.exhibition_id AND ri.rating_id = r.rating_id
GROUP BY e.exhibition_id, e.public_id, e.exhibition_name, r.rating_id, r.rating_value,
         r.rating_description;

-- One row per kiosk interaction, rating or call: the union the per-hour views count.
CREATE OR REPLACE VIEW interaction_detail AS
SELECT 'rating'::TEXT AS kind, rating_interaction_id AS interaction_id, event_at, local_at,
       local_date, local_hour, exhibition_id, public_id, exhibition_name, department_name,
       floor_name, rating_value, rating_description, positive,
       NULL::SMALLINT AS request_value, NULL::VARCHAR(100) AS request_description,
       NULL::BOOLEAN AS emergency
FROM rating_detail
UNION ALL
SELECT 'call', request_interaction_id, event_at, local_at, local_date, local_hour, exhibition_id,
       public_id, exhibition_name, department_name, floor_name, NULL, NULL, NULL,
       request_value, request_description, emergency
FROM request_detail;

-- Per exhibition and local hour of the day (hours with at least one interaction there).
CREATE OR REPLACE VIEW exhibition_hour_summary AS
SELECT exhibition_id, public_id, exhibition_name, local_hour,
       lpad(local_hour::TEXT, 2, '0') || ':00' AS hour_label,
       count(*) AS interactions,
       count(*) FILTER (WHERE kind = 'rating') AS ratings,
       avg(rating_value) AS average_rating,
       count(*) FILTER (WHERE positive) AS positive_ratings,
       count(*) FILTER (WHERE kind = 'call') AS calls,
       count(*) FILTER (WHERE request_value = 0) AS assistance_calls,
       count(*) FILTER (WHERE request_value = 1) AS emergency_calls
FROM interaction_detail
GROUP BY exhibition_id, public_id, exhibition_name, local_hour;

-- Per local hour of the day, all exhibitions together (hours with at least one interaction).
CREATE OR REPLACE VIEW hour_summary AS
SELECT local_hour, lpad(local_hour::TEXT, 2, '0') || ':00' AS hour_label,
       count(*) AS interactions,
       count(*) FILTER (WHERE kind = 'rating') AS ratings,
       avg(rating_value) AS average_rating,
       count(*) FILTER (WHERE positive) AS positive_ratings,
       count(*) FILTER (WHERE kind = 'call') AS calls,
       count(*) FILTER (WHERE request_value = 0) AS assistance_calls,
       count(*) FILTER (WHERE request_value = 1) AS emergency_calls
FROM interaction_detail
GROUP BY local_hour;

-- Per department: its exhibitions' ratings pooled.
CREATE OR REPLACE VIEW department_summary AS
SELECT d.department_id, d.department_name,
       count(DISTINCT e.exhibition_id) AS exhibitions,
       count(rd.rating_interaction_id) AS ratings,
       avg(rd.rating_value) AS average_rating,
       stddev_samp(rd.rating_value) AS rating_stddev,
       count(*) FILTER (WHERE rd.positive) AS positive_ratings
FROM department d
JOIN exhibition e USING (department_id)
LEFT JOIN rating_detail rd USING (exhibition_id)
GROUP BY d.department_id, d.department_name;

-- Ratings per exhibition per local clock hour (date and hour): the average rating over time.
CREATE OR REPLACE VIEW exhibition_rating_timeline AS
SELECT exhibition_id, public_id, exhibition_name,
       date_trunc('hour', local_at) AS local_hour_start,
       count(*) AS ratings, sum(rating_value) AS rating_total, avg(rating_value) AS average_rating
FROM rating_detail
GROUP BY exhibition_id, public_id, exhibition_name, date_trunc('hour', local_at);
