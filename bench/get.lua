-- GET one session. Arguments: API key, then optionally a key prefix and a count:
-- with them, each request reads a random one of <prefix>0000000 .. <prefix><count - 1>
-- (the URL then ends with "/sessions/"); without, the session in the URL.
dofile(debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "common.lua")

local fixed, key_prefix, key_count

function init(args)
   wrk.headers["x-api-key"] = args[1]
   key_prefix, key_count = args[2], tonumber(args[3])
   math.randomseed(os.time() + id)
   fixed = wrk.format()
end

function request()
   if key_count == nil then
      return fixed
   end
   local key = string.format("%s%07d", key_prefix, math.random(0, key_count - 1))
   return wrk.format(nil, wrk.path .. key)
end
