"""The benchmarks read the demo's models, epochs and batch from demo.sh; they must keep parsing it."""
from pathlib import Path

from bench import profile_bench as profile_demo

ROOT = Path(__file__).resolve().parent.parent


def test_profile_reads_the_full_demo_from_demo_sh():
    cfg = profile_demo.demo_config()
    text = (ROOT / 'demo.sh').read_text()
    # Cross-check against the lines a reader would look at, not against the parser's own patterns.
    assert cfg['teacher'] in text and cfg['student'] in text
    assert f"embed_dim={cfg['student_kw']['embed_dim']}" in text
    assert cfg['epochs'] == {'E0': 8, 'E1': 1, 'E2': 4, 'E3': 4}
    assert cfg['batch'] == 256 and cfg['eval_batch'] == 1000 and cfg['divisions'] == 4
    steps = profile_demo.stage_workload(cfg)
    assert steps['teacher from scratch'][1] == 8 * (60000 // 256)
