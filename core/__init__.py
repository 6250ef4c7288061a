"""The meta-learning engine on any Hugging Face causal LM.

    from mamlen.core import MetaConfig, MetaEngine, Task
    engine = MetaEngine(model, MetaConfig(hvp="exact", inner_lr=1e-4, outer_lr=1e-5))
    metrics = engine.step([Task(support=[batch], query=batch2), ...])
"""
from mamlen.core.arena import ParamArena
from mamlen.core.config import HVP_MODES, MetaConfig
from mamlen.core.engine import MetaEngine, Task
from mamlen.core.fsdp_engine import FSDPMetaEngine
from mamlen.core.loss import causal_lm_loss

try:  # the second-order attention registers itself with transformers as "mamlen"
    from mamlen.core import hf_attention as _hf_attention
    _hf_attention.register()
except ImportError:  # transformers without the attention registry
    pass

__all__ = ["MetaConfig", "MetaEngine", "FSDPMetaEngine", "Task", "ParamArena", "causal_lm_loss", "HVP_MODES"]
