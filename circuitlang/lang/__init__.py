"""The `.circ` language: `parse_spec(path) -> Plan`, checked, with one-line `SpecError`s."""

from circuitlang.lang.compiler import check_against_model, format_plan, parse_spec, parse_text
from circuitlang.lang.errors import SpecError
from circuitlang.lang.plan import Plan

__all__ = ["Plan", "SpecError", "check_against_model", "format_plan", "parse_spec", "parse_text"]
