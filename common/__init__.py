"""What every part of sntrack shares and no part owns: the configuration error, URL helpers, broker refusals.

A leaf package: it imports no other sntrack package, so producer, consumers and gateway may all use it without
crossing a wall (tests/test_import_walls.py). It is not contract (that is `schemas`): nothing here is on the wire."""
