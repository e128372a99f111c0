-- LMNH kiosk pipeline: schema and master data.
--
-- Idempotent: applying this file to a database that already has it changes nothing but the
-- master data, which it upserts to the values below (the seed's promise: "the master data can be
-- modified within the schema data, which is idempotent"). `bash reset.sh schema.sql` drops the
-- schema first; plain `psql -f schema.sql` keeps every loaded row.

SET client_min_messages = warning;

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

-- ---------------------------------------------------------------- events
CREATE TABLE IF NOT EXISTS rating_interaction (
    rating_interaction_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    exhibition_id         SMALLINT NOT NULL REFERENCES exhibition (exhibition_id),
    rating_id             SMALLINT NOT NULL REFERENCES rating (rating_id),
    event_at              TIMESTAMPTZ NOT NULL,
    source_id             INT NOT NULL REFERENCES event_source (source_id),
    position              BIGINT NOT NULL CHECK (position >= 0),
    UNIQUE (source_id, position)
);

CREATE TABLE IF NOT EXISTS request_interaction (
    request_interaction_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    exhibition_id          SMALLINT NOT NULL REFERENCES exhibition (exhibition_id),
    request_id             SMALLINT NOT NULL REFERENCES request (request_id),
    event_at               TIMESTAMPTZ NOT NULL,
    source_id              INT NOT NULL REFERENCES event_source (source_id),
    position               BIGINT NOT NULL CHECK (position >= 0),
    UNIQUE (source_id, position)
);

-- Every event that did not become a row above, with why (SPEC §2 reason codes, or the
-- product's own: malformed_row, bad_header).
CREATE TABLE IF NOT EXISTS rejected_event (
    rejected_event_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source            TEXT NOT NULL,                 -- s3://bucket/key or kafka://topic
    locator           TEXT NOT NULL,                 -- CSV line number or partition:offset
    payload           TEXT NOT NULL,                 -- the raw line or message text
    reason            TEXT NOT NULL CHECK (reason ~ '^[a-z_]+$'),
    detail            TEXT NOT NULL,
    rejected_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    source_id         INT NOT NULL REFERENCES event_source (source_id),
    position          BIGINT NOT NULL CHECK (position >= 0),
    UNIQUE (source_id, position)
);
CREATE INDEX IF NOT EXISTS rejected_event_reason_idx ON rejected_event (reason);
CREATE INDEX IF NOT EXISTS rating_interaction_event_at_idx ON rating_interaction (event_at);
CREATE INDEX IF NOT EXISTS request_interaction_event_at_idx ON request_interaction (event_at);

-- ---------------------------------------------------------------- seed master data
INSERT INTO department (department_name)
VALUES ('Entomology'), ('Geology'), ('Paleontology'), ('Zoology'), ('Ecology')
ON CONFLICT (department_name) DO NOTHING;

INSERT INTO floor (floor_name)
VALUES ('Vault'), ('1'), ('2'), ('3')
ON CONFLICT (floor_name) DO NOTHING;

INSERT INTO rating (rating_value, rating_description)
VALUES (0, 'Terrible'), (1, 'Bad'), (2, 'Neutral'), (3, 'Good'), (4, 'Amazing')
ON CONFLICT (rating_value) DO UPDATE SET rating_description = EXCLUDED.rating_description;

INSERT INTO request (request_value, request_description)
VALUES (0, 'Assistance'), (1, 'Emergency')
ON CONFLICT (request_value) DO UPDATE SET request_description = EXCLUDED.request_description;

INSERT INTO exhibition (exhibition_name, exhibition_description, department_id, floor_id,
                        exhibition_start_date, public_id, site)
SELECT s.name, s.description, d.department_id, f.floor_id, s.start_date, s.public_id,
       substring(s.public_id FROM 5)::INT
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
ORDER BY s.public_id
ON CONFLICT (public_id) DO UPDATE SET
    exhibition_name = EXCLUDED.exhibition_name,
    exhibition_description = EXCLUDED.exhibition_description,
    department_id = EXCLUDED.department_id,
    floor_id = EXCLUDED.floor_id,
    exhibition_start_date = EXCLUDED.exhibition_start_date;

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
