"""Orchestration above the engine and the report: plan execution, prompt chunks and the run cache."""
