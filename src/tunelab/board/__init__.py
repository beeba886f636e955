"""`tunelab board`: a local web app over a directory of runs (layer 8, beside the CLI). docs/board.md.

app.py (the HTTP API, the safety rules), runs.py (reading run and sweep directories, paths kept inside the root),
jobs.py (the launch queue: runs as processes of their own), forms.py (the launch form from the recipe schema and
the registries' Configs; validation), events.py (server-sent events), static/ (the page: HTML, CSS, plain JS).
"""
