-- Prosody for benchmarks, written out by bench/servers.py (the @NAMES@ are filled in there).
-- The hot path matches Parley's: roster, presence, offline; no archive unless the profile asks;
-- no TLS requirement, PLAIN allowed in the clear, no rate limits, SCRAM with 4,096 iterations.
interfaces = { "@ADDRESS@" }
c2s_ports = { @PORT@ }
s2s_ports = {}
http_ports = { @HTTP_PORT@ }  -- mod_websocket at /xmpp-websocket, as Parley's websocket module
http_interfaces = { "@ADDRESS@" }
consider_bosh_secure = true
https_ports = {}
http_default_host = "@DOMAIN@"
consider_websocket_secure = true  -- as Parley's allow_unencrypted_plain: PLAIN over ws:// in the bench
cross_domain_websocket = true
network_backend = "epoll"
network_settings = { tcp_backlog = 1024 } -- as Parley's listen backlog; the default 128 drops SYNs in a storm
data_path = "@DIR@/data"
pidfile = "@DIR@/prosody.pid"
daemonize = false
modules_enabled = {
  "roster"; "saslauth"; "tls"; "disco"; "version"; "time"; "lastactivity"; "ping"; "vcard"; "register";
  "websocket";
  "bosh";
  @EXTRA_MODULES@
}
modules_disabled = { "posix" }
allow_registration = true
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_hashed"
default_iteration_count = 4096
@STORAGE@
limits = {}
archive_expires_after = "never"
log = { warn = "@DIR@/prosody.log" }
certificates = "@DIR@"
ssl = { certificate = "@DIR@/@DOMAIN@.crt"; key = "@DIR@/@DOMAIN@.key"; }
VirtualHost "@DOMAIN@"
