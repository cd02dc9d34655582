"""lightning_seqpar: sequence parallelism (Ring Self-Attention, ring attention) for PyTorch Lightning.

Importing the package registers the strategy names "seqpar", "seqpar_spawn", "seqpar_fork" and
"seqpar_notebook" with Lightning, so `Trainer(strategy="seqpar")` works after `import lightning_seqpar`.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_seqpar.data_utils import DataParallelShard
from lightning_seqpar.loss import cross_entropy, token_mean
from lightning_seqpar.ops import ring_attention, ring_self_attention
from lightning_seqpar.strategy import SeqParStrategy
from lightning_seqpar.swap import RingContext, register_attention, unregister_attention

__version__ = "0.1.0"

SeqParStrategy.register_strategies(StrategyRegistry)

try:  # hydra-core is a dependency, but the package must import where only torch and Lightning are
    from lightning_seqpar import hydra_resolvers
except ImportError:
    pass
else:
    hydra_resolvers.register()

__all__ = [
    "DataParallelShard",
    "RingContext",
    "SeqParStrategy",
    "cross_entropy",
    "register_attention",
    "ring_attention",
    "ring_self_attention",
    "token_mean",
    "unregister_attention",
]
