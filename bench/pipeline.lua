-- wrk script: 16 requests per write (pipelining); wrk counts each response.
init = function(args)
   local r = {}
   for i = 1, 16 do
      r[i] = wrk.format("GET", "/")
   end
   req = table.concat(r)
end

request = function()
   return req
end
