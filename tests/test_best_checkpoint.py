"""``checkpoint.pth`` (the best so far) exists after every finished epoch, even when test top-1 is 0 in every epoch
(a smoke run inside DeiT's warm-up scores 0 on classes the model does not predict yet), a resumed run keeps it
so, the next stage accepts the folder, and a run that ends at or below chance says so in one warning line."""
import json
import shutil

import timm
import torch
from faults import one_thread
from helpers import write_rgb_folder

import distill_sub
import splite_dataset
import train_subdata

TEACHER = 'deit_tiny_distilled_patch16_224'
KW = {'img_size': 32, 'patch_size': 8, 'embed_dim': 16, 'depth': 1, 'num_heads': 2}
RUN = ['--dataset', 'folder', '--tiny-transforms', '--mixup', '0', '--cutmix', '0', '--smoothing', '0',
       '--batch-size', '8', '--no-progress', '--warmup-epochs', '0', '--unscale-lr', '--lr', '1e-6',
       '--num_division', '1']


def test_zero_accuracy_stage_still_hands_its_best_checkpoint_on(tmp_path, capsys):
    data = write_rgb_folder(tmp_path / 'data', num_classes=2, n_train=16, n_val=4)
    shutil.rmtree(tmp_path / 'data' / 'val' / 'class0')  # the test images are all of class1
    split = tmp_path / 'split'
    assert splite_dataset.main(['--dataset', 'folder', '--data_path', data, '--num_division', '1',
                                '--output_path', str(split)]) == 0
    classes = json.loads((split / 'split.json').read_text())['divisions'][0]['class_names']
    # initial weights that predict class0 whatever the image, by far more than 1e-6 lr can change in a few steps
    torch.manual_seed(0)
    model = timm.create_model(TEACHER, num_classes=2, **KW)
    with torch.no_grad():
        for head in (model.head, model.head_dist):
            head.bias.copy_(torch.tensor([1e3, -1e3]) if classes[0] == 'class0' else torch.tensor([-1e3, 1e3]))
    torch.save({'model': model.state_dict()}, tmp_path / 'init.pth')

    out = tmp_path / 'stage1'
    model_args = ['--model', TEACHER, '--model-kwargs', *[f'{k}={v}' for k, v in KW.items()]]
    stage1 = [*RUN, *model_args, '--model-path', str(tmp_path / 'init.pth'), '--data-path', str(split),
              '--output_dir', str(out)]
    capsys.readouterr()
    with one_thread():
        train_subdata.main([*stage1, '--epochs', '2'])
    printed = capsys.readouterr().out
    folder = out / 'sub-dataset0'
    log = [json.loads(line) for line in (folder / 'log.txt').read_text().splitlines()]
    assert [r['test_acc1'] for r in log] == [0.0, 0.0]
    best = torch.load(folder / 'checkpoint.pth', weights_only=False)
    assert best['epoch'] == 1 and best['best_acc1'] == 0.0  # ties count: the later of two equal epochs
    assert (folder / 'checkpoint_last.pth').is_file()
    warnings = [line for line in printed.splitlines() if line.startswith('warning: best test top-1')]
    assert warnings == ['warning: best test top-1 0.00% is at or below chance (50.00% for 2 classes): fine for a '
                        'smoke run, not for a finished one (too few epochs or images, a warm-up longer than the run, '
                        'or a recipe for another data size)'], printed

    # resume keeps it true, even for a folder that lost its checkpoint.pth
    (folder / 'checkpoint.pth').unlink()
    with one_thread():
        train_subdata.main([*stage1, '--epochs', '3', '--auto-resume'])
    assert torch.load(folder / 'checkpoint.pth', weights_only=False)['epoch'] == 2

    # and stage 2 takes the folder as its --teacher-path
    student = ['--model', 'dedeit', '--model-kwargs', *[f'{k}={v}' for k, v in KW.items()]]
    with one_thread():
        distill_sub.main([*RUN, *student, '--teacher-model', TEACHER, '--teacher-kwargs',
                          *[f'{k}={v}' for k, v in KW.items()], '--teacher-path', str(out), '--distillation-type',
                          'hard', '--data-path', str(split), '--epochs', '1', '--output_dir', str(tmp_path / 'stage2')])
    assert (tmp_path / 'stage2' / 'sub-dataset0' / 'checkpoint.pth').is_file()
