-- Prosody for the federation tests (tests/test_s2s_interop.py fills in the @NAMES@).
-- Adapted from /work/shared/peers: its own loopback address, names from /etc/hosts through lua-unbound,
-- a certificate from the test CA, which it also trusts, so that SASL EXTERNAL works both ways.
unbound = { hoststxt = "/etc/hosts" }
interfaces = { "@ADDRESS@" }
c2s_ports = { 5222 }
s2s_ports = { 5269 }
http_ports = {}
https_ports = {}
network_backend = "epoll"
data_path = "@DIR@/data"
pidfile = "@DIR@/prosody.pid"
daemonize = false
modules_enabled = {
  "disco"; "roster"; "saslauth"; "tls"; "dialback"; "s2s_bidi"; "smacks"; "vcard"; "pep"; "ping"; "time"; "version";
}
modules_disabled = { "posix" }
c2s_require_encryption = false
s2s_require_encryption = true
s2s_secure_auth = false
allow_unencrypted_plain_auth = true
authentication = "internal_hashed"
storage = "internal"
limits = {}
log = { @LOG_LEVEL@ = "@DIR@/prosody.log"; error = "@DIR@/prosody.err"; }
certificates = "@DIR@/certs"
ssl = { certificate = "@DIR@/certs/@DOMAIN@.crt"; key = "@DIR@/certs/@DOMAIN@.key"; cafile = "@DIR@/certs/ca.crt"; }
VirtualHost "@DOMAIN@"
  ssl = { certificate = "@DIR@/certs/@DOMAIN@.crt"; key = "@DIR@/certs/@DOMAIN@.key"; cafile = "@DIR@/certs/ca.crt"; }
Component "conference.@DOMAIN@" "muc"
  muc_room_locking = false
