//! The Lua scripts that make each step atomic on the server: a publish that checks the queue's length, a
//! settle or answer that only the delivery's owner can make, a requeue that never loses nor doubles a copy.
//!
//! Every script that settles a delivery first asks `XPENDING` who holds it: a worker whose delivery another
//! worker claimed (it was away past the visibility timeout) gets -1 and changes nothing.

use redis::Script;

/// The group of a service queue's stream.
pub(super) const QUEUE_GROUP: &str = "mqrpc";

/// `KEYS[1]` the stream, `KEYS[2]` the queue's meta hash, `KEYS[3]` its delayed entries' sorted set; `ARGV` the
/// entry's fields. 1 when added to a queue with a maximum length, 2 when added to one without, 0 when the queue
/// is full (ready entries, the stream's length less those handed out, and delayed ones at `max_len`), -1 when
/// the queue was never declared.
pub(super) fn publish() -> Script {
    Script::new(&format!(
        "{ROOM}
local max = room(KEYS[1], KEYS[2], KEYS[3])
if max == -1 or max == 0 then return max end
redis.call('XADD', KEYS[1], '*', unpack(ARGV))
return max"
    ))
}

/// `room(stream, meta, delayed)`: -1 when the queue was never declared, 0 when it is full (ready entries, the
/// stream's length less those handed out, and delayed ones at its `max_len`), 1 when it has room below a maximum
/// length, 2 when it has none.
const ROOM: &str = r"
local function room(stream, meta, delayed)
  if redis.call('EXISTS', meta) == 0 then return -1 end
  local max = redis.call('HGET', meta, 'max_len')
  if not max then return 2 end
  local held = redis.call('XPENDING', stream, 'mqrpc')[1]
  local waiting = redis.call('XLEN', stream) - held + redis.call('ZCARD', delayed)
  if waiting >= tonumber(max) then return 0 end
  return 1
end
";

/// Redis's clock in milliseconds, as `now`.
const NOW: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
";

/// Puts an entry in a queue's delayed set: `KEYS[1]` the sorted set (member, due time by Redis's clock in ms),
/// `KEYS[2]` the hash of the members' entries (their fields, packed by `cmsgpack`); `ARGV[d]` the delay in
/// milliseconds, `ARGV[d + 1]` the member, then the fields.
const HOLD: &str = r"
local function hold(d)
  local fields = {}
  for i = d + 2, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[d]), ARGV[d + 1])
  redis.call('HSET', KEYS[2], ARGV[d + 1], cmsgpack.pack(fields))
end
";

/// A publish with a delay: `KEYS[1]` the sorted set, `KEYS[2]` the hash of delayed entries, `KEYS[3]` the
/// stream, `KEYS[4]` the queue's meta hash; `ARGV[1]` the delay in milliseconds, `ARGV[2]` the member (unique),
/// then the entry's fields. 1 held, 0 the queue is full (as [`publish`]), -1 the queue was never declared.
pub(super) fn delay() -> Script {
    Script::new(&format!(
        "{NOW}{HOLD}{ROOM}
local max = room(KEYS[3], KEYS[4], KEYS[1])
if max == -1 or max == 0 then return max end
hold(1)
return 1"
    ))
}

/// Moves a queue's delayed entries that are due to its stream, oldest first: `KEYS[1]` the sorted set,
/// `KEYS[2]` the hash of delayed entries, `KEYS[3]` the stream, `KEYS[4]` the queue's meta hash; `ARGV[1]` how
/// many at most. Returns the milliseconds until the next is due: 0 when more are due now, -1 when none waits.
/// An entry whose fields do not unpack is dropped; a queue deleted meanwhile takes nothing.
pub(super) fn promote() -> Script {
    Script::new(&format!(
        "{NOW}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local declared = redis.call('EXISTS', KEYS[4]) == 1
for _, member in ipairs(due) do
  local packed = redis.call('HGET', KEYS[2], member)
  if packed and declared then
    local ok, fields = pcall(cmsgpack.unpack, packed)
    if ok and type(fields) == 'table' and #fields >= 2 and #fields % 2 == 0 then
      redis.call('XADD', KEYS[3], '*', unpack(fields))
    end
  end
  redis.call('ZREM', KEYS[1], member)
  redis.call('HDEL', KEYS[2], member)
end
if #due == tonumber(ARGV[1]) then return 0 end
local next = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #next == 0 then return -1 end
return math.max(0, tonumber(next[2]) - now)"
    ))
}

/// Whether the MessagePack map `s` (an entry's whole envelope) has the key `c` with the 16 bytes `id` as its
/// value (bin 16): walks the map's top level, skipping values without decoding them.
const CORRELATED: &str = r"
local function be(s, p, n)
  local v = 0
  for i = 0, n - 1 do v = v * 256 + (string.byte(s, p + i) or 0) end
  return v
end
local skip
skip = function(s, p, depth)
  local b = string.byte(s, p)
  if b == nil or depth > 64 then return nil end
  if b <= 0x7f or b >= 0xe0 or b == 0xc0 or b == 0xc2 or b == 0xc3 then return p + 1 end
  if b >= 0xa0 and b <= 0xbf then return p + 1 + (b - 0xa0) end
  local items = nil
  if b >= 0x80 and b <= 0x8f then items, p = (b - 0x80) * 2, p + 1
  elseif b >= 0x90 and b <= 0x9f then items, p = b - 0x90, p + 1
  elseif b == 0xdc then items, p = be(s, p + 1, 2), p + 3
  elseif b == 0xdd then items, p = be(s, p + 1, 4), p + 5
  elseif b == 0xde then items, p = be(s, p + 1, 2) * 2, p + 3
  elseif b == 0xdf then items, p = be(s, p + 1, 4) * 2, p + 5
  end
  if items then
    for _ = 1, items do
      p = skip(s, p, depth + 1)
      if p == nil then return nil end
    end
    return p
  end
  if b == 0xc4 or b == 0xd9 then return p + 2 + be(s, p + 1, 1) end
  if b == 0xc5 or b == 0xda then return p + 3 + be(s, p + 1, 2) end
  if b == 0xc6 or b == 0xdb then return p + 5 + be(s, p + 1, 4) end
  if b == 0xcc or b == 0xd0 then return p + 2 end
  if b == 0xcd or b == 0xd1 then return p + 3 end
  if b == 0xce or b == 0xd2 or b == 0xca then return p + 5 end
  if b == 0xcf or b == 0xd3 or b == 0xcb then return p + 9 end
  if b >= 0xd4 and b <= 0xd8 then return p + 2 + 2 ^ (b - 0xd4) end
  if b == 0xc7 then return p + 3 + be(s, p + 1, 1) end
  if b == 0xc8 then return p + 4 + be(s, p + 1, 2) end
  if b == 0xc9 then return p + 6 + be(s, p + 1, 4) end
  return nil
end
local function correlated(s, id)
  local b = string.byte(s, 1)
  if b == nil then return false end
  local count, p = nil, 1
  if b >= 0x80 and b <= 0x8f then count, p = b - 0x80, 2
  elseif b == 0xde then count, p = be(s, 2, 2), 4
  elseif b == 0xdf then count, p = be(s, 2, 4), 6
  else return false end
  for _ = 1, count do
    if string.sub(s, p, p + 1) == '\161c' then
      return string.sub(s, p + 2, p + 19) == '\196\016' .. id
    end
    p = skip(s, p, 0)
    if p == nil then return false end
    p = skip(s, p, 0)
    if p == nil then return false end
  end
  return false
end
";

/// Cancels a call: `KEYS[1]` the queue's stream, `KEYS[2]` its meta hash, `KEYS[3]` its delayed set, `KEYS[4]`
/// the hash of delayed entries, `KEYS[5]` the stream of its cancels; `ARGV[1]` the correlation id as 32 hex
/// digits, `ARGV[2]` as its 16 bytes, `ARGV[3]` in its dashed form, `ARGV[4]` how many ready entries to look
/// through at most, `ARGV[5]` how many cancels the stream of cancels keeps (about), `ARGV[6]` how long it lives
/// (ms). Removes the call's delayed entries, else its first ready entry, counting them in the meta hash's
/// `cancelled`; if it removed none, a worker may hold it or be about to: the correlation id goes on the stream of
/// cancels, which the queue's consumers read. Returns how many it removed; -1 when the queue was never declared.
pub(super) fn cancel() -> Script {
    Script::new(&format!(
        "{CORRELATED}
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local removed = 0
local cursor = '0'
repeat
  local page = redis.call('ZSCAN', KEYS[3], cursor, 'MATCH', ARGV[1] .. ':*', 'COUNT', 1000)
  cursor = page[1]
  for i = 1, #page[2], 2 do
    local member = page[2][i]
    removed = removed + redis.call('ZREM', KEYS[3], member)
    redis.call('HDEL', KEYS[4], member)
  end
until cursor == '0'
if removed == 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  local start = '-'
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local fields = {{}}
    for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
    if fields['name'] == 'mqrpc' then start = '(' .. fields['last-delivered-id'] end
  end
  local looked, limit, found = 0, tonumber(ARGV[4]), nil
  while looked < limit and not found do
    local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 256)
    if #entries == 0 then break end
    for _, entry in ipairs(entries) do
      looked = looked + 1
      local fields = entry[2]
      for i = 1, #fields, 2 do
        local name, value = fields[i], fields[i + 1]
        if (name == 'mqrpc-envelope' and correlated(value, ARGV[2]))
          or (name == 'mqrpc-correlation-id' and (value == ARGV[3] or value == ARGV[1])) then
          found = entry[1]
          break
        end
      end
      if found then break end
    end
    start = '(' .. entries[#entries][1]
  end
  if found then
    redis.call('XDEL', KEYS[1], found)
    removed = 1
  end
end
if removed > 0 then
  redis.call('HINCRBY', KEYS[2], 'cancelled', removed)
else
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', tonumber(ARGV[5]), '*', 'c', ARGV[1])
  redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[6]))
end
return removed"
    ))
}

/// Checks that `ARGV[3]` holds entry `ARGV[2]` of group `ARGV[1]` on stream `KEYS[1]`.
const OWNED: &str = r"
local function owned()
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
  return #pending == 1 and pending[1][2] == ARGV[3]
end
local function settle()
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  if ARGV[4] == '1' then redis.call('XDEL', KEYS[1], ARGV[2]) end
end
";

/// Answers a batch of deliveries of one consumer: `KEYS[1]` the stream, `KEYS[1 + n]` where answer n goes;
/// `ARGV[1]` group, `ARGV[2]` consumer, `ARGV[3]` '1' to delete entries once acked (a queue's); then per answer
/// the entry id, '1' when the answer goes to an inbox (sent only if it exists), '1' to ack the entry, the number
/// of the answer's field names and values, and those. Per answer, in order: 1 sent, 0 the inbox is gone, -1 the
/// delivery is not this consumer's (nothing done).
pub(super) const ANSWERS: &str = r"
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local results = {}
local at = 4
for n = 2, #KEYS do
  local id, inbox, ack, count = ARGV[at], ARGV[at + 1], ARGV[at + 2], tonumber(ARGV[at + 3])
  local first = at + 4
  at = first + count
  local pending = redis.call('XPENDING', stream, group, id, id, 1)
  if #pending == 1 and pending[1][2] == consumer then
    local sent = 1
    if inbox == '1' and redis.call('EXISTS', KEYS[n]) == 0 then
      sent = 0
    else
      redis.call('XADD', KEYS[n], '*', unpack(ARGV, first, at - 1))
    end
    if ack == '1' then
      redis.call('XACK', stream, group, id)
      if ARGV[3] == '1' then redis.call('XDEL', stream, id) end
    end
    results[#results + 1] = sent
  else
    results[#results + 1] = -1
  end
end
return results
";

/// `KEYS[1]` the stream, `KEYS[2]` where a copy goes (the stream itself to requeue, its dead-letter queue's);
/// `ARGV[1]` group, `ARGV[2]` entry id, `ARGV[3]` consumer, `ARGV[4]` '1' to delete the entry once acked,
/// `ARGV[5]` the operation: `ack`; `copy` (a requeue, release or dead-letter: a copy of the entry, its field
/// `mqrpc-delivery-count` set to `ARGV[6]`, the count of the copy's first delivery, then the ack); `idle` (a
/// topic group's requeue: the entry stays pending and is made idle, for the next claim). 1 done, -1 the delivery
/// is not this consumer's.
pub(super) fn settle() -> Script {
    Script::new(&format!(
        "{OWNED}
if not owned() then return -1 end
if ARGV[5] == 'idle' then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', ARGV[6], 'JUSTID')
  return 1
end
if ARGV[5] == 'copy' then
  local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
  if #entry == 1 then
    local fields = {{}}
    local found = false
    local given = entry[1][2]
    for i = 1, #given, 2 do
      if given[i] == 'mqrpc-delivery-count' then
        fields[#fields + 1] = given[i]
        fields[#fields + 1] = ARGV[6]
        found = true
      else
        fields[#fields + 1] = given[i]
        fields[#fields + 1] = given[i + 1]
      end
    end
    if not found then
      fields[#fields + 1] = 'mqrpc-delivery-count'
      fields[#fields + 1] = ARGV[6]
    end
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  end
end
settle()
return 1"
    ))
}

/// A worker's retry held for its backoff, in place of its delivery: `KEYS[1]` the delayed set, `KEYS[2]` the
/// hash of delayed entries (of the queue the copy goes to), `KEYS[3]` the delivery's stream; `ARGV[1]` group,
/// `ARGV[2]` entry id, `ARGV[3]` consumer, `ARGV[4]` '1' to delete the entry once acked, `ARGV[5]` the delay in
/// milliseconds, `ARGV[6]` the member, then the copy's fields. 1 done, -1 the delivery is not this consumer's.
pub(super) fn hold_fenced() -> Script {
    Script::new(&format!(
        "{NOW}{HOLD}
local pending = redis.call('XPENDING', KEYS[3], ARGV[1], ARGV[2], ARGV[2], 1)
if not (#pending == 1 and pending[1][2] == ARGV[3]) then return -1 end
hold(5)
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
if ARGV[4] == '1' then redis.call('XDEL', KEYS[3], ARGV[2]) end
return 1"
    ))
}

/// `KEYS[1]` the stream; `ARGV[1]` group, `ARGV[2]` consumer, then entry ids: resets the idle time of each
/// entry the consumer still holds (its lease), and returns the ids it no longer holds.
pub(super) const RENEW: &str = r"
local lost = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #pending == 1 and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
";

/// `KEYS[1]` the stream; `ARGV[1]` group, `ARGV[2]` milliseconds: deletes the group's consumers that hold
/// nothing and have been given nothing for that long: their process went away, or they are idle (Redis before
/// 7.2 counts a read that returns nothing as no interaction), and Redis makes an idle one again with the next
/// entry it reads. Returns how many it deleted.
pub(super) const SWEEP: &str = r"
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local fields = {}
  for i = 1, #consumer, 2 do fields[consumer[i]] = consumer[i + 1] end
  if fields['pending'] == 0 and fields['idle'] >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], fields['name'])
    removed = removed + 1
  end
end
return removed
";
