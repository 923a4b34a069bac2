"""The Lua scripts that make shared state atomic in Redis (SPEC §10).

Each runs as one Redis command, so two nodes can never both take the last cell of a
rate or the last connection slot. Times are milliseconds. A `now` of -1 means the Redis
server's clock (production: the nodes' clocks may drift, Redis has one); tests pass their
own clock, so the scripts' precision is tested without sleeping.
"""

from __future__ import annotations

_NOW = """
local now = tonumber(ARGV[{i}])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
"""

# GCRA, the same algorithm as throttle/gcra.py: KEYS[1] holds the theoretical arrival time.
# ARGV: emission interval, tolerance ((burst - 1) x interval), now. Returns "0" when the
# cell is taken, else the wait in ms (a string: Lua numbers come back truncated otherwise).
GCRA = _NOW.format(i=3) + """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat - tolerance > now then
  return tostring(tat - tolerance - now)
end
tat = tat + interval
redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil(tat - now + tolerance + 1000))
return '0'
"""

# Connection slots as leases, shared fairly. KEYS[1]: a sorted set of lease ids
# ("<node>:<n>") scored by expiry, so a node that dies gives its slots back when its
# leases lapse; KEYS[2]: the nodes refused a slot lately ("wants"). A node may hold more
# than its fair share (max / nodes holding or wanting) only while no other node wants one.
# ARGV: lease id, node, max, now, lease ms, want ms. Returns {taken 0/1, fair share,
# 1 if another node wants a slot}: a node above its share then gives one back.
LEASE = _NOW.format(i=4) + """
local node, max, ttl, want = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local holders = redis.call('ZRANGE', KEYS[1], 0, -1)
local seen, n, mine, others = {[node] = true}, 1, 0, 0
for _, id in ipairs(holders) do
  local holder = string.match(id, '^(.*):%d+$') or id
  if holder == node then mine = mine + 1 end
  if not seen[holder] then seen[holder] = true; n = n + 1 end
end
for _, w in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if not seen[w] then seen[w] = true; n = n + 1 end
  if w ~= node then others = 1 end
end
local share = math.ceil(max / n)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  return {1, share, others}
end
if #holders >= max or (mine >= share and others == 1) then
  redis.call('ZADD', KEYS[2], now + want, node)
  redis.call('PEXPIRE', KEYS[2], want * 2)
  return {0, share, others}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('ZREM', KEYS[2], node)
return {1, share, others}
"""

# Campaign counters: every node writes its own absolute counts (fields "<node>:<i>"), so a
# write is idempotent and a Redis that lost its data is healed by the next write. Returns
# the sums over all nodes. ARGV: node, ttl seconds, count 0, count 1, ...
COUNTS = """
local n = #ARGV - 2
for i = 1, n do
  redis.call('HSET', KEYS[1], ARGV[1] .. ':' .. (i - 1), ARGV[i + 2])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
local sums = {}
for i = 1, n do sums[i] = 0 end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local idx = tonumber(string.match(all[i], ':(%d+)$'))
  if idx and idx < n then sums[idx + 1] = sums[idx + 1] + tonumber(all[i + 1]) end
end
return sums
"""

# Account records with a revision: a change made from revision r is stored only if the
# record is still at r (compare and set), then published. KEYS[1] records, KEYS[2] revisions.
# ARGV: id, record, expected revision, channel, message. Returns {new revision} or, on a
# conflict, {current revision, current record}.
ACCOUNT = """
local rev = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if rev ~= tonumber(ARGV[3]) then
  return {rev, redis.call('HGET', KEYS[1], ARGV[1])}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], rev + 1)
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {rev + 1}
"""
