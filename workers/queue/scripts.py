"""The queue's Lua scripts. Each runs atomically in Redis; the writing ones are idempotent, so a worker that lost
its connection mid-call simply runs them again. Replies the worker reads in bulk are single strings: redis-py's pure-Python RESP
parser costs tens of microseconds per array element, a string is one read.

Key names a script derives from a prefix (results) are not declared in KEYS: the queue needs a single Redis
instance (or one Cluster hash slot), not a Cluster spread over slots.
"""

# KEYS: requests stream. ARGV: group, consumer, count. Non-blocking XREADGROUP of new entries, replied as one
# string of records `<entry id> <kind> <length> <payload>`: kind `r` = the request JSON (field `r`), kind `x` =
# an entry without that field (payload: its field names, comma-separated).
READ = """
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
if not reply then return '' end
local out = {}
for _, e in ipairs(reply[1][2]) do
  local f, body, names = e[2], nil, {}
  for j = 1, #f, 2 do
    if f[j] == 'r' then body = f[j + 1] end
    names[#names + 1] = f[j]
  end
  if not body then body = table.concat(names, ','); out[#out + 1] = e[1] .. ' x ' .. #body .. ' ' .. body
  else out[#out + 1] = e[1] .. ' r ' .. #body .. ' ' .. body end
end
return table.concat(out)
"""

# KEYS: requests stream. ARGV: approximate maxlen, mode, result key prefix, then (request id, request JSON) pairs.
# mode `add`: every request is added; `skip`: one whose id has a result is not; `replace`: its result is deleted
# first. Returns per request, space-separated: its new entry id, `-` (skipped), or `=` + entry id (result replaced).
ENQUEUE = """
local out, mode, rk = {}, ARGV[2], ARGV[3]
for i = 4, #ARGV, 2 do
  local mark = ''
  if mode ~= 'add' and redis.call('EXISTS', rk .. ARGV[i]) == 1 then
    if mode == 'skip' then mark = '-' else redis.call('DEL', rk .. ARGV[i]); mark = '=' end
  end
  if mark == '-' then out[#out + 1] = '-'
  else out[#out + 1] = mark .. redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'r', ARGV[i + 1]) end
end
return table.concat(out, ' ')
"""

# KEYS: results stream. ARGV: ttl s, results maxlen, result key prefix, then one string of records
# `<id length> <json length> <id><json>` (one argument: redis-py packs each argument in Python).
# SET NX: a result already written (by a worker that died before acking) is kept, and announced only once.
# Returns one character per result: 1 = written now, 0 = existed.
WRITE_RESULTS = """
local blob, pos, out = ARGV[4], 1, {}
while pos <= #blob do
  local _, e, il, bl = string.find(blob, '^(%d+) (%d+) ', pos)
  il, bl = tonumber(il), tonumber(bl)
  local id = string.sub(blob, e + 1, e + il)
  if redis.call('SET', ARGV[3] .. id, string.sub(blob, e + il + 1, e + il + bl), 'NX', 'EX', ARGV[1]) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'id', id)
    out[#out + 1] = '1'
  else
    out[#out + 1] = '0'
  end
  pos = e + il + bl + 1
end
return table.concat(out)
"""

# KEYS: requests stream, errors hash. ARGV: group, entry ids separated by spaces. XACK before XDEL: an entry is
# never absent from the stream while still pending, which a reclaimer would report as lost.
ACK = """
local ids = {}
local function flush()
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
  redis.call('HDEL', KEYS[2], unpack(ids))
  ids = {}
end
for id in string.gmatch(ARGV[2], '%S+') do
  ids[#ids + 1] = id
  if #ids == 4000 then flush() end
end
if #ids > 0 then flush() end
return 1
"""

# KEYS: requests stream, dead stream, errors hash, then one result key per letter ('' when the request has no id).
# ARGV: group, result ttl s, then (entry id, request id, dead-letter json, result json) per letter.
DEAD_LETTER = """
local n = 0
for i = 4, #KEYS do
  local j = 4 * (i - 4) + 3
  local entry, id, letter, result = ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3]
  local fresh = true
  if id ~= '' then fresh = redis.call('SET', KEYS[i], result, 'NX', 'EX', ARGV[2]) end
  if fresh then redis.call('XADD', KEYS[2], '*', 'id', id, 'entry', entry, 'letter', letter); n = n + 1 end
  redis.call('XACK', KEYS[1], ARGV[1], entry)
  redis.call('XDEL', KEYS[1], entry)
  redis.call('HDEL', KEYS[3], entry)
end
return n
"""

# KEYS: requests stream. ARGV: group, consumer, entry ids. Resets the idle time of the ids this consumer still
# owns (XCLAIM JUSTID keeps the delivery count); returns the ids another consumer owns now. A plain XCLAIM would
# steal back entries another worker reclaimed meanwhile, and two workers would run them. Ids no longer pending
# (acked since the caller listed them) are skipped.
HEARTBEAT = """
local stolen = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] then
    if p[1][2] == ARGV[2] then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    else
      stolen[#stolen + 1] = ARGV[i]
    end
  end
end
return stolen
"""

# Reclaim idle entries of other (dead or stuck) consumers with XAUTOCLAIM. XAUTOCLAIM charges a delivery to
# every entry it takes, but an entry on its last allowed delivery must run alone (it may be the request that kills
# workers): a worker runs at most one such entry, and only when it holds nothing else. Entries it took but must not
# run now get their delivery count back and their idle time set to the claim threshold (XCLAIM RETRYCOUNT IDLE
# JUSTID), so they stay claimable at once, uncharged. Ids the caller already holds (its heartbeat was late) are kept
# as running here, count restored, idle reset. XAUTOCLAIM drops entries trimmed from the stream while pending from
# the group and reports them: they come back as lost (acked again, harmless).
# KEYS: requests stream. ARGV: group, consumer, min idle ms, start id, count, max deliveries, take a last-chance
# entry (1/0), then the ids the caller holds.
# Returns {next start id or '' when the scan is complete, {id, delivery count, fields, ...}, {lost ids}}.
RECLAIM = """
local group, me, idle, maxd = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[6])
local held = {}
for i = 8, #ARGV do held[ARGV[i]] = true end
local res = redis.call('XAUTOCLAIM', KEYS[1], group, me, idle, ARGV[4], 'COUNT', ARGV[5])
local claimed, solo_left = {}, ARGV[7] == '1'
for _, e in ipairs(res[2]) do
  local id = e[1]
  local n = redis.call('XPENDING', KEYS[1], group, id, id, 1)[1][4]
  local last_chance = n > 1 and n == maxd
  if held[id] then
    redis.call('XCLAIM', KEYS[1], group, me, 0, id, 'IDLE', 0, 'RETRYCOUNT', n - 1, 'JUSTID')
  elseif last_chance and not solo_left then
    redis.call('XCLAIM', KEYS[1], group, me, 0, id, 'IDLE', idle, 'RETRYCOUNT', n - 1, 'JUSTID')
  else
    if last_chance then solo_left = false end
    claimed[#claimed + 1] = id
    claimed[#claimed + 1] = n
    claimed[#claimed + 1] = e[2]
  end
end
local lost = res[3] or {}
for _, id in ipairs(lost) do redis.call('XACK', KEYS[1], group, id) end
local nxt = res[1]
if nxt == '0-0' then nxt = '' end
return {nxt, claimed, lost}
"""

# A restarted consumer takes back its own pending entries (any idle time) before reading new ones. XAUTOCLAIM
# cannot select one consumer's entries, so this lists them (XPENDING ... consumer) and claims them with XCLAIM,
# charging each a delivery, with the same last-chance rule as RECLAIM; entries trimmed while pending are lost.
# KEYS: requests stream. ARGV: group, consumer, start ('-' or '(id'), scan count, max deliveries, take a
# last-chance entry (1/0). Returns {last scanned id or '', {id, new delivery count, fields, ...}, {lost ids}}.
CLAIM_OWN = """
local group, me, maxd = ARGV[1], ARGV[2], tonumber(ARGV[5])
local rows = redis.call('XPENDING', KEYS[1], group, 'IDLE', 0, ARGV[3], '+', ARGV[4], me)
local claimed, lost, last, solo_left = {}, {}, '', ARGV[6] == '1'
for _, row in ipairs(rows) do
  local id, n = row[1], row[4] + 1
  last = id
  if #redis.call('XRANGE', KEYS[1], id, id) == 0 then
    redis.call('XACK', KEYS[1], group, id)
    lost[#lost + 1] = id
  else
    local last_chance = n > 1 and n == maxd
    if not last_chance or solo_left then
      if last_chance then solo_left = false end
      local got = redis.call('XCLAIM', KEYS[1], group, me, 0, id)
      if got[1] then
        claimed[#claimed + 1] = id
        claimed[#claimed + 1] = n
        claimed[#claimed + 1] = got[1][2]
      end
    end
  end
end
return {last, claimed, lost}
"""
