-- wrk script: requests walk through ids FIRST..FIRST+COUNT-1 in order, over every connection,
-- and start again at FIRST after the last: on the first walk every request asks for a key no
-- request asked before. `wrk -t1 -s scripts/bench/sequence.lua URL -- FIRST COUNT`.
function init(args)
  first = tonumber(args[1] or "1")
  count = tonumber(args[2] or "1000")
  next_id = 0
end

function request()
  local id = first + next_id
  next_id = (next_id + 1) % count
  return wrk.format("GET", "/template-details?id=" .. id)
end
