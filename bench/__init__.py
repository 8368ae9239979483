"""Benchmarks and comparison reports: `python -m bench run SUITE ...` and `python -m bench report RESULT ...`.

`suite` runs a matrix suite through the trainer's entry point and writes one result JSON (`result`) with its
environment (`environment`) and device peak (`peak`); `compare` turns results into pandas tables and
`report` writes them out as markdown, HTML, PNG plots (`plots`) and CSV.
"""
