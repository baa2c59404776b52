"""The Kubernetes operator for SplitserveCluster (splitserve.io/v1alpha1) resources.

spec.py (with fields.py) parses and checks a cluster's spec; render.py (with pods.py and labels.py) turns it into
Kubernetes objects without touching the API; crd.py is the CustomResourceDefinition; status.py derives the status
from the Deployments. handlers.py (kopf) and apply.py (server-side apply) are the only parts that talk to an API
server, and command.py is `splitserve operator`. Nothing here imports torch or the engine (.importlinter).
"""
