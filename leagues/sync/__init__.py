"""Moving weights from the trainer to the engines.

sender = DistributedWeightSender(["http://engine-0:30000"], "10.0.0.1", 29600, backend="nccl")
sender.init()
sender.send(trainer.state_dict_for_sync(), weight_version=step)
sender.close()
"""

from leagues.sync.distributed import DistributedWeightSender

__all__ = ["DistributedWeightSender"]
