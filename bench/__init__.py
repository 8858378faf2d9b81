"""Load benchmarks: Parley against Prosody and ejabberd on loopback (see docs/benchmarks.md)."""
