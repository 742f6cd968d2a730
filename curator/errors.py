"""The errors curator raises on purpose.

Every one carries a message meant for the user: what went wrong and where
(file, line, field, workspace). The CLI prints the message and exits non-zero;
anything else that escapes is a bug.
"""


class CuratorError(Exception):
    """An error with a message for the user."""


class WorkspaceError(CuratorError):
    """No workspace where one was expected, or one that cannot be used."""


class CatalogLockedError(CuratorError):
    """Another process holds the catalog for writing."""


class SchemaError(CuratorError):
    """The catalog was written by a newer curator, or its schema is damaged."""


class BadInputError(CuratorError):
    """Input that cannot be ingested (raised at once under --strict)."""


class ArtifactError(CuratorError):
    """A file the catalog names (factors, sketch shards, an index, scores) is missing or damaged."""
