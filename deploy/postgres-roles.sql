-- phivault on PostgreSQL: least privilege for the running server (SPEC §8).
--
-- Two roles:
--   * the OWNER owns the schema and every table, and runs `phivault migrate` (DDL). It can do
--     anything to the data, which is why audit checkpoints are kept outside the database.
--   * the RUNTIME role (`phivault_app` by default) is the one `phivault serve` and the other
--     commands log in as. It may read and write the application's tables, but on the audit
--     trail it may only append: INSERT and SELECT on `audit_events`; INSERT, SELECT and DELETE
--     on `audit_queue` (a trigger lets it delete only events already chained or rejected);
--     INSERT and SELECT on `audit_queue_rejected`; SELECT and UPDATE on `audit_head` (a
--     trigger lets the head name only the chain's last event); and INSERT and SELECT only on
--     `care_endings` (a patient's end of a doctor's care relationship is never taken back). It
--     owns nothing, may create nothing (no table, no schema, no temporary table), may
--     TRUNCATE nothing, and is a member of no role: so no DDL, no
--     `ALTER TABLE ... DISABLE TRIGGER`, no DROP, no `SET session_replication_role`.
--
-- Run it with psql, connected to phivault's database, after EVERY `phivault migrate`: it grants
-- from the current list of tables, so a table added by a migration gets its grants (default
-- privileges also give new tables plain DML at once; the audit-specific revocations below come
-- only from re-running this file). It is idempotent and runs in one transaction.
--
--   # Once, as an administrator (superuser or CREATEROLE): creates the runtime role.
--   psql "postgresql://admin@db/phivault" -v owner_role=phivault_owner -f postgres-roles.sql
--   psql "postgresql://admin@db/phivault" -c '\password phivault_app'
--   # After each `phivault migrate` (run with PHIVAULT_DATABASE_URL naming the owner):
--   psql "postgresql://phivault_owner@db/phivault" -f postgres-roles.sql
--   # Serve with PHIVAULT_DATABASE_URL=postgresql+asyncpg://phivault_app:...@db/phivault
--
-- psql variables (all optional):
--   app_role      the runtime role (default phivault_app); created LOGIN if it does not exist
--   owner_role    the role that owns the tables (default: the role running this file); when it
--                 differs from the current role, the grants are made as it (SET ROLE)
--   schema        the schema migrations create the tables in (default public)
--   app_password  sets the runtime role's password (needs CREATEROLE). The statement reaches
--                 the server, so where statements are logged pass a SCRAM verifier
--                 ('SCRAM-SHA-256$...') or use psql's \password instead.
-- The database is the one psql is connected to.

\set ON_ERROR_STOP on
\if :{?app_role}
\else
  \set app_role phivault_app
\endif
\if :{?schema}
\else
  \set schema public
\endif
\if :{?owner_role}
\else
  SELECT current_user AS owner_role \gset
\endif

BEGIN;

-- The DO blocks below read the variables from settings (psql does not interpolate in $$).
SELECT set_config('phivault.app_role', :'app_role', true) AS _app,
       set_config('phivault.owner_role', :'owner_role', true) AS _owner,
       set_config('phivault.schema', :'schema', true) AS _schema \gset

-- 1. The runtime role: created if missing; stripped of any power it must not have.
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION '
              'NOBYPASSRLS', :'app_role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'app_role') \gexec
SELECT format('ALTER ROLE %I NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS',
              rolname)
  FROM pg_roles
 WHERE rolname = :'app_role'
   AND (rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication OR rolbypassrls) \gexec
\if :{?app_password}
  SELECT format('ALTER ROLE %I PASSWORD %L', :'app_role', :'app_password') \gexec
\endif

-- 2. Preconditions: the tables exist (migrate has run), the owner owns them, the runtime role
-- owns nothing and is nobody's member (a membership would hand it the owner's powers).
DO $$
DECLARE
    app name := current_setting('phivault.app_role');
    owner name := current_setting('phivault.owner_role');
    s name := current_setting('phivault.schema');
    missing text;
    foreign_owned text;
    app_owns text;
    app_member_of text;
BEGIN
    IF app = owner THEN
        RAISE EXCEPTION 'the runtime role and the owner role must differ (both are %)', app;
    END IF;
    SELECT string_agg(t, ', ') INTO missing
      FROM unnest(ARRAY['audit_events', 'audit_queue', 'audit_head',
                        'audit_queue_rejected', 'care_endings']) AS t
     WHERE to_regclass(format('%I.%I', s, t)) IS NULL;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'no table % in schema %: run `phivault migrate` (as %) first',
            missing, s, owner;
    END IF;
    SELECT string_agg(format('%s (owned by %s)', c.relname, pg_get_userbyid(c.relowner)), ', ')
      INTO foreign_owned
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = s AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
       AND pg_get_userbyid(c.relowner) <> owner;
    IF foreign_owned IS NOT NULL THEN
        RAISE EXCEPTION 'not owned by the owner role %: %. Run `phivault migrate` as %, or '
            'pass -v owner_role=<the role that ran it>', owner, foreign_owned, owner;
    END IF;
    SELECT string_agg(what, ', ') INTO app_owns FROM (
        SELECT format('relation %s', relname) AS what FROM pg_class
         WHERE pg_get_userbyid(relowner) = app
        UNION ALL SELECT format('schema %s', nspname) FROM pg_namespace
         WHERE pg_get_userbyid(nspowner) = app
        UNION ALL SELECT format('function %s', proname) FROM pg_proc
         WHERE pg_get_userbyid(proowner) = app
        UNION ALL SELECT format('type %s', typname) FROM pg_type
         WHERE pg_get_userbyid(typowner) = app
        UNION ALL SELECT format('database %s', datname) FROM pg_database
         WHERE pg_get_userbyid(datdba) = app AND datname = current_database()) AS owned;
    IF app_owns IS NOT NULL THEN
        RAISE EXCEPTION 'the runtime role % owns %: an owner can run DDL (ALTER OWNER these '
            'to %)', app, app_owns, owner;
    END IF;
    SELECT string_agg(pg_get_userbyid(m.roleid), ', ') INTO app_member_of
      FROM pg_auth_members m WHERE pg_get_userbyid(m.member) = app;
    IF app_member_of IS NOT NULL THEN
        RAISE EXCEPTION 'the runtime role % is a member of %: REVOKE that membership', app,
            app_member_of;
    END IF;
END
$$;

-- 3. Grants are made as the owner (so that they and the default privileges are the owner's).
SELECT format('SET LOCAL ROLE %I', :'owner_role') WHERE current_user <> :'owner_role' \gexec

-- The database: connect, nothing else. TEMPORARY is revoked from PUBLIC (it is granted to
-- PUBLIC by default) because a temporary table named like an audit table would shadow it for
-- the triggers' unqualified lookups; CREATE would let a role make a schema of its own.
SELECT format('REVOKE ALL ON DATABASE %I FROM %I', current_database(), :'app_role') \gexec
SELECT format('REVOKE CREATE, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database()) \gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'app_role') \gexec

-- The schema: look up its objects, create none (PostgreSQL < 15 granted CREATE to PUBLIC).
REVOKE ALL ON SCHEMA :"schema" FROM :"app_role";
REVOKE CREATE ON SCHEMA :"schema" FROM PUBLIC;
GRANT USAGE ON SCHEMA :"schema" TO :"app_role";

-- Tables: start from nothing, give plain DML on every table, then take back what the audit
-- trail's tables must not allow. In this order, a table added by a migration is covered.
REVOKE ALL ON ALL TABLES IN SCHEMA :"schema" FROM PUBLIC, :"app_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA :"schema" TO :"app_role";
-- The chain: append and read only (its trigger refuses UPDATE/DELETE/TRUNCATE even to the
-- owner; the missing privilege refuses them before any trigger runs).
REVOKE UPDATE, DELETE ON :"schema".audit_events FROM :"app_role";
-- The queue: requests insert, the sequencer reads and deletes what it has chained (its
-- trigger refuses deleting an event not yet in audit_events, and any UPDATE).
REVOKE UPDATE ON :"schema".audit_queue FROM :"app_role";
-- Events the sequencer rejected: kept as found, append-only.
REVOKE UPDATE, DELETE ON :"schema".audit_queue_rejected FROM :"app_role";
-- The head: one row, read and moved by the sequencer (SELECT ... FOR UPDATE needs UPDATE);
-- never inserted or deleted.
REVOKE INSERT, DELETE ON :"schema".audit_head FROM :"app_role";
-- Care endings (SPEC §7): a patient ended a doctor's care relationship. Appended and read,
-- never changed or deleted: an edited or deleted end would hand the doctor's access back.
REVOKE UPDATE, DELETE ON :"schema".care_endings FROM :"app_role";
-- Alembic's bookkeeping: readable (to tell the schema's revision), never written.
REVOKE INSERT, UPDATE, DELETE ON :"schema".alembic_version FROM :"app_role";

-- Sequences (audit_queue's id): nextval only; no setval (UPDATE).
REVOKE ALL ON ALL SEQUENCES IN SCHEMA :"schema" FROM PUBLIC, :"app_role";
GRANT USAGE ON ALL SEQUENCES IN SCHEMA :"schema" TO :"app_role";

-- Tables and sequences that future migrations create (as the owner) get the same plain DML at
-- once, so a deployment works between `phivault migrate` and the re-run of this file; that
-- re-run applies the audit revocations above to whatever is new.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA :"schema"
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA :"schema"
    GRANT USAGE ON SEQUENCES TO :"app_role";

-- 4. Check the outcome as PostgreSQL itself answers it (through PUBLIC and memberships too),
-- so this file fails loudly rather than leave the runtime role more than it should have.
DO $$
DECLARE
    app name := current_setting('phivault.app_role');
    s name := current_setting('phivault.schema');
    problems text[] := '{}';
    expected record;
    granted boolean;
    r record;
BEGIN
    FOR expected IN
        SELECT * FROM (VALUES
            ('audit_events', 'SELECT', true), ('audit_events', 'INSERT', true),
            ('audit_events', 'UPDATE', false), ('audit_events', 'DELETE', false),
            ('audit_queue', 'SELECT', true), ('audit_queue', 'INSERT', true),
            ('audit_queue', 'DELETE', true), ('audit_queue', 'UPDATE', false),
            ('audit_head', 'SELECT', true), ('audit_head', 'UPDATE', true),
            ('audit_head', 'INSERT', false), ('audit_head', 'DELETE', false),
            ('audit_queue_rejected', 'SELECT', true), ('audit_queue_rejected', 'INSERT', true),
            ('audit_queue_rejected', 'UPDATE', false), ('audit_queue_rejected', 'DELETE', false),
            ('care_endings', 'SELECT', true), ('care_endings', 'INSERT', true),
            ('care_endings', 'UPDATE', false), ('care_endings', 'DELETE', false)
        ) AS v(tbl, privilege, allowed)
    LOOP
        granted := has_table_privilege(app, format('%I.%I', s, expected.tbl),
                                       expected.privilege);
        IF granted <> expected.allowed THEN
            problems := problems || format('%s %s on %s', CASE WHEN granted THEN 'has'
                ELSE 'lacks' END, expected.privilege, expected.tbl);
        END IF;
    END LOOP;
    FOR r IN
        SELECT c.relname, p.privilege FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
          CROSS JOIN (VALUES ('TRUNCATE'), ('REFERENCES'), ('TRIGGER')) AS p(privilege)
         WHERE n.nspname = s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
           AND has_table_privilege(app, c.oid, p.privilege)
    LOOP
        problems := problems || format('has %s on %s', r.privilege, r.relname);
    END LOOP;
    IF has_schema_privilege(app, s, 'CREATE') THEN
        problems := problems || format('has CREATE on schema %s', s);
    END IF;
    IF has_database_privilege(app, current_database(), 'CREATE') THEN
        problems := problems || 'has CREATE on the database'::text;
    END IF;
    IF has_database_privilege(app, current_database(), 'TEMPORARY') THEN
        problems := problems || 'has TEMPORARY on the database'::text;
    END IF;
    IF current_setting('server_version_num')::int >= 150000 THEN
        EXECUTE 'SELECT has_parameter_privilege($1, ''session_replication_role'', ''SET'')'
            INTO granted USING app;
        IF granted THEN
            problems := problems || 'may SET session_replication_role'::text;
        END IF;
    END IF;
    IF cardinality(problems) > 0 THEN
        RAISE EXCEPTION 'runtime role %: %', app, array_to_string(problems, '; ');
    END IF;
END
$$;

COMMIT;
\echo 'phivault: runtime role' :'app_role' 'holds least privilege on schema' :'schema'
