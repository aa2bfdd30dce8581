"""Run by test_placement.py in its own process: a three-node Ray cluster on this machine (a head with
no CPUs, a `teacher` node and a `student` node, told apart by custom resources), a short distill
run with placement=labelled, then where every teacher replica and training worker ran, as JSON."""

import json
import sys

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from conftest import free_port  # this script's folder is tests/, first on sys.path
from distillation.config import load_config
from distillation.run import run

overrides, out = sys.argv[2:], sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,  # state API
                                                        "dashboard_port": free_port()})
nodes = {"teacher": cluster.add_node(num_cpus=1, resources={"teacher": 4}),
         "student": cluster.add_node(num_cpus=1, resources={"student": 4})}
cluster.wait_for_nodes()
ray.init(address=cluster.address)
summary = run(load_config(overrides + ["placement=labelled"]))
actors = list_actors(limit=10_000)
placed = {"replicas": sorted({a.node_id for a in actors if a.class_name.startswith("ServeReplica")}),
          "train_workers": sorted({a.node_id for a in actors if a.class_name == "RayTrainWorker"}),
          "nodes": {name: node.node_id for name, node in nodes.items()}, "steps": summary["steps"]}
with open(out, "w") as handle:
    json.dump(placed, handle)
ray.shutdown()
cluster.shutdown()
