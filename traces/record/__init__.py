"""The recorder: router traces from real transformers MoE runs (`mer record`).

torch and transformers are imported lazily (the `record` extra), so importing
this package costs nothing when they are absent.
"""

from mer.traces.record.families import Family, RouterSite, find_family, supported_families
from mer.traces.record.generate import GenerationSettings, PromptRouting, record_prompt
from mer.traces.record.prompts import Prompts, load_prompts
from mer.traces.record.recorder import RouterTap, StepRouting
from mer.traces.record.session import LOOKAHEAD_DEFINITION, RecordOptions, RecordResult, record_run

__all__ = [
    "LOOKAHEAD_DEFINITION",
    "Family",
    "GenerationSettings",
    "PromptRouting",
    "Prompts",
    "RecordOptions",
    "RecordResult",
    "RouterSite",
    "RouterTap",
    "StepRouting",
    "find_family",
    "load_prompts",
    "record_prompt",
    "record_run",
    "supported_families",
]
