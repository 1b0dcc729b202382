"""The commands of the ``longtail`` console script, one module each (train, stage2, eval, calibrate,
data, report, list). They sit above the library: they may import any package; nothing in the library
imports them (docs/ARCHITECTURE.md)."""
