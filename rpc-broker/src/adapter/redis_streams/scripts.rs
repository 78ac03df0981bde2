//! The Lua scripts that make each step atomic on the server: a publish that checks the queue's length, a
//! settle or answer that only the delivery's owner can make, a requeue that never loses nor doubles a copy.
//!
//! Every script that settles a delivery first asks `XPENDING` who holds it: a worker whose delivery another
//! worker claimed (it was away past the visibility timeout) gets -1 and changes nothing.

use redis::Script;

/// The group of a service queue's stream.
pub(super) const QUEUE_GROUP: &str = "mqrpc";

/// `KEYS[1]` the stream, `KEYS[2]` the queue's meta hash; `ARGV` the entry's fields. 1 when added to a queue
/// with a maximum length, 2 when added to one without, 0 when the queue is full (ready entries, the stream's
/// length less those handed out, at `max_len`), -1 when the queue was never declared.
pub(super) const PUBLISH: &str = r"
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local max = redis.call('HGET', KEYS[2], 'max_len')
if max then
  local held = redis.call('XPENDING', KEYS[1], 'mqrpc')[1]
  if redis.call('XLEN', KEYS[1]) - held >= tonumber(max) then return 0 end
end
redis.call('XADD', KEYS[1], '*', unpack(ARGV))
if max then return 1 end
return 2
";

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
/// `mqrpc-delivery-count` set to `ARGV[6]`, the count of the copy's first delivery, then the ack); `idle` (a topic group's requeue: the entry stays
/// pending and is made idle, for the next claim). 1 done, -1 the delivery is not this consumer's.
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
