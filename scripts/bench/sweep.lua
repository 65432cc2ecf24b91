-- wrk script: every request asks for a new id, 1, 2, 3, ... across all threads and connections,
-- so a run of N requests touches N distinct keys (memory-bound check: RSS after 1,000,000 ids).
local counter = 0
local threads = 0
thread_index = 0 -- global: setup() overwrites it in each thread's own Lua state

function setup(thread)
  thread:set("thread_index", threads)
  threads = threads + 1
end

function init(args)
  step = tonumber(args[1] or "2")
end

function request()
  counter = counter + 1
  local id = (counter - 1) * step + thread_index + 1
  return wrk.format("GET", "/template-details?id=" .. id)
end
