#!/bin/sh
# Writes the Redis ACL file (users.acl) for mlx-verify to stdout:
#   APP_REDIS_PASSWORD=... RUNNER_REDIS_PASSWORD=... [RUNNER_QUEUES="verify verify-large"] \
#     sh deploy/redis-acl.sh > users.acl
# then start Redis with `--aclfile /path/to/users.acl` (docs/deploy.md, "Redis users").
#
# Users:
#   default  off: no unauthenticated access, and nobody can log in as it. It keeps every
#            permission because Redis 7.0 replays the AOF as this user and re-checks
#            its ACL at each EXEC: with `-@all` every MULTI/EXEC in the AOF (rq's enqueue,
#            the webhook dedupe) is dropped on restart, silently (redis/redis#14541).
#   app      the server and the report worker: every key and command.
#   runner   the runners: only the rq keys of the runner queues, the verify jobs (their
#            status, result and meta are a runner's only output: the server's collector,
#            app/collector.py, reads them and enqueues the report jobs) and its own
#            workers' keys. No job into the report queue (its worker holds the App key),
#            no `mlxv:*` key (githubkit's cached App JWT and installation tokens,
#            sessions, job state, the run store), no other rq job (the report queue's
#            webhook payloads), no KEYS/SCAN, no admin commands.
# Passwords are stored as SHA-256 hashes; the file holds no plain-text password.
set -eu

: "${APP_REDIS_PASSWORD:?set APP_REDIS_PASSWORD (the server and report worker)}"
: "${RUNNER_REDIS_PASSWORD:?set RUNNER_REDIS_PASSWORD (the runners)}"
RUNNER_QUEUES="${RUNNER_QUEUES:-verify verify-large}"

for password in "$APP_REDIS_PASSWORD" "$RUNNER_REDIS_PASSWORD"; do
  if [ "${#password}" -lt 24 ]; then
    echo "redis-acl.sh: passwords must have at least 24 characters" >&2
    exit 2
  fi
done
[ "$APP_REDIS_PASSWORD" != "$RUNNER_REDIS_PASSWORD" ] || {
  echo "redis-acl.sh: the runner password must differ from the app password" >&2; exit 2; }

sha() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }

# Keys of one runner queue: the queue list, its registries and its scheduler lock.
queue_keys=""
for queue in $RUNNER_QUEUES; do
  case "$queue" in
    report|*[!A-Za-z0-9_-]*) echo "redis-acl.sh: bad runner queue name: $queue" >&2; exit 2;;
  esac
  for kind in queue wip finished failed scheduled deferred canceled ready registry \
              clean_registries scheduler-lock workers; do
    queue_keys="$queue_keys ~rq:$kind:$queue"
  done
  queue_keys="$queue_keys ~rq:queue:$queue:*"  # rq:queue:NAME:intermediate
done

echo "user default off ~* &* +@all"
echo "user app on #$(sha "$APP_REDIS_PASSWORD") ~* &* +@all"
# Commands: what rq's worker, job, queue and registry code sends (connection, hashes,
# lists, sorted sets, sets, streams for results, pub/sub for stop commands, transactions).
echo "user runner on #$(sha "$RUNNER_REDIS_PASSWORD") resetkeys resetchannels -@all" \
  "+ping +hello +auth +select +echo +time +info +client|setname +client|getname +client|id +client|info" \
  "+exists +type +ttl +pttl +del +unlink +expire +pexpire +expireat" \
  "+persist +get +set +hset +hsetnx +hget +hmget +hmset +hgetall +hdel +hexists +hincrby" \
  "+hincrbyfloat +hlen +hkeys +lpush +rpush +lpop +rpop +lrem +lrange +llen +lindex" \
  "+lpos +lmove +blmove +blpop +brpop +rpoplpush +zadd +zrem +zrange +zrangebyscore" \
  "+zrevrangebyscore +zcard +zscore +zremrangebyscore +zpopmin +sadd +srem +smembers" \
  "+scard +sismember +xadd +xrange +xrevrange +xtrim +xlen +publish +subscribe" \
  "+unsubscribe +multi +exec +discard +watch +unwatch +eval +evalsha +script|load" \
  "+script|exists" \
  "$queue_keys" \
  "~rq:queues ~rq:workers ~rq:worker:runner-* ~rq:job:verify-* ~rq:job::verify-*" \
  "~rq:results:verify-*" \
  "~rq:executions:verify-* ~rq:execution:verify-* ~rq:scheduler:* %R~rq:suspended %R~rq:rl-keys" \
  "~rq:clean_groups %R~rq:groups" \
  "&rq:pubsub:runner-*"
