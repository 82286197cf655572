"""Shrinking (after stage 2): prune each student's least important attention heads and MLP neurons, then distil again.

For each division: load the stage-2 student, score every head and MLP neuron by E|∂CE/∂gate| on K batches of the
division's training images (training transform, no mixup), keep the top fraction `--head-ratio` of heads and
`--neuron-ratio` of neurons in every layer (fractions KEPT; at least one head and one neuron per layer), physically
remove the rest (models/pruning.py) and evaluate before and after. With `--redistill-epochs E` the pruned student is
then distilled again from its sub-teacher by distill_sub.distill (as `distill_sub.py --load-shrink`), with this
command's other flags.

    python shrink.py --model-path ./output/stage2 --data-path ./sub_datasets --dataset cifar100 --num_division 4 \\
        --all-divisions --head-ratio 0.67 --neuron-ratio 0.5 --importance-batches 20 --output_dir ./output/shrunk
    # re-distil in the same call (teacher flags as for distill_sub.py):
    python shrink.py ... --redistill-epochs 10 --teacher-model deit_base_distilled_patch16_224 \\
        --teacher-path ./output/stage1 --distillation-type hard --gama 0.2 0.1 0.3 --lr 8e-5 --model-ema
    # or afterwards:  distill_sub.py ... --load-shrink ./output/shrunk --output_dir ./output/redistilled

`--model-path` is stage 2's output folder (division i uses `sub-dataset{i}/checkpoint.pth`) or one checkpoint.
Writes OUTPUT/sub-dataset{i}/ with `pruned.pth` (a stage-2 checkpoint of the pruned student, `shrink_policy`
inside), `shrink.json` (the policy: kept heads/neurons per layer, importances, the rebuild shape; and
`steps`/`acc1`/`acc5` arrays: before, pruned, redistilled) and `checkpoint.pth` (the pruned student, or the
re-distilled one with `--redistill-epochs`), so OUTPUT is a valid `--model-path` of ensemble.py.
"""
import cli
from shrinking import main

if __name__ == '__main__':
    cli.run_main(main)
