-- wrk script for bench case 8: every request is a POST of the same 4 KiB body on a kept-alive
-- connection (wrk adds Content-Length). The backends answer POST /upload with 200 "ok"
-- (conf/backend.nginx.conf), after reading the body.
wrk.method = "POST"
wrk.path = "/upload"
wrk.body = string.rep("0123456789abcdef", 256)
wrk.headers["Content-Type"] = "application/octet-stream"
