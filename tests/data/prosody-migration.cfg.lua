-- Prosody for tests/test_piefxis.py (the @NAMES@ are filled in): client connections only, on a free
-- loopback port, its data in Prosody's own file storage, for prosody-migrator to export as XEP-0227.
interfaces = { "127.0.0.1" }
c2s_ports = { @PORT@ }
s2s_ports = { @S2S_PORT@ }
http_ports = {}
https_ports = {}
data_path = "@DIR@/data"
pidfile = "@DIR@/prosody.pid"
daemonize = false
modules_enabled = { "disco"; "roster"; "saslauth"; "tls"; "vcard"; "private"; "mam"; "offline" }
modules_disabled = { "posix" }
c2s_require_encryption = false
authentication = "internal_hashed"
storage = "internal"
default_archive_policy = true
limits = {}
log = { error = "@DIR@/prosody.err"; }
ssl = { certificate = "@DIR@/@DOMAIN@.crt"; key = "@DIR@/@DOMAIN@.key"; }
VirtualHost "@DOMAIN@"
