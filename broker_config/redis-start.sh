#!/bin/sh
# Start Redis with lorafleet's ACL users: compose's redis service runs this as its entrypoint.
#
#   redis-start.sh COMMAND...
#
# Renders the ACL template ($LF_REDIS_ACL_TEMPLATE, default /etc/lorafleet/redis-users.acl.template):
# every ${VAR} is replaced by the value of VAR in the environment, comment and blank lines are dropped.
# The result goes to $LF_REDIS_ACL_FILE (default /run/lorafleet/users.acl), readable by its owner only
# (the redis user when started as root), and then COMMAND runs in this process; it should start Redis
# with `--aclfile` on that file. A variable that is unset, empty or contains whitespace (an ACL file
# splits on spaces) stops it, naming the variable, before anything is written.
set -eu

template="${LF_REDIS_ACL_TEMPLATE:-/etc/lorafleet/redis-users.acl.template}"
aclfile="${LF_REDIS_ACL_FILE:-/run/lorafleet/users.acl}"

umask 077
mkdir -p "$(dirname "$aclfile")"
awk '
  /^[[:space:]]*(#|$)/ { next }
  {
    rest = $0
    out = ""
    while (match(rest, /\$\{[A-Za-z_][A-Za-z0-9_]*\}/)) {
      name = substr(rest, RSTART + 2, RLENGTH - 3)
      value = ENVIRON[name]
      if (value == "") {
        printf "redis-start: %s is not set (it is a password of %s)\n", name, FILENAME > "/dev/stderr"
        exit 1
      }
      if (value ~ /[[:space:]]/) {
        printf "redis-start: %s contains whitespace, which an ACL file cannot hold\n", name > "/dev/stderr"
        exit 1
      }
      out = out substr(rest, 1, RSTART - 1) value
      rest = substr(rest, RSTART + RLENGTH)
    }
    print out rest
  }
' "$template" >"$aclfile.tmp" || {
  rm -f "$aclfile.tmp"
  exit 1
}
mv "$aclfile.tmp" "$aclfile"
if [ "$(id -u)" = 0 ] && id redis >/dev/null 2>&1; then
  # the official image's entrypoint drops to the redis user before starting redis-server
  chown redis "$aclfile"
fi
exec "$@"
