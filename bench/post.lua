wrk.method = "POST"
wrk.body   = '{"model":"local-image","input":{"prompt":"bench","size":"256x256"}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("GENROUTE_API_KEY")
