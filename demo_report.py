"""Collect the demo's results (accuracy, params, FLOPs of every model) into ``results.json``, a table
(``results.txt``) and a figure (``results.png``).

    python demo_report.py --out output/demo --seconds 812
    python demo_report.py --out output/demo --docs     # also the tables of README.md and docs/results.md

Accuracies are those of the checkpoints each stage hands to the next (``checkpoint.pth``), as fractions 0..1:
the teacher, the ensemble and the baseline on the 10,000 test images (all classes), each sub-teacher and student
on the test images of its own division's classes; and, when stage 3 ran with ``--eval-missing``, the ensemble
with each device missing in turn (``ensemble_missing_acc``). ``split`` records how the classes were grouped
(strategy, seed, the groups). After ``demo.sh --devices``, the planned decomposition in OUT/planned beside it
(``planned_*`` keys; ``planned_minus_uniform_points``: its top-1 minus the uniform one's, in points; the plan's
predicted latencies). The figure shows the top-1 of the teacher, the ensemble, the baseline and each student, and the
ensemble's top-1 with each device missing.
"""
import cli
from bench.demo_report import main

if __name__ == '__main__':
    cli.run_main(main)
