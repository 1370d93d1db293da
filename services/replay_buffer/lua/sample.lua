-- ARGV: prefix, step, policy_version, max_staleness, expected_groups, the spec the request
-- asks for ('' = any). Returns the step's members (prompt_id, digest), not the payloads:
-- copying megabytes through Lua is slow, and the payloads may be in this process's cache.
-- A refused call ('spec', 'toofew', ...) changes nothing.
local prefix = ARGV[1]
local run = prefix .. 'run'
local step, expected = tonumber(ARGV[2]), tonumber(ARGV[5])
local spec = redis.call('HGET', run, 'spec')
if not spec then
  if expected > 0 then
    return {'toofew', 0}
  end
  return {'norun'}
end
if ARGV[6] ~= '' and ARGV[6] ~= spec then
  return {'spec', spec}
end
local sk = prefix .. 'step:' .. ARGV[2] .. ':'
local accepted = redis.call('HLEN', sk .. 'digest')
if accepted == 0 then
  local evicted_below = tonumber(redis.call('HGET', run, 'evicted_below') or '0')
  if step < evicted_below then
    return {'evicted', evicted_below}
  end
  if expected == 0 then
    return {'nostep'}
  end
end
if accepted < expected then
  return {'toofew', accepted}
end
local policy = tonumber(ARGV[3])
if policy > tonumber(redis.call('HGET', run, 'policy_version') or '-1') then
  redis.call('HSET', run, 'policy_version', ARGV[3])
end
local threshold = policy - tonumber(ARGV[4])
local versions = redis.call('HGETALL', sk .. 'wv')
local dropped, dropped_rollouts = 0, 0
for i = 1, #versions, 2 do
  if tonumber(versions[i + 1]) < threshold then
    local kept = redis.call('HGET', sk .. 'kept', versions[i]) or '0'
    dropped_rollouts = dropped_rollouts + tonumber(kept)
    redis.call('HDEL', sk .. 'groups', versions[i])
    redis.call('HDEL', sk .. 'summary', versions[i])
    redis.call('HDEL', sk .. 'wv', versions[i])
    redis.call('HDEL', sk .. 'kept', versions[i])
    dropped = dropped + 1
  end
end
redis.call('HINCRBY', run, 'stale_at_sample', dropped)
local held = redis.call('HINCRBY', run, 'held_groups', 0 - dropped)
local held_rollouts = redis.call('HINCRBY', run, 'held_rollouts', 0 - dropped_rollouts)
redis.call('HSET', prefix .. 'cursor', 'last_sampled_step', ARGV[2])
redis.call('HINCRBY', prefix .. 'cursor', 'samples_served', 1)
local ids = redis.call('HKEYS', sk .. 'wv')
local digests = {}
for i, id in ipairs(ids) do
  digests[i] = redis.call('HGET', sk .. 'digest', id)
end
return {'ok', spec, dropped, ids, digests, held, held_rollouts}
