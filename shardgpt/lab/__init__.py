"""The lab: one experiment run (a RunSpec in, a results record out), the compile-only planner, the report
(tables, agreement, plots) and the generation benchmark a run reports. Uses every layer below.
"""
