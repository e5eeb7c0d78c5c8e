"""Make SPP a first-class PEFT method: a real ``PeftType.SPP`` member plus ``register_peft_method``.

PEFT refuses method names that are not members of its ``PeftType`` enum, and transformers' adapter
integration calls ``peft_type.value``, so SPP must be a genuine enum member, not a string. Python enums
cannot be extended through their public API; :func:`_add_enum_member` adds the member the way ``enum``
itself stores members (member maps + class attribute). Everything here is idempotent: importing
``spp_peft`` twice, or reloading it, registers SPP once.
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "spp"
PREFIX = "spp_"


def _add_enum_member(enum_cls, name: str, value: str):
    """Add ``name = value`` to a ``str``-valued enum, or return the existing member."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    # type.__setattr__ skips EnumType.__setattr__, which forbids assigning to member names.
    type.__setattr__(enum_cls, name, member)
    return member


def spp_peft_type():
    """``PeftType.SPP``, created on first use."""
    return _add_enum_member(PeftType, NAME.upper(), NAME.upper())


def register() -> None:
    """Register SPP with PEFT (config, tuner and prefix mappings); safe to call any number of times."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import SPPConfig
    from .model import SPPModel

    peft_type = spp_peft_type()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is SPPConfig and PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is SPPModel:
        return
    # A reload of spp_peft creates new classes: drop the stale ones so the fresh classes are registered.
    for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
        mapping.pop(peft_type, None)
    register_peft_method(name=NAME, config_cls=SPPConfig, model_cls=SPPModel, prefix=PREFIX)
