"""Moving weights from the trainer to the engines.

WEIGHT_SYNCS[name].from_run(run).push(trainer, version)            # an RL run's transport, chosen once

push_in_place(trainer.state_dict_for_sync(), engine, version)      # colocated
BroadcastSync(group, src).send(buckets, version) / .receive(engine)  # disaggregated, inside one job
update_from_disk(engine_urls, checkpoint_dir, version)               # external engines, shared disk
load_from_disk(engine_url, checkpoint_dir, version)                  # one of them (the RL loop's fleet)

sender = DistributedWeightSender(["http://engine-0:30000"], "10.0.0.1", 29600, backend="nccl")
sender.init()
sender.send(trainer.state_dict_for_sync(), weight_version=step)
sender.close()
"""

from leagues.sync.disk import load_from_disk, update_from_disk
from leagues.sync.distributed import DistributedWeightSender
from leagues.sync.local import BroadcastSync, push_in_place
from leagues.sync.transports import WEIGHT_SYNCS, WeightSync

__all__ = [
    "WEIGHT_SYNCS",
    "BroadcastSync",
    "DistributedWeightSender",
    "WeightSync",
    "load_from_disk",
    "push_in_place",
    "update_from_disk",
]
