"""Reports of a suite, rendered from its run records (runs/*.json) alone, so they can be
re-rendered anywhere without a GPU.

`load.load_runs` reads the records, `render.render_report` writes summary.csv, report.md,
report.html and the charts. Nothing is re-exported here: `gptbench.compare` needs only
`load`, and should not pay for importing matplotlib and Jinja2.
"""
