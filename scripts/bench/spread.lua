-- wrk script: every request asks for an id drawn uniformly from 1..=N (default 1000), so a run
-- spreads over N cached keys: `wrk -s scripts/bench/spread.lua URL -- 1000`.
function init(args)
  ids = tonumber(args[1] or "1000")
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
end

function request()
  return wrk.format("GET", "/template-details?id=" .. math.random(1, ids))
end
