-- ARGV: prefix.
local prefix = ARGV[1]
local run = prefix .. 'run'
if redis.call('EXISTS', run) == 0 then
  return {0, 0}
end
local groups = 0
for _, s in ipairs(redis.call('ZRANGE', prefix .. 'steps', 0, -1)) do
  local sk = prefix .. 'step:' .. s .. ':'
  groups = groups + redis.call('HLEN', sk .. 'groups')
  redis.call('UNLINK', sk .. 'groups', sk .. 'summary', sk .. 'digest', sk .. 'wv', sk .. 'kept')
end
redis.call('UNLINK', run, prefix .. 'steps', prefix .. 'cursor')
return {1, groups}
