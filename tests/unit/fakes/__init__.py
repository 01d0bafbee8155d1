"""In-memory fakes of the persistence ports (cosmicpython's pattern): the unit of work, the
idempotency keys, the sequence numbers and every service's repositories, plus order's upstream
clients. Domain unit tests run the real use cases on them, with no database and no SQLAlchemy.

Each fake repository keeps the semantics of its SQL adapter (conditional saves, unique keys, event
sequences, cursors, paging order); tests/unit/test_fakes.py pins the ones a use case relies on.
"""
