"""Helpers for CLI tests: the result of one `cvfm` call and assertions on its streams.

The in-process `cli` fixture that produces these lives in conftest.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.out.splitlines() if line.strip()]


def assert_usage_error(r: Result, *needles: str) -> None:
    assert r.code == 2, (r.out, r.err)
    assert r.out == ""
    err_lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(err_lines) == 1, r.err
    assert err_lines[0].startswith("cvfm: error: ")
    assert "Traceback" not in r.err
    for needle in needles:
        assert needle in err_lines[0]


def one_json_line(r: Result) -> dict:
    assert r.code == 0, r.err
    assert len(r.lines) == 1, r.out
    assert r.out.endswith("\n") and r.out.count("\n") == 1
    return json.loads(r.lines[0])
