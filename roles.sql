-- LMNH kiosk pipeline: least-privilege roles.
--
-- Run by an administrator (the owner of the tables: the RDS master user, or postgres locally)
-- AFTER schema.sql, in the database that holds the schema, and again after every schema change
-- or `reset.sh` (a dropped table loses its grants):
--
--     psql -X -v ON_ERROR_STOP=1 -1 -f roles.sql
--     bash connect.sh -X -v ON_ERROR_STOP=1 -1 -f roles.sql      (the configured or local database)
--
-- Then give each role a password in an interactive psql (bash connect.sh):
--
--     \password lmnh_loader
--     \password lmnh_analyst
--
-- psql asks for it twice without echoing it, hashes it on your machine and sends only the SCRAM
-- verifier (ALTER ROLE ... PASSWORD 'SCRAM-SHA-256$...'): the password itself is never on a
-- command line (`ps`), in the shell history or in the server's statement log. Do NOT pass it as
-- `psql -v name=...` or write `ALTER ROLE ... PASSWORD 'text'`: both put it in clear text in
-- one of those places. For automation, hash on the client the same way (libpq's
-- PQencryptPasswordConn; psycopg2.extensions.encrypt_password(pw, role, conn, 'scram-sha-256'))
-- and send the verifier.
--
-- It creates two roles (roles are cluster-wide; everything else below is per database):
--
--   lmnh_loader   LOGIN. What pipeline.py, consumer.py and replay.py need, nothing more: read
--                 the master data, upsert exhibitions with their department and floor, write
--                 events, rejections, provenance, load records, Kafka offsets and alerts (marked
--                 sent by the consumer's sender), delete the rows of an S3 object whose content
--                 changed, and re-word a replayed rejection. It owns nothing, so it cannot DROP,
--                 ALTER or TRUNCATE a table, and it cannot CREATE anything in the schema. Set
--                 DB_USER / DB_PASS to it in the loaders' .env.
--   lmnh_analyst  LOGIN, read-only: SELECT on every table and view (analysis.ipynb, BI tools),
--                 with transactions read-only by default. Give people their own logins with
--                 `GRANT lmnh_analyst TO alice;` rather than sharing this one.
--
-- Idempotent and declarative: applying it again changes nothing, and it first revokes whatever
-- the two roles hold on the schema's tables, so the privileges below are exactly what they have.
-- Passwords are left as they are (none when just created: the role cannot log in on a server
-- that asks for passwords, RDS and the local stack alike, until `\password` gives it one).
--
-- It also takes TEMP on this database away from PUBLIC (given back to lmnh_analyst): a loader
-- must not create temporary tables. Grant TEMP to any other role of this database that needs it.

SET client_min_messages = warning;

-- ---------------------------------------------------------------- the roles (cluster-wide)
-- CREATE ROLE has no IF NOT EXISTS; a concurrent run creating the same role is not an error.
DO $$
DECLARE
    r TEXT;
BEGIN
    FOREACH r IN ARRAY ARRAY['lmnh_loader', 'lmnh_analyst'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE '
                               'NOREPLICATION NOBYPASSRLS', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by another session
            END;
        ELSIF NOT (SELECT rolcanlogin FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('ALTER ROLE %I LOGIN', r);
        END IF;
    END LOOP;
    -- Defence in depth for the analyst: a slip in a notebook cannot write even if a grant
    -- is added by mistake later.
    IF NOT EXISTS (SELECT FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
                   WHERE r.rolname = 'lmnh_analyst' AND s.setdatabase = 0
                     AND 'default_transaction_read_only=on' = ANY (s.setconfig)) THEN
        ALTER ROLE lmnh_analyst SET default_transaction_read_only = on;
    END IF;
END $$;

-- ---------------------------------------------------------------- privileges (this database)
DO $$
DECLARE
    s TEXT := current_schema();
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO lmnh_loader, lmnh_analyst', current_database());
    -- No temporary tables for the loader (defence in depth beside the functions' pinned
    -- search_path: a temp table shadows a real one of the same name). TEMP is PUBLIC's by
    -- default, so it is taken from PUBLIC; analysts keep it for their notebooks.
    EXECUTE format('REVOKE TEMP ON DATABASE %I FROM PUBLIC, lmnh_loader', current_database());
    EXECUTE format('GRANT TEMP ON DATABASE %I TO lmnh_analyst', current_database());
    -- Nobody but the owner creates objects in the schema (PostgreSQL 15's default; older servers,
    -- RDS included, let PUBLIC create tables in "public").
    EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM PUBLIC', s);
    EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM lmnh_loader, lmnh_analyst', s);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO lmnh_loader, lmnh_analyst', s);

    -- Start from nothing, so a grant added by hand or by an older version of this file goes.
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM lmnh_loader, lmnh_analyst', s);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM lmnh_loader, lmnh_analyst', s);

    -- lmnh_analyst: read everything (tables and views), write nothing.
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO lmnh_analyst', s);

    -- lmnh_loader.
    -- Master data: the rules read what is "known"; exhibition objects add an exhibition with
    -- its department and floor when missing (INSERT ... WHERE NOT EXISTS ... ON CONFLICT DO
    -- NOTHING) and update an exhibition whose values changed. UPDATE only of the columns that
    -- update sets: an exhibition's public_id and site (which events are matched on) stay as
    -- inserted, and departments and floors are never updated. Ratings and requests only
    -- change through schema.sql, so they are read-only here.
    EXECUTE format('GRANT SELECT, INSERT ON %1$I.exhibition, %1$I.department, %1$I.floor '
                   'TO lmnh_loader', s);
    EXECUTE format('GRANT UPDATE (exhibition_name, exhibition_description, department_id, '
                   'floor_id, exhibition_start_date) ON %1$I.exhibition TO lmnh_loader', s);
    EXECUTE format('GRANT SELECT ON %1$I.rating, %1$I.request TO lmnh_loader', s);
    -- Provenance and progress: upserted, locked (SELECT ... FOR UPDATE), never deleted.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %1$I.event_source, %1$I.s3_object_load, '
                   '%1$I.kafka_offset TO lmnh_loader', s);
    -- Events and rejections: COPY in; DELETE of one source's rows when its object changed.
    -- No UPDATE: a stored event is never edited. No TRUNCATE.
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON %1$I.rating_interaction, '
                   '%1$I.request_interaction, %1$I.rejected_event TO lmnh_loader', s);
    -- replay.py re-checks rejections against today's master data: one that still fails keeps
    -- its row with the reason and detail of the rule that fails now. Only those two columns:
    -- where, what and when an event was (source, locator, payload, rejected_at) stay as stored.
    EXECUTE format('GRANT UPDATE (reason, detail) ON %1$I.rejected_event TO lmnh_loader', s);
    -- The alert outbox: consumer.py adds alerts with its events and its sender marks them
    -- sent or failed (UPDATE of sent_at, attempts, last_error, next_attempt_at). No DELETE:
    -- sent rows past their retention go through prune_sent_alerts (schema.sql), which never
    -- touches a pending one.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %1$I.alert_outbox TO lmnh_loader', s);
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %1$I.prune_sent_alerts(integer) FROM PUBLIC, '
                   'lmnh_analyst', s);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.prune_sent_alerts(integer) TO lmnh_loader', s);
    -- Identity columns draw from their sequences without a grant; this is for any serial
    -- column a future schema might add.
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA %I TO lmnh_loader', s);
    -- The reference-checking triggers run as the loader (SECURITY INVOKER, search_path pinned
    -- in schema.sql): they read the master and provenance tables, granted above, and call
    -- these functions. EXECUTE on them is the loader's only, not PUBLIC's.
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %1$I.key_range_covered(regclass, text, integer, '
                   'integer), %1$I.check_event_references(), %1$I.forbid_referenced_delete(), '
                   '%1$I.forbid_truncate() FROM PUBLIC, lmnh_analyst', s);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.key_range_covered(regclass, text, integer, '
                   'integer), %1$I.check_event_references(), %1$I.forbid_referenced_delete(), '
                   '%1$I.forbid_truncate() TO lmnh_loader', s);
END $$;
