"""Faithful fakes of the providers' HTTP APIs (../shared/reference/providers.md §8).

Each module holds an ASGI app factory and runs standalone: `python -m tests.fakes.bfl --port 9001`.
Behaviour is scripted by keywords in the prompt (see tests/contract.py: KEYWORDS) and
inspected through `GET /_control/stats`.
"""
