-- ARGV: prefix, spec, count, then per group: step, prompt_id, digest. Read-only. Returns
-- {'spec', stored spec} if the run holds another spec, {'conflict', i} for the first group
-- whose key holds another digest, else {'ok'}.
local prefix = ARGV[1]
local stored_spec = redis.call('HGET', prefix .. 'run', 'spec')
if stored_spec and stored_spec ~= ARGV[2] then
  return {'spec', stored_spec}
end
for i = 0, tonumber(ARGV[3]) - 1 do
  local b = 4 + i * 3
  local d = redis.call('HGET', prefix .. 'step:' .. ARGV[b] .. ':digest', ARGV[b + 1])
  if d and d ~= ARGV[b + 2] then
    return {'conflict', i}
  end
end
return {'ok'}
