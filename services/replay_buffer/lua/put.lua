-- ARGV: prefix, spec, keep_steps, max_staleness, count, newest weight version in the
-- request, then per group: step, prompt_id, digest, oldest weight version,
-- pairs kept, pairs dropped, StoredGroup bytes, GroupSummary bytes, rollouts kept.
-- Returns {'ok', statuses, groups evicted, steps evicted, groups held, rollouts held}.
local prefix = ARGV[1]
local run, steps = prefix .. 'run', prefix .. 'steps'
local spec = ARGV[2]
local stored_spec = redis.call('HGET', run, 'spec')
if stored_spec and stored_spec ~= spec then
  return {'spec', stored_spec}
end
local keep, max_stale, count = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local W, B = 9, 7
for i = 0, count - 1 do
  local b = B + i * W
  local d = redis.call('HGET', prefix .. 'step:' .. ARGV[b] .. ':digest', ARGV[b + 1])
  if d and d ~= ARGV[b + 2] then
    return {'conflict', i}
  end
end
if not stored_spec then
  redis.call('HSET', run, 'spec', spec)
end
local policy = tonumber(redis.call('HGET', run, 'policy_version') or '-1')
if tonumber(ARGV[6]) > policy then
  policy = tonumber(ARGV[6])
  redis.call('HSET', run, 'policy_version', ARGV[6])
end
local evicted_below = tonumber(redis.call('HGET', run, 'evicted_below') or '0')
local statuses, evicted_steps = {}, {}
local n = {stored = 0, dup = 0, stale = 0, evicted = 0, kept = 0, dropped = 0,
           esteps = 0, egroups = 0, rollouts = 0, erollouts = 0}
for i = 0, count - 1 do
  local b = B + i * W
  local step, pid = tonumber(ARGV[b]), ARGV[b + 1]
  local sk = prefix .. 'step:' .. ARGV[b] .. ':'
  local status
  if redis.call('HEXISTS', sk .. 'digest', pid) == 1 then
    status = 2
    n.dup = n.dup + 1
  elseif step < evicted_below then
    status = 4
  elseif tonumber(ARGV[b + 3]) < policy - max_stale then
    status = 3
    n.stale = n.stale + 1
  elseif not redis.call('ZSCORE', steps, ARGV[b]) and redis.call('ZCARD', steps) >= keep
      and step < tonumber(redis.call('ZRANGE', steps, 0, 0, 'WITHSCORES')[2]) then
    status = 4
  else
    status = 1
    redis.call('HSET', sk .. 'groups', pid, ARGV[b + 6])
    redis.call('HSET', sk .. 'summary', pid, ARGV[b + 7])
    redis.call('HSET', sk .. 'digest', pid, ARGV[b + 2])
    redis.call('HSET', sk .. 'wv', pid, ARGV[b + 3])
    redis.call('HSET', sk .. 'kept', pid, ARGV[b + 8])
    redis.call('ZADD', steps, step, ARGV[b])
    n.stored = n.stored + 1
    n.rollouts = n.rollouts + tonumber(ARGV[b + 8])
    n.kept = n.kept + tonumber(ARGV[b + 4])
    n.dropped = n.dropped + tonumber(ARGV[b + 5])
    while redis.call('ZCARD', steps) > keep do
      local oldest = redis.call('ZPOPMIN', steps)
      local ok = prefix .. 'step:' .. oldest[1] .. ':'
      evicted_steps[#evicted_steps + 1] = oldest[1]
      n.egroups = n.egroups + redis.call('HLEN', ok .. 'groups')
      for _, k in ipairs(redis.call('HVALS', ok .. 'kept')) do
        n.erollouts = n.erollouts + tonumber(k)
      end
      n.esteps = n.esteps + 1
      redis.call('UNLINK', ok .. 'groups', ok .. 'summary', ok .. 'digest', ok .. 'wv',
                 ok .. 'kept')
      if tonumber(oldest[2]) + 1 > evicted_below then
        evicted_below = tonumber(oldest[2]) + 1
      end
    end
  end
  if status == 4 then
    n.evicted = n.evicted + 1
  end
  statuses[#statuses + 1] = status
end
redis.call('HSET', run, 'evicted_below', evicted_below)
redis.call('HINCRBY', run, 'groups_stored', n.stored)
redis.call('HINCRBY', run, 'duplicates', n.dup)
redis.call('HINCRBY', run, 'stale_at_put', n.stale)
redis.call('HINCRBY', run, 'evicted_at_put', n.evicted)
redis.call('HINCRBY', run, 'pairs_kept', n.kept)
redis.call('HINCRBY', run, 'pairs_dropped', n.dropped)
redis.call('HINCRBY', run, 'evicted_steps', n.esteps)
redis.call('HINCRBY', run, 'evicted_groups', n.egroups)
local held = redis.call('HINCRBY', run, 'held_groups', n.stored - n.egroups)
local held_rollouts = redis.call('HINCRBY', run, 'held_rollouts', n.rollouts - n.erollouts)
return {'ok', statuses, n.egroups, evicted_steps, held, held_rollouts}
