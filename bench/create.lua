-- POST a new session with a unique key per request.
-- Arguments: API key, run tag (keeps keys unique across runs on one store).
dofile(debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "common.lua")

local prefix
local counter = 0

function init(args)
   wrk.method = "POST"
   wrk.headers["x-api-key"] = args[1]
   wrk.headers["Content-Type"] = "application/json"
   prefix = args[2] .. "-" .. id .. "-"
end

function request()
   counter = counter + 1
   local body = string.format(
      '{"key": "%s%d", "name": "Benchmark session %d", '
         .. '"metadata": {"customer": "c-17", "channel": "web"}, "tti_minutes": 0}',
      prefix, counter, counter)
   return wrk.format(nil, nil, nil, body)
end
