-- LMNH kiosk pipeline: least-privilege roles.
--
-- Run by an administrator (the owner of the tables: the RDS master user, or postgres locally)
-- AFTER schema.sql, in the database that holds the schema, and again after every schema change
-- or `reset.sh` (a dropped table loses its grants):
--
--     psql -X -v ON_ERROR_STOP=1 -1 -f roles.sql
--     psql -X -v ON_ERROR_STOP=1 -1 -v loader_password="$LOADER_PW" -v analyst_password="$ANALYST_PW" -f roles.sql
--
-- or set the passwords interactively afterwards (hashed by psql, never sent or logged as text):
--
--     psql -c '\password lmnh_loader'      psql -c '\password lmnh_analyst'
--
-- It creates two roles (roles are cluster-wide; everything else below is per database):
--
--   lmnh_loader   LOGIN. What pipeline.py and consumer.py need, nothing more: read the master
--                 data, upsert exhibitions with their department and floor, write events,
--                 rejections, provenance, load records and Kafka offsets, and delete the rows of
--                 an S3 object whose content changed. It owns nothing, so it cannot DROP, ALTER
--                 or TRUNCATE a table, and it cannot CREATE anything in the schema. Set DB_USER /
--                 DB_PASS to it in the loaders' .env.
--   lmnh_analyst  LOGIN, read-only: SELECT on every table and view (analysis.ipynb, BI tools),
--                 with transactions read-only by default. Give people their own logins with
--                 `GRANT lmnh_analyst TO alice;` rather than sharing this one.
--
-- Idempotent and declarative: applying it again changes nothing, and it first revokes whatever
-- the two roles hold on the schema's tables, so the privileges below are exactly what they have.
-- With no password variable the roles keep their current password (none when just created):
-- fine for a local server that trusts every login, and for tests.

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

\if :{?loader_password}
ALTER ROLE lmnh_loader PASSWORD :'loader_password';
\endif
\if :{?analyst_password}
ALTER ROLE lmnh_analyst PASSWORD :'analyst_password';
\endif

-- ---------------------------------------------------------------- privileges (this database)
DO $$
DECLARE
    s TEXT := current_schema();
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO lmnh_loader, lmnh_analyst', current_database());
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
    -- Master data: the rules read what is "known"; exhibition objects upsert an exhibition with
    -- its department and floor (INSERT ... ON CONFLICT DO UPDATE ... RETURNING). Ratings and
    -- requests only change through schema.sql, so they are read-only here.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %1$I.exhibition, %1$I.department, %1$I.floor '
                   'TO lmnh_loader', s);
    EXECUTE format('GRANT SELECT ON %1$I.rating, %1$I.request TO lmnh_loader', s);
    -- Provenance and progress: upserted, locked (SELECT ... FOR UPDATE), never deleted.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %1$I.event_source, %1$I.s3_object_load, '
                   '%1$I.kafka_offset TO lmnh_loader', s);
    -- Events and rejections: COPY in; DELETE of one source's rows when its object changed.
    -- No UPDATE: a stored event is never edited. No TRUNCATE.
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON %1$I.rating_interaction, '
                   '%1$I.request_interaction, %1$I.rejected_event TO lmnh_loader', s);
    -- Identity columns draw from their sequences without a grant; this is for any serial
    -- column a future schema might add.
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA %I TO lmnh_loader', s);
    -- The reference-checking triggers run as the loader (SECURITY INVOKER): they read the master
    -- and provenance tables, granted above, and need EXECUTE where PUBLIC's was revoked.
    EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.check_event_references(), '
                   '%1$I.forbid_referenced_delete(), %1$I.forbid_truncate() TO lmnh_loader', s);
END $$;
