-- POST one agent_output event to a session's history (POST .../events/batch), the
-- service choosing its id. Arguments: API key, then optionally a key prefix and a
-- count: with them, each request goes to a random one of <prefix>0 .. <prefix><count - 1>
-- (the URL then ends with "/sessions/"); without, to the session in the URL.
dofile(debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "common.lua")

local key_prefix, key_count

function init(args)
   wrk.method = "POST"
   wrk.headers["x-api-key"] = args[1]
   wrk.headers["Content-Type"] = "application/json"
   wrk.body = '{"events": [{"type": "agent_output", '
      .. '"content": "The order shipped on Monday and should arrive by Thursday."}]}'
   key_prefix, key_count = args[2], tonumber(args[3])
   math.randomseed(os.time() + id)
end

function request()
   if key_count == nil then
      return wrk.format()
   end
   local key = key_prefix .. math.random(0, key_count - 1)
   return wrk.format(nil, wrk.path .. key .. "/events/batch")
end
