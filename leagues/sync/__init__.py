"""Moving weights from the trainer to the engines.

WEIGHT_SYNCS[name].from_run(run).push(trainer, version)            # an RL run's transport, chosen once

push_in_place(trainer.state_dict_for_sync(), engine, version)      # colocated
BroadcastSync(group, src).send(buckets, version) / .receive(engine)  # disaggregated, inside one job
update_from_disk(engine_urls, checkpoint_dir, version, api_key=k)    # external engines, shared disk
load_on(fleet_targets, checkpoint_dir, version)                      # the ones the RL loop's fleet chose

sender = DistributedWeightSender(["http://engine-0:30000"], "10.0.0.1", 29600, backend="nccl", api_key=k)
sender.init()
sender.send(trainer.state_dict_for_sync(), weight_version=step)
sender.close()
"""

from leagues.sync.disk import load_from_disk, load_on, update_from_disk
from leagues.sync.distributed import DistributedWeightSender
from leagues.sync.engine_http import EngineRefused, EngineUnreachable
from leagues.sync.local import BroadcastSync, push_in_place
from leagues.sync.transports import WEIGHT_SYNCS, WeightSync

__all__ = [
    "WEIGHT_SYNCS",
    "BroadcastSync",
    "DistributedWeightSender",
    "EngineRefused",
    "EngineUnreachable",
    "WeightSync",
    "load_from_disk",
    "load_on",
    "push_in_place",
    "update_from_disk",
]
