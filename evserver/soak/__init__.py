"""``evserver soak``: one repeatable run that mixes load and faults, then prints what held.

It starts ``evserver serve --workers N`` on its own app (``evserver.soak.app``), drives a
mixed load at it (``load``), injects faults on a seeded schedule (``chaos``), watches the
processes (``watch``) and, at the end, compares what the clients were told with what the
workers recorded (``report``). ``run.main`` is the command; docs/reliability.md has figures.
"""
