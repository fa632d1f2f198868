"""The challenge's day as one command: `make plan-N` budgets every stage against 24 hours on a 4090,
`make day-N` runs them in order (resumable), and writes build/day/NAME/report.html and report.md.

    plan.py     every declared stage projected onto one RTX 4090 (stage plans, measured figures), levers
    stages.py   the stages as subprocess commands, in order, with their folders (layout.py)
    runner.py   runs one stage: its output through to the terminal and a log, Ctrl-C to the child, state.json
    report.py   plan vs actual, data, quantization, loss curve, Humpback, validation, HELM, spec: HTML + Markdown
"""
