"""The catalog's schema, as an ordered list of migrations.

Migration N takes a catalog at schema version N-1 to version N. A catalog
records its version in ``schema_version``; opening it for writing applies the
missing migrations in one transaction. Never edit a migration that has shipped:
add a new one.

Documents live in ``document_rows``; every reader uses the ``documents`` view,
which shows only rows of *complete* ingest batches. An ingest commits its rows
in chunks (bounded memory), but they stay invisible until the batch is marked
complete, and the rows of a batch that never completed (a killed process) are
deleted the next time the catalog is opened for writing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "sources, documents, ingest batches, token counts",
        """
        CREATE TABLE sources (
            name        VARCHAR PRIMARY KEY,
            kind        VARCHAR NOT NULL,      -- default kind of the source's documents
            created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
        );

        CREATE TABLE ingest_batches (
            id            INTEGER PRIMARY KEY,
            source        VARCHAR NOT NULL,
            status        VARCHAR NOT NULL,    -- running | complete
            fingerprint   VARCHAR NOT NULL,    -- of the inputs (paths, sizes, mtimes) and options
            inputs        JSON NOT NULL,       -- the paths as given
            options       JSON NOT NULL,
            started_at    TIMESTAMP NOT NULL,
            finished_at   TIMESTAMP,
            records_read  BIGINT,
            inserted      BIGINT,
            duplicates    BIGINT,
            skipped       BIGINT,
            bytes_read    BIGINT,
            problems      JSON                 -- the first skipped records: origin + reason
        );

        CREATE TABLE document_rows (
            id            BIGINT PRIMARY KEY,
            source        VARCHAR NOT NULL,
            kind          VARCHAR NOT NULL,
            external_id   VARCHAR,             -- the record's own id, when it has one
            origin        VARCHAR NOT NULL,    -- where it was read: file:line, file#row, path
            text          VARCHAR NOT NULL,
            chars         BIGINT NOT NULL,
            bytes         BIGINT NOT NULL,     -- UTF-8 size of text
            content_hash  VARCHAR NOT NULL,    -- blake2b-128 of the normalised text
            metadata      JSON,
            batch_id      INTEGER NOT NULL
        );

        CREATE VIEW documents AS
            SELECT d.* FROM document_rows d
            JOIN ingest_batches b ON b.id = d.batch_id
            WHERE b.status = 'complete';

        -- Token counts depend on the tokenizer, so they are keyed by it.
        CREATE TABLE token_counts (
            doc_id      BIGINT NOT NULL,
            tokenizer   VARCHAR NOT NULL,
            tokens      BIGINT NOT NULL,
            PRIMARY KEY (doc_id, tokenizer)
        );
        """,
    ),
    Migration(
        2,
        "models, EK-FAC factors, queries, runs",
        """
        -- A model is known by a hash of its config and weights, so the same weights
        -- loaded from a GGUF file or a saved directory are one model.
        CREATE TABLE models (
            id            VARCHAR PRIMARY KEY, -- blake2b of config + weights
            name          VARCHAR NOT NULL,    -- as the user gave it (short name, path)
            format        VARCHAR NOT NULL,    -- hf | gguf
            location      VARCHAR NOT NULL,    -- resolved directory or file
            tokenizer_id  VARCHAR NOT NULL,    -- blake2b of vocabulary + special tokens
            info          JSON NOT NULL,       -- architecture, sizes, vocabulary
            added_at      TIMESTAMP NOT NULL DEFAULT current_timestamp
        );

        CREATE TABLE factors (
            id            VARCHAR PRIMARY KEY,
            model_id      VARCHAR NOT NULL,
            tokenizer_id  VARCHAR NOT NULL,
            path          VARCHAR NOT NULL,    -- safetensors file, relative to the workspace
            modules       JSON NOT NULL,       -- tracked module names, in order
            settings      JSON NOT NULL,       -- the FitConfig
            stats         JSON NOT NULL,       -- sequences, tokens, documents, timings
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
        );

        CREATE TABLE queries (
            id            VARCHAR PRIMARY KEY,
            task          VARCHAR NOT NULL,
            prompt        VARCHAR NOT NULL,
            completion    VARCHAR NOT NULL,
            answer        VARCHAR,
            query_set     VARCHAR NOT NULL,    -- the generation or import it came from
            metadata      JSON,
            added_at      TIMESTAMP NOT NULL DEFAULT current_timestamp
        );

        CREATE TABLE runs (
            id            VARCHAR PRIMARY KEY,
            kind          VARCHAR NOT NULL,    -- score
            method        VARCHAR NOT NULL,    -- exact | sketch
            model_id      VARCHAR NOT NULL,
            factors_id    VARCHAR,
            query_ids     JSON NOT NULL,
            settings      JSON NOT NULL,
            out_path      VARCHAR NOT NULL,
            stats         JSON NOT NULL,       -- documents, windows, tokens, per-query losses, timings
            finished_at   TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        """,
    ),
    Migration(
        3,
        "rankings, mixtures, exports",
        """
        CREATE TABLE rankings (
            name          VARCHAR PRIMARY KEY,
            run_id        VARCHAR NOT NULL,
            tasks         JSON NOT NULL,
            query_ids     JSON NOT NULL,
            aggregate     VARCHAR NOT NULL,    -- mean-z | mean | max | rank-vote
            normalize     VARCHAR NOT NULL,    -- per-nat | per-token | raw
            tokenizer_id  VARCHAR NOT NULL,    -- whose token counts the ranking used
            documents     BIGINT NOT NULL,
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
        );

        CREATE TABLE ranking_scores (
            ranking       VARCHAR NOT NULL,
            doc_id        BIGINT NOT NULL,
            score         DOUBLE NOT NULL,     -- the aggregated reasoning score
            rank          BIGINT NOT NULL,     -- 1 = most helpful
            PRIMARY KEY (ranking, doc_id)
        );

        CREATE TABLE mixtures (
            name          VARCHAR PRIMARY KEY,
            ranking       VARCHAR NOT NULL,
            spec          JSON NOT NULL,       -- the MixSpec
            documents     BIGINT NOT NULL,
            tokens        BIGINT NOT NULL,
            per_source    JSON NOT NULL,       -- source -> documents, tokens, share
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
        );

        CREATE TABLE mixture_docs (
            mixture       VARCHAR NOT NULL,
            position      BIGINT NOT NULL,     -- order of selection
            doc_id        BIGINT NOT NULL,
            tokens        BIGINT NOT NULL,
            score         DOUBLE NOT NULL,
            PRIMARY KEY (mixture, doc_id)
        );

        CREATE TABLE exports (
            path          VARCHAR PRIMARY KEY,
            mixture       VARCHAR NOT NULL,
            format        VARCHAR NOT NULL,
            manifest      JSON NOT NULL,
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        """,
    ),
    Migration(
        4,
        "sketch stores and their FAISS indexes",
        """
        CREATE TABLE sketch_stores (
            id            VARCHAR PRIMARY KEY,
            path          VARCHAR NOT NULL,    -- folder of shards + manifest, relative to the workspace
            factors_id    VARCHAR NOT NULL,
            method        VARCHAR NOT NULL,    -- query-subspace | eigen | random
            manifest      JSON NOT NULL,
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
        );

        CREATE TABLE sketch_indexes (
            name          VARCHAR PRIMARY KEY,
            store_id      VARCHAR NOT NULL,
            factory       VARCHAR NOT NULL,    -- a FAISS index-factory string
            path          VARCHAR NOT NULL,
            rows          BIGINT NOT NULL,
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
        );

        -- FAISS row r of an index is document doc_id.
        CREATE TABLE index_rows (
            index_name    VARCHAR NOT NULL,
            row           BIGINT NOT NULL,
            doc_id        BIGINT NOT NULL,
            PRIMARY KEY (index_name, row)
        );
        """,
    ),
    Migration(
        5,
        "content keys: each document's content hash as a 128-bit integer, for ingest's duplicate check",
        """
        -- The same blake2b-128 as content_hash, as a number: ingest's duplicate
        -- check joins every stored key against a chunk, and a 16-byte integer
        -- joins several times faster than its 32-character hex text. No index:
        -- an ART over random keys costs more per ingest (lookups load it, every
        -- checkpoint rewrites it) than the column scan it would replace.
        ALTER TABLE document_rows ADD COLUMN content_key UHUGEINT;
        UPDATE document_rows SET content_key = ('0x' || content_hash)::UHUGEINT;

        -- Readers keep seeing the columns they saw before.
        CREATE OR REPLACE VIEW documents AS
            SELECT d.* EXCLUDE (content_key) FROM document_rows d
            JOIN ingest_batches b ON b.id = d.batch_id
            WHERE b.status = 'complete';
        """,
    ),
    Migration(
        6,
        "the HTTP service: jobs and API tokens",
        """
        -- Jobs submitted to `curator serve`. The server keeps live progress in
        -- memory; this row is written at each change of state, so a server that
        -- was killed finds its running jobs again and marks them interrupted.
        CREATE TABLE jobs (
            id            VARCHAR PRIMARY KEY,
            kind          VARCHAR NOT NULL,    -- ingest | fit | score | sketch | index | rank | mix | export | audit
            state         VARCHAR NOT NULL,    -- queued | running | done | failed | cancelled | interrupted
            params        JSON NOT NULL,       -- the request as submitted
            device        VARCHAR NOT NULL,
            attempts      INTEGER NOT NULL,    -- worker starts, resumptions included
            progress      JSON,                -- the last progress report
            result        JSON,
            error         VARCHAR,
            submitted_at  TIMESTAMP NOT NULL,
            started_at    TIMESTAMP,
            finished_at   TIMESTAMP
        );

        -- Bearer tokens, stored as a salted SHA-256 of the secret: the catalog
        -- never holds a usable token.
        CREATE TABLE api_tokens (
            id            VARCHAR PRIMARY KEY, -- the public part of the token
            name          VARCHAR NOT NULL,
            scope         VARCHAR NOT NULL,    -- read | write
            salt          VARCHAR NOT NULL,
            digest        VARCHAR NOT NULL,    -- sha256(salt || secret), hex
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        """,
    ),
    Migration(
        7,
        "evaluations: mixtures and baselines trained at equal tokens, measured per arm and seed",
        """
        -- One `curator evaluate`: its settings and where its report is. Its work folder
        -- (checkpoints, finished arms) is reports/evaluations/ID in the workspace.
        CREATE TABLE evaluations (
            id            VARCHAR PRIMARY KEY,
            mixtures      JSON NOT NULL,
            baselines     JSON NOT NULL,
            model_id      VARCHAR NOT NULL,    -- the starting weights (or the from-scratch config's id)
            settings      JSON NOT NULL,       -- the EvaluateConfig
            state         VARCHAR NOT NULL,    -- running | done
            report        VARCHAR,             -- the HTML report; the JSON sits beside it
            started_at    TIMESTAMP NOT NULL DEFAULT current_timestamp,
            finished_at   TIMESTAMP
        );

        -- One row per arm and seed; arm 'base' is the model before training.
        CREATE TABLE evaluation_results (
            evaluation_id   VARCHAR NOT NULL,
            arm             VARCHAR NOT NULL,
            kind            VARCHAR NOT NULL,  -- base | mixture | random | source-matched | bottom
            seed            INTEGER NOT NULL,
            documents       BIGINT,
            distinct_tokens BIGINT,            -- tokens of the arm's documents
            trained_tokens  BIGINT NOT NULL,
            reasoning_loss  DOUBLE NOT NULL,   -- nats per completion token
            factual_loss    DOUBLE,
            general_ppl     DOUBLE NOT NULL,
            accuracy        DOUBLE,
            details         JSON NOT NULL,     -- per task, the loss curve, timings
            PRIMARY KEY (evaluation_id, arm, seed)
        );
        """,
    ),
    Migration(
        8,
        "jobs wait for the jobs they follow",
        """
        -- The ids of the jobs a job waits for (until they end) before it runs.
        ALTER TABLE jobs ADD COLUMN after_jobs JSON;
        """,
    ),
    Migration(
        9,
        "ranking_scores without its (ranking, doc_id) key",
        """
        -- The key cost more than it guarded: `curator rank` writes one row per document by
        -- construction (its staged file comes from per-document sums, or a GROUP BY doc_id), and
        -- keeping DuckDB's index of 2M keys took 2.6 s of a 4.6 s ranking and 3.7 s to delete a
        -- replaced ranking (0.7 s and 0.06 s without it; measured on this project's 2-core machine).
        -- A ranking's rows are inserted together, so its reads skip other rankings' row groups by
        -- their min/max statistics where the names differ early enough (DuckDB keeps a prefix of
        -- a VARCHAR's statistics); otherwise a read scans the table, milliseconds per million rows.
        CREATE TABLE ranking_scores_unkeyed (
            ranking       VARCHAR NOT NULL,
            doc_id        BIGINT NOT NULL,
            score         DOUBLE NOT NULL,     -- the aggregated reasoning score
            rank          BIGINT NOT NULL      -- 1 = most helpful
        );
        INSERT INTO ranking_scores_unkeyed SELECT ranking, doc_id, score, rank FROM ranking_scores
            ORDER BY ranking, doc_id;
        DROP TABLE ranking_scores;
        ALTER TABLE ranking_scores_unkeyed RENAME TO ranking_scores;
        """,
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version
