"""Config loading and `--config.a.b=value` overrides: types checked, unknown keys rejected."""
import pytest

from jkd.config import apply_override, load_config
from jkd.errors import UserError

from conftest import SUPERVISED


def test_loads_with_arg_and_overrides():
  c = load_config(SUPERVISED + ':tiny', ['optim.lr=0.5', 'data.flip=true', 'batch_size=64',
                                         'model.name=resnet20_s', "mesh.data=1"])
  assert c.optim.lr == 0.5 and c.data.flip is True and c.batch_size == 64
  assert c.model.name == 'resnet20_s' and c.total_steps == 12 and c.mesh.data == 1


def test_tuple_and_none_fields_parse():
  c = load_config(SUPERVISED, ['init_prefix=("encoder",)', 'data.data_dir=/tmp/x'])
  assert c.init_prefix == ('encoder',)
  assert c.data.data_dir == '/tmp/x'


def test_any_field_of_the_named_model_can_be_overridden():
  # Fields the config file does not list, typed by the model's own default.
  c = load_config(SUPERVISED, ['model.name=vit_nano_p4', 'model.distill_token=true',
                               'model.drop_path=0.1'])
  assert c.model.distill_token is True and c.model.drop_path == 0.1
  with pytest.raises(UserError, match='integer|number'):
    load_config(SUPERVISED, ['model.name=vit_nano_p4', 'model.depth=deep'])
  with pytest.raises(UserError, match='distill_token'):  # resnet8_s has no such field
    load_config(SUPERVISED, ['model.distill_token=true'])


def test_dict_fields_take_dict_call_or_literal():
  c = load_config(SUPERVISED, ['mesh=dict(data=2, fsdp=4)'])
  assert c.mesh.to_dict() == {'data': 2, 'fsdp': 4}
  c = load_config(SUPERVISED, ["mesh={'data': -1, 'tensor': 2}",
                               "sharding_rules=(('mlp', ('fsdp', 'tensor')),)"])
  assert c.mesh.tensor == 2 and c.sharding_rules == (('mlp', ('fsdp', 'tensor')),)
  with pytest.raises(UserError, match='dict'):
    load_config(SUPERVISED, ['mesh=dict(data=int(2))'])


@pytest.mark.parametrize('override, words', [
    ('optim.lrr=1', ['optim.lrr', 'Did you mean lr']),
    ('batch_size=abc', ['batch_size', 'integer']),
    ('data.flip=maybe', ['bool']),
    ('optim.lr', ['no "="']),
    ('batch_size.x=1', ['value, not a group']),
])
def test_bad_overrides_are_user_errors(override, words):
  with pytest.raises(UserError) as e:
    load_config(SUPERVISED, [override])
  for w in words:
    assert w in str(e.value)


def test_missing_file_and_bad_arg():
  with pytest.raises(UserError, match='does not exist'):
    load_config('configs/nope.py')
  with pytest.raises(UserError, match='failed to load'):
    load_config(SUPERVISED + ':nonsense')


def test_int_field_rejects_float_text():
  c = load_config(SUPERVISED)
  with pytest.raises(UserError):
    apply_override(c, 'batch_size=1.5')
