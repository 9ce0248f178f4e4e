-- POST one agent_output event to a session's history (POST .../events/batch), the
-- service choosing its id. Argument: API key.
dofile(debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "common.lua")

function init(args)
   wrk.method = "POST"
   wrk.headers["x-api-key"] = args[1]
   wrk.headers["Content-Type"] = "application/json"
   wrk.body = '{"events": [{"type": "agent_output", '
      .. '"content": "The order shipped on Monday and should arrive by Thursday."}]}'
end
