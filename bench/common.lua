-- Shared by the bench scripts (loaded with dofile): thread ids, a count of every
-- response status, and one JSON line with the results for bench/run.py.

local threads = {}

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

statuses = {}

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local counts, parts, non2xx = {}, {}, 0
   for _, thread in ipairs(threads) do
      for status, n in pairs(thread:get("statuses")) do
         counts[status] = (counts[status] or 0) + n
      end
   end
   for status, n in pairs(counts) do
      table.insert(parts, string.format('"%d": %d', status, n))
      if status < 200 or status > 299 then
         non2xx = non2xx + n
      end
   end
   local errors = summary.errors
   io.write(string.format(
      'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
         .. '"mean_us": %.1f, "non2xx": %d, "socket_errors": %d, "statuses": {%s}}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      latency.mean, non2xx, errors.connect + errors.read + errors.write + errors.timeout,
      table.concat(parts, ", ")))
end
