-- GET a page of sessions: the URL carries the query (limit, page_key).
-- Argument: API key.
dofile(debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "common.lua")

function init(args)
   wrk.headers["x-api-key"] = args[1]
end
