"""testing/spec.py: one description of each architecture's synthetic GGUF, read by the factory, the
real shapes and the simulator. Every description (each factory arch and variant, each real shape, at a
cut and at full depth) must pass our own validation of a file: its metadata parsed as a file's is and
its tensors' shapes checked against format/shape_rules.py. llama.cpp checks the same files separately
(tests/test_parity.py loads every factory model; tests/test_real_shapes.py dry-runs every shape)."""
import pytest

from promoe_gguf.bench import real_shapes as rs
from promoe_gguf.format.config import config_from_metadata
from promoe_gguf.format.validate import checked_config
from promoe_gguf.testing import factory
from promoe_gguf.testing.spec import metadata, model_tensors

FACTORY = [(a, v) for a in factory.ARCHS for v in factory.FLOAT_VARIANTS
           if not (v in ("kvb", "v3") and a != "deepseek2") and not (v == "qknorm" and a != "glm4moe")]
SPECS = [factory.spec(a, v) for a, v in FACTORY] + \
        [rs.cut(s, n) for s in rs.SHAPES.values() for n in {s.n_dense + 1, s.n_layer}]


@pytest.mark.parametrize("s", SPECS, ids=[f"{s.name}-{s.n_layer}" for s in SPECS])
def test_every_spec_passes_our_validation(s):
    meta = metadata(s)
    shapes = {t.name: tuple(reversed(t.ne)) for t in model_tensors(s)}
    c = checked_config(config_from_metadata(meta.get, s.name), shapes, meta.get, s.name)
    assert (c.arch, c.n_embd, c.n_head, c.n_head_kv, c.n_experts, c.n_experts_used, c.n_ff_exp) == \
        (s.arch, s.n_embd, s.n_head, s.n_head_kv, s.n_expert, s.n_used, s.n_ff_exp)
    assert (c.n_layers, c.n_nextn_layers, c.n_leading_dense) == (s.n_layer, s.n_nextn, s.n_dense)
    assert len(shapes) == len(list(model_tensors(s)))          # no name twice


def test_the_factory_and_the_real_shapes_describe_an_arch_alike():
    """The same arch at the same numbers gives the same tensor names from either writer's spec."""
    small = factory.spec("qwen3moe")
    big = rs.cut(rs.get_shape("qwen3-30b-a3b"), small.n_layer)
    assert [t.name for t in model_tensors(small)] == [t.name for t in model_tensors(big)]
