import math

import pytest
import torch

from nanoseek import ModelConfig
from nanoseek.config import yarn_example
from nanoseek.model.rope import apply_rope, rope_frequencies, rope_table, softmax_scale


def test_v3_yarn_frequency_correction():
    """V3: cd(32) = 10.47 -> low 10, cd(1) = 22.51 -> high 23; below low unchanged, above high divided by 40."""
    cfg = ModelConfig.preset("v3-671b")
    plain = rope_frequencies(cfg.replace(rope_scaling=None))
    yarn = rope_frequencies(cfg)
    assert torch.equal(yarn[:11], plain[:11])
    torch.testing.assert_close(yarn[23:], plain[23:] / 40)
    mid = yarn[11:23] / plain[11:23]
    assert ((mid < 1) & (mid > 1 / 40)).all() and (mid.diff() < 0).all()


def test_softmax_scale_with_mscale():
    assert softmax_scale(ModelConfig.preset("v3-671b").replace(rope_scaling=None)) == pytest.approx(192 ** -0.5)
    assert softmax_scale(ModelConfig.preset("v3-671b")) == pytest.approx(0.135234, abs=1e-6)
    assert softmax_scale(ModelConfig.preset("v2-lite")) == pytest.approx(0.114721, abs=1e-6)
    m = 0.1 * math.log(40) + 1
    assert softmax_scale(ModelConfig.preset("v3-671b")) == pytest.approx(192 ** -0.5 * m * m)


@pytest.mark.parametrize("interleave", [True, False])
def test_scores_depend_only_on_relative_position(interleave):
    cfg = ModelConfig.preset("tiny", rope_scaling=yarn_example(original=32))
    cos, sin = rope_table(cfg, 64)
    q, k = torch.randn(cfg.qk_rope_head_dim), torch.randn(cfg.qk_rope_head_dim)

    def score(i, j):
        qi = apply_rope(q[None, None], cos[i][None, None], sin[i][None, None], interleave)
        kj = apply_rope(k[None, None], cos[j][None, None], sin[j][None, None], interleave)
        return float((qi * kj).sum())

    assert score(10, 3) == pytest.approx(score(40, 33), abs=1e-5)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)


def test_interleaved_equals_rotate_half_after_permutation():
    """DeepSeek's pair layout (x0,x1),(x2,x3).. equals rotate-half on [x0,x2,..,x1,x3,..] (transformers' DeepseekV3 `rope_interleave=True` permutation)."""
    cfg = ModelConfig.preset("tiny")
    d = cfg.qk_rope_head_dim
    cos, sin = rope_table(cfg, 16)
    x = torch.randn(1, 16, d)
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    a = apply_rope(x, cos[None], sin[None], interleave=True)[..., perm]
    b = apply_rope(x[..., perm], cos[None], sin[None], interleave=False)
    torch.testing.assert_close(a, b)
