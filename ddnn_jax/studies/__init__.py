"""Studies: which runs a study trains (``plans``), running them (``runner``), their records
(``records``), comparing finished runs with paired differences and intervals
(``comparison``, ``stats``), the paper's numbers (``paper``) and a preset's report
(``report``). The top layer of the library: it may import every other subpackage.
"""
