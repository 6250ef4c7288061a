"""MetaICL's task registry: every task of the seven settings that has a converter, by name.

The converters are grouped by task type, each module exporting its specs; this is the one place that
assembles them:
- metaicl_class_tasks.CLASSIFICATION: classification tasks from hub datasets;
- metaicl_choice_tasks.MULTI_CHOICE: multi-choice tasks from hub datasets;
- metaicl_freeform_tasks.FREE_FORM: free-form (training-only) tasks from hub datasets and ProtoQA's file;
- metaicl_unifiedqa.UNIFIEDQA: the unifiedqa:* tasks, from UnifiedQA's TSV files.
What a converter is, the task lists and MetaICL's common preprocessing are in metaicl_spec.py.

Every task of the seven settings has one. `missing(setting)` lists a setting's tasks without a converter
(`train/build_metaicl_data.py --list` prints them per setting), for when the task lists change; adding one is
a spec in the module of its type plus a test row in tests/train/test_metaicl_data.py.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Iterable, Mapping, Union

from mamlen.train.metaicl_choice_tasks import MULTI_CHOICE
from mamlen.train.metaicl_class_tasks import CLASSIFICATION
from mamlen.train.metaicl_freeform_tasks import FREE_FORM
from mamlen.train.metaicl_spec import SETTINGS, TaskSpec
from mamlen.train.metaicl_unifiedqa import UNIFIEDQA, UnifiedQASpec

Spec = Union[TaskSpec, UnifiedQASpec]


def _assemble(*groups: Iterable[Spec]) -> Mapping[str, Spec]:
    registry: dict[str, Spec] = {}
    for group in groups:
        for spec in group:
            if spec.name in registry:
                raise KeyError(f"metaicl_tasks: {spec.name!r} has two converters")
            registry[spec.name] = spec
    return MappingProxyType(registry)


REGISTRY: Mapping[str, Spec] = _assemble(CLASSIFICATION, MULTI_CHOICE, FREE_FORM, UNIFIEDQA)


def setting_tasks(setting: str) -> set[str]:
    """Every task of a setting: its train, test and unseen-domain test tasks."""
    return {t for k in ("train", "test", "unseen_domain_test") for t in SETTINGS[setting][k]}


def missing(setting: str) -> list[str]:
    """The tasks of a setting that have no converter yet."""
    return sorted(setting_tasks(setting) - set(REGISTRY))
