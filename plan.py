"""Plan a DeViT decomposition for a fleet of unlike devices: how many classes each device learns, and its student.

    python plan.py --devices d0.json d1.json d2.json d3.json --dataset cifar100 --data_path ./data \\
        --family dedeits --output plan.json [--classes 100] [--backend torch]

The planner, its capacity rule and the plan schema: collab/host/plan.py; how to use a plan: docs/fleets.md.
"""
import cli
from collab.host.plan import main

if __name__ == '__main__':
    cli.run_main(main)
