"""`retinafm serve`: the local web app and HTTP API over the same library the CLI uses.

`config` (what the server was started with), `security` (token, path confinement, headers, same-origin),
`app` (the FastAPI application: middleware and routers), `server` (uvicorn on loopback by default).
Routers, one per page and its API: `models_api` (checkpoints found under --runs, the model cache),
`predict_api` (uploads → predictions and heatmap overlays), `runs_api` (run folders, reports, compare),
`jobs_api` (finetune / evaluate / predict / embed + probe in a queue of subprocesses), `pages`
(server-rendered HTML, one plain script in static/, no build step, nothing fetched from the network).
"""
