"""In-memory fakes of the persistence ports (cosmicpython's pattern): the unit of work, the
idempotency keys, the sequence numbers and every service's repositories, plus order's upstream
clients and a clock the test moves. Domain unit tests run the real use cases on them, with no
database and no SQLAlchemy (tests/unit/test_fakes.py checks both).

Each fake repository keeps the semantics of its SQL adapter (conditional saves, unique keys, event
sequences, cursors, paging order); test_fakes.py pins the ones a use case relies on.

A new service's fakes follow the same three steps (see user.py, the smallest):
1. a `Tables` subclass with one dict or list per table, holding immutable values;
2. a repository implementing the domain's port, reading its tables with `tables_of(session, MyTables)`
   and writing them with `tables_of(session, MyTables, write=True)`;
3. units: `session_units(MyTables())` when the use case takes a repository factory, or
   `InMemoryUnits(MyTables(), MyRepository)` when its units hand over the repository (payment).
"""
